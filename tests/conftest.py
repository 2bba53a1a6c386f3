import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # tests import factories / http_server as plain modules

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache and never sees the user's mirror or offline settings."""
    monkeypatch.setenv("TREX_HUB_CACHE", str(tmp_path / "cache"))
    for var in ("TREX_HUB_BASE_URL", "TREX_HUB_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny forwards: a second OpenMP thread only adds contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def released_files(tmp_path_factory):
    """Generated files in the released layouts, named as on the official server."""
    import factories as fx

    root = tmp_path_factory.mktemp("released")
    fx.write_backbone_file(root / "trex.pth", seed=0)
    fx.write_backbone_file(root / "trexstar.pth", seed=1)
    fx.write_backbone_file(root / "trex_2.pth", seed=2)
    fx.write_backbone_file(root / "trexstar_2.pth", seed=3)
    fx.write_full_checkpoint(root / "trex_2_checkpoint_full.pth", num_layers=3, seed=2)
    fx.write_full_checkpoint(root / "trexstar_2_checkpoint_full.pth", num_layers=1, seed=3)
    return root


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback Hugging Face Hub emulator; the real huggingface_hub client is pointed at it
    (HF_ENDPOINT) with a private HF_HOME and no token or offline setting from the environment."""
    from http_server import HubServer

    with HubServer() as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url.rstrip("/"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        for var in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        yield srv
