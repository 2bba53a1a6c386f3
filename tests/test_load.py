"""load(name) end to end: registry -> loopback mirror -> cache -> checkpoint -> model."""
import shutil

import numpy as np
import pytest
import torch

import factories as fx
import trex_hub
from http_server import FileServer
from trex_hub.api import ModelLoadError

X = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def mirror(released_files, monkeypatch):
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url.rstrip("/"))  # no trailing slash on purpose
        yield srv


def test_load_by_name_downloads_once_into_the_cache(mirror, tmp_path):
    model = trex_hub.load("trex_star", progress=False)
    assert model.arch == "resnet50" and not model.training and not model.has_projector
    cached = tmp_path / "cache" / "trexstar.pth"
    assert cached.is_file()
    ref = fx.torchvision_backbone("resnet50", seed=1)  # conftest: trexstar.pth uses seed 1
    with torch.no_grad():
        assert (model(X) - ref(X)).abs().max() <= 1e-5
    n = len(mirror.requests)
    again = trex_hub.load("T-ReX*", progress=False)
    assert len(mirror.requests) == n  # served from the cache
    assert torch.equal(again.backbone.conv1.weight, model.backbone.conv1.weight)


@pytest.mark.parametrize("name,layers,seed", [("trex_star_repro", 1, 3), ("trex_repro", 3, 2)])
def test_projector_models_come_from_the_full_checkpoint(mirror, name, layers, seed, released_files):
    model = trex_hub.load(name, projector=True, progress=False)
    assert model.head.num_layers == layers and model.classifier.num_classes == 1000
    ck = torch.load(released_files / model_file(name), weights_only=False)
    feats = fx.torchvision_backbone("resnet50", seed=seed)(X).detach()
    ref = fx.reference_projector(feats, fx.strip(ck["model"], "module.model.head."), layers)
    with torch.no_grad():
        assert torch.allclose(model(X), ref, atol=1e-5, rtol=1e-4)
    img = np.full((64, 64, 3), 128, np.uint8)
    emb = model.extract([img])
    assert emb.shape == (1, 256) and emb.dtype == torch.float32
    assert len(model.classify(img, topk=5)[0]) == 5


def model_file(name):
    return trex_hub.model_info(name)["files"][1]["filename"]


def test_projector_on_a_backbone_only_model_names_the_models_that_have_one(mirror):
    with pytest.raises(ModelLoadError) as err:
        trex_hub.load("trex", projector=True)
    assert "trex_repro" in str(err.value) and "trex_star_repro" in str(err.value)
    with pytest.raises(ModelLoadError, match="ema=True"):
        trex_hub.load("trex_star", ema=True)


def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    with FileServer(empty) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        with pytest.raises(Exception) as err:
            trex_hub.load("trex", progress=False)
        assert "404" in str(err.value) and "trex.pth" in str(err.value)
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*.pth*"))


def test_cache_location_honours_xdg_and_argument(mirror, tmp_path, monkeypatch):
    monkeypatch.delenv("TREX_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    trex_hub.load("trex", progress=False)
    assert (tmp_path / "xdg" / "trex_hub" / "trex.pth").is_file()
    trex_hub.load("trex", cache_dir=tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "trex.pth").is_file()


def test_pretrained_false_builds_random_weights_without_network(monkeypatch):
    monkeypatch.setenv("TREX_HUB_BASE_URL", "http://127.0.0.1:9/")  # nothing listens there
    model = trex_hub.load("trex_repro", pretrained=False, projector=True)
    assert model.has_projector and model.head.num_layers == 3 and model.classifier is None
    assert trex_hub.load("trex_star", pretrained=False).out_dim == 2048


def test_local_paths_and_unknown_names(released_files, tmp_path):
    local = tmp_path / "copy.pth"
    shutil.copy(released_files / "trex.pth", local)
    assert trex_hub.load(str(local)).arch == "resnet50"
    with pytest.raises(trex_hub.UnknownModelError, match="Did you mean 'trex_star'"):
        trex_hub.load("trex_sta")
    with pytest.raises(ModelLoadError, match="no projector"):
        trex_hub.load(local, projector=True)


def test_cuda_device_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        trex_hub.load("trex", pretrained=False, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_and_extract_on_cuda(released_files):
    model = trex_hub.load(released_files / "trex_2_checkpoint_full.pth", projector=True,
                          device="cuda")
    assert next(model.parameters()).is_cuda
    out = model.extract(np.zeros((40, 40, 3), np.uint8))
    assert out.device.type == "cpu" and out.shape == (1, 256)
    cpu = trex_hub.load(released_files / "trex_2_checkpoint_full.pth", projector=True)
    ref = cpu.extract(np.zeros((40, 40, 3), np.uint8))
    # full fp32 on CUDA (TF32 off inside the call): within 1e-5 relative of the CPU
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_fetch_returns_the_verified_cached_file(mirror, tmp_path, released_files):
    path = trex_hub.fetch("t-ReX*", progress=False)
    assert path == tmp_path / "cache" / "trexstar.pth"
    assert path.read_bytes() == (released_files / "trexstar.pth").read_bytes()
    assert (tmp_path / "cache" / "trexstar.pth.manifest.json").is_file()
    n = len(mirror.requests)
    assert trex_hub.fetch("trex_star") == path and len(mirror.requests) == n  # cached
    full = trex_hub.fetch("trex_repro", full=True, cache_dir=tmp_path / "own", progress=False)
    assert full == tmp_path / "own" / "trex_2_checkpoint_full.pth"
    with pytest.raises(ModelLoadError, match="'trex' has no full training checkpoint.*trex_repro"):
        trex_hub.fetch("trex", full=True)
    with pytest.raises(trex_hub.UnknownModelError):
        trex_hub.fetch("nope")
    # load() reads the very file fetch() verified: no second request
    n = len(mirror.requests)
    trex_hub.load("trex_repro", projector=True, cache_dir=tmp_path / "own")
    assert len(mirror.requests) == n


def test_fetch_rejects_a_file_of_the_wrong_layout(tmp_path, monkeypatch, released_files):
    root = tmp_path / "mirror"
    root.mkdir()
    shutil.copy(released_files / "trex_2_checkpoint_full.pth", root / "trex.pth")
    with FileServer(root) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        with pytest.raises(trex_hub.CheckpointError, match="carries a projector.*rejected, not kept"):
            trex_hub.fetch("trex", progress=False)
    assert not (tmp_path / "cache" / "trex.pth").exists()


def test_pretrained_false_means_the_same_for_local_files(released_files):
    local = trex_hub.load(released_files / "trex_2_checkpoint_full.pth", pretrained=False,
                          projector=True)
    assert local.head.num_layers == 3 and local.classifier is None
    with pytest.raises(ModelLoadError, match="no projector"):
        trex_hub.load(released_files / "trex.pth", pretrained=False, projector=True)
    with pytest.raises(ModelLoadError, match="source='hf' and revision= apply to"):
        trex_hub.load(released_files / "trex.pth", source="hf")
    with pytest.raises(TypeError, match="unexpected arguments for a registry model"):
        trex_hub.load("trex", pretrained=False, token="x")
