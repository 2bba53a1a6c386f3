"""torch.hub: the repo's hubconf.py through the real torch.hub code paths, offline."""
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import factories as fx
from http_server import FileServer

REPO = Path(__file__).resolve().parent.parent
NAMES = ["trex", "trex_repro", "trex_star", "trex_star_repro"]


def test_importing_hubconf_is_light():
    code = ("import sys; sys.path.insert(0, %r); import hubconf; "
            "bad = [m for m in ('huggingface_hub', 'safetensors', 'sklearn', 'matplotlib') "
            "if m in sys.modules]; print(bad); assert not bad, bad; "
            "assert hubconf.dependencies == ['torch', 'torchvision']" % str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_local_source_load_with_kwargs_passthrough():
    model = torch.hub.load(str(REPO), "trex_star_repro", source="local", pretrained=False,
                           projector=True)
    assert model.has_projector and model.head.num_layers == 1


@pytest.fixture
def offline_github(tmp_path, monkeypatch):
    """TORCH_HOME whose hub cache holds this repo as naver_trex_main, and no way to reach
    github.com (urlopen fails the way it does without a network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub_dir = Path(torch.hub.get_dir())
    shutil.copytree(REPO, hub_dir / "naver_trex_main",
                    ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__",
                                                  ".pytest_cache"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    # hubconf imports `trex_hub` from the cached repo copy, like a real torch.hub user
    monkeypatch.setattr(sys, "path", list(sys.path))
    for mod in [m for m in sys.modules if m == "trex_hub" or m.startswith("trex_hub.")]:
        monkeypatch.delitem(sys.modules, mod)
    yield hub_dir


def test_list_and_help_offline(offline_github):
    assert sorted(torch.hub.list("naver/trex", trust_repo=True)) == NAMES
    doc = torch.hub.help("naver/trex", "trex_star", trust_repo=True)
    assert "t-ReX*" in doc and "80.2" in doc


def test_users_string_loads_offline_with_weights_from_a_mirror(offline_github, tmp_path,
                                                                monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    fx.write_backbone_file(files / "trex.pth", seed=9)
    with FileServer(files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        model = torch.hub.load("naver/trex", "trex", trust_repo=True, progress=False)
    import trex_hub

    assert Path(trex_hub.__file__).parent.parent == offline_github / "naver_trex_main"
    ref = fx.torchvision_backbone("resnet50", seed=9)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-5
