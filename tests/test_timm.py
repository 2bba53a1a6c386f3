"""timm interoperability with the real timm: export to timm's layout, load timm folders back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

import factories as fx  # noqa: E402
import trex_hub  # noqa: E402
from http_server import HubServer  # noqa: E402
from trex_hub.checkpoint import CheckpointError  # noqa: E402
from trex_hub.model import TReX  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
X = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
TIMM_FILES = ("README.md", "config.json", "model.safetensors")


@pytest.fixture(scope="module")
def released_r50(tmp_path_factory):
    """A generated ResNet-50 in the released backbone layout, loaded as trex_star's weights
    (what the loader records for a release: its name and the digest of its weights)."""
    from trex_hub.model import weights_digest

    path = tmp_path_factory.mktemp("r50") / "trexstar.pth"
    fx.write_backbone_file(path, arch="resnet50", seed=7)
    model = trex_hub.load(path)
    model.pretrained_cfg.update(name="trex_star", release="trex_star",
                                release_digest=weights_digest(model))
    return model


@pytest.fixture(scope="module")
def timm_folder(released_r50, tmp_path_factory):
    return trex_hub.save_pretrained(released_r50, tmp_path_factory.mktemp("timm") / "trex_star",
                                    format="timm")


def reference(model: TReX) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def test_timm_folder_files_and_config(timm_folder):
    assert sorted(p.name for p in timm_folder.iterdir()) == list(TIMM_FILES)
    cfg = json.loads((timm_folder / "config.json").read_text())
    assert cfg["architecture"] == "resnet50" and cfg["num_classes"] == 0
    assert cfg["num_features"] == 2048
    pre = cfg["pretrained_cfg"]
    assert pre["license"] == "cc-by-nc-sa-4.0"  # the registry's licence of trex_star
    assert (pre["interpolation"], pre["crop_pct"], pre["crop_mode"]) == ("bicubic", 1.0, "center")
    assert pre["input_size"] == [3, 224, 224]
    card = (timm_folder / "README.md").read_text()
    assert "library_name: timm" in card and "license: cc-by-nc-sa-4.0" in card
    # the released model's published figures and the citation, from the one card module
    from trex_hub import registry

    entry = registry.get_entry("trex_star")
    assert f"ImageNet-1K top-1: {entry.imagenet_top1} %" in card
    assert "## Citation" in card and registry.CITATION in card


def test_timm_loads_the_local_folder_with_identical_outputs(released_r50, timm_folder):
    ref = reference(released_r50)
    # timm's documented way of pointing a pretrained config at a file...
    by_file = timm.create_model("resnet50", pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(
                                    file=str(timm_folder / "model.safetensors"))).eval()
    # ...and the whole folder, config.json included
    by_dir = timm.create_model(f"local-dir:{timm_folder}", pretrained=True, num_classes=0).eval()
    for net in (by_file, by_dir):
        assert net.num_features == 2048
        with torch.no_grad():
            assert (net(X) - ref).abs().max().item() <= 1e-5


def test_timm_resolves_the_papers_transfer_preprocessing(timm_folder):
    from PIL import Image

    from trex_hub.transforms import build_transform

    by_dir = timm.create_model(f"local-dir:{timm_folder}", pretrained=True, num_classes=0)
    # the README's overlay of timm's own resnet50 config (which says crop_pct 0.95: Resize 235)
    by_file = timm.create_model("resnet50", pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(
                                    file=str(timm_folder / "model.safetensors"), crop_pct=1.0,
                                    interpolation="bicubic"))
    ours = build_transform("transfer")
    for net in (by_dir, by_file):
        cfg = timm.data.resolve_data_config({}, model=net)
        assert cfg["input_size"] == (3, 224, 224) or list(cfg["input_size"]) == [3, 224, 224]
        assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == \
            ("bicubic", 1.0, "center")
        assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)
        assert tuple(cfg["std"]) == (0.229, 0.224, 0.225)
        theirs = timm.data.create_transform(**cfg)
        for name in ("chelsea.jpg", "rocket.jpg"):
            img = Image.open(SAMPLES / name).convert("RGB")
            a, b = theirs(img), ours(img)
            assert a.shape == b.shape == (3, 224, 224)
            assert (a - b).abs().max().item() <= 1e-5


def test_timm_loads_through_the_hub_with_hf_endpoint(released_r50, timm_folder, tmp_path):
    """The real timm client in a fresh process whose HF_ENDPOINT points at a loopback Hub."""
    torch.save(X, tmp_path / "x.pt")
    script = textwrap.dedent("""
        import json, sys, torch, timm
        net = timm.create_model("hf-hub:org/trex_star", pretrained=True, num_classes=0).eval()
        with torch.no_grad():
            y = net(torch.load(sys.argv[1]))
        torch.save(y, sys.argv[2])
        cfg = timm.data.resolve_data_config({}, model=net)
        print(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}))
    """)
    with HubServer() as hub:
        hub.add("org/trex_star", {n: (timm_folder / n).read_bytes() for n in TIMM_FILES})
        env = dict(os.environ, HF_ENDPOINT=hub.url.rstrip("/"), HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
        for var in ("HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE"):
            env.pop(var, None)
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"),
                              str(tmp_path / "y.pt")], env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        served = {name for _, _, name in hub.downloads}
    assert {"config.json", "model.safetensors"} <= served
    y = torch.load(tmp_path / "y.pt")
    assert (y - reference(released_r50)).abs().max().item() <= 1e-5
    cfg = json.loads(res.stdout.strip().splitlines()[-1])
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bicubic", 1.0)


def test_trex_hub_loads_a_timm_folder_and_hub_repo(released_r50, timm_folder, tmp_path,
                                                   monkeypatch):
    ref = reference(released_r50)
    local = trex_hub.load(timm_folder)
    assert local.arch == "resnet50" and not local.has_projector
    with torch.no_grad():
        assert torch.equal(local(X), ref)
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url.rstrip("/"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        hub.add("org/trex_star", {n: (timm_folder / n).read_bytes() for n in TIMM_FILES})
        remote = trex_hub.load("hf-hub:org/trex_star")
    with torch.no_grad():
        assert torch.equal(remote(X), ref)


def test_pretrained_false_and_preprocessing_from_a_timm_config(tmp_path, monkeypatch):
    """A timm repo rebuilds its architecture from config.json alone (no weights downloaded), and
    the pretrained_cfg's geometry comes back as our preprocessing, both ways (timm's
    resize = floor(crop / crop_pct))."""
    torch.manual_seed(0)
    model = TReX("resnet18", name="small")
    model.set_preprocess(trex_hub.PreprocessConfig(resize=255, crop=224, interpolation="bilinear",
                                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    folder = trex_hub.save_pretrained(model, tmp_path / "small", format="timm")
    assert trex_hub.load(folder).preprocess_config == model.preprocess_config
    card = (folder / "README.md").read_text()  # the card tells the same geometry
    assert "resize the shorter side to 255 (bilinear), centre-crop 224" in card
    assert "Resize 255 bilinear + CenterCrop 224" in card and "transfer protocol" not in card
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url.rstrip("/"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        hub.add("org/small", {n: (folder / n).read_bytes() for n in TIMM_FILES})
        arch = trex_hub.load("hf-hub:org/small", pretrained=False)
        assert [d[2] for d in hub.downloads] == ["config.json"]
    assert arch.arch == "resnet18" and not arch.has_projector
    assert arch.preprocess_config == model.preprocess_config
    assert not torch.equal(arch.backbone.conv1.weight, model.backbone.conv1.weight)
    # a timm model of another family: one line naming it, whether weights are read or not
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"] = "vit_small_patch16_224"
    (folder / "config.json").write_text(json.dumps(cfg))
    from trex_hub.checkpoint import read_config

    with pytest.raises(CheckpointError, match="'vit_small_patch16_224' model is not a t-ReX"):
        read_config(folder / "config.json")


def test_trex_hub_loads_a_folder_written_by_timm_itself(tmp_path):
    """A timm ResNet-50 with its ImageNet classifier, saved by timm: trex_hub keeps the backbone."""
    torch.manual_seed(0)
    net = timm.create_model("resnet50", pretrained=False).eval()
    timm.models.save_for_hf(net, tmp_path / "from_timm", safe_serialization=True)
    model = trex_hub.load(tmp_path / "from_timm")
    with torch.no_grad():
        want = net.forward_head(net.forward_features(X), pre_logits=True)
        assert (model(X) - want).abs().max().item() <= 1e-5


def test_non_resnet_timm_folders_are_refused_clearly(tmp_path):
    net = timm.create_model("resnet18d", pretrained=False, num_classes=0)
    timm.models.save_for_hf(net, tmp_path / "d", safe_serialization=True)
    with pytest.raises(CheckpointError, match="timm 'resnet18d' model is not a t-ReX backbone"):
        trex_hub.load(tmp_path / "d")
    # a config that claims the plain layout does not get past the key check
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["architecture"] = "resnet18"
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not timm's plain resnet18 layout"):
        trex_hub.load(tmp_path / "d")


def test_timm_config_values_meet_the_schema(tmp_path):
    """num_features and the name read from a timm config.json are validated like our own."""
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    timm.models.save_for_hf(net, tmp_path / "t", safe_serialization=True)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["num_features"] = "many"
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_features"):
        trex_hub.load(tmp_path / "t")


def test_unknown_save_format_is_an_error(released_r50, tmp_path):
    with pytest.raises(ValueError, match="use 'trex_hub'"):
        trex_hub.save_pretrained(released_r50, tmp_path / "x", format="keras")


def test_trex_download_to_timm(released_files, tmp_path, capsys):
    from http_server import FileServer
    from trex_hub.cli.download import main

    with FileServer(released_files) as srv:
        code = main(["trex_star", "--base-url", srv.url, "--cache-dir", str(tmp_path / "c"),
                     "--to-timm", str(tmp_path / "timm")])
    assert code == 0
    folder = tmp_path / "timm" / "trex_star"
    assert f"wrote {folder}" in capsys.readouterr().out
    ref = reference(trex_hub.load(released_files / "trexstar.pth"))
    net = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        assert (net(X) - ref).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------
# Review F #8: what would make trex_hub build another network, or preprocess otherwise, is refused
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_args,field", [
    ({"global_pool": "max"}, "'global_pool' is 'max'"),
    ({"output_stride": 16}, "'model_args.output_stride' changes the network"),
    ({"in_chans": 1}, "'model_args.in_chans' is 1"),
])
def test_timm_fields_that_change_the_network_are_refused(tmp_path, model_args, field):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=0, **model_args).eval()
    timm.models.save_for_hf(net, tmp_path / "t", safe_serialization=True, model_args=model_args)
    for pretrained in (True, False):
        with pytest.raises(CheckpointError, match=field + ".*load it with timm") as info:
            trex_hub.load(tmp_path / "t", pretrained=pretrained)
        assert "\n" not in str(info.value)


def test_harmless_timm_model_args_load(tmp_path):
    torch.manual_seed(0)
    args = {"drop_rate": 0.2, "drop_path_rate": 0.1, "global_pool": "avg"}
    net = timm.create_model("resnet18", num_classes=0, **args).eval()
    timm.models.save_for_hf(net, tmp_path / "t", safe_serialization=True, model_args=args)
    model = trex_hub.load(tmp_path / "t")
    assert model.pretrained_cfg["license"] == "apache-2.0"  # timm's pretrained_cfg licence
    with torch.no_grad():
        assert (model(X) - net(X)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("changes,field", [
    ({"crop_mode": "squash"}, "'pretrained_cfg.crop_mode' is 'squash'"),
    ({"interpolation": "random"}, "'pretrained_cfg.interpolation' is 'random'"),
    ({"crop_pct": 1.5}, "'pretrained_cfg.crop_pct' is 1.5"),
    ({"input_size": [3, 224, 160]}, "'pretrained_cfg.input_size'"),
    ({"mean": "imagenet"}, "'pretrained_cfg.mean'"),
])
def test_a_preprocessing_trex_hub_cannot_reproduce_is_refused(tmp_path, changes, field):
    """Not replaced silently by the transfer preset with ImageNet statistics."""
    net = timm.create_model("resnet18", num_classes=0)
    timm.models.save_for_hf(net, tmp_path / "t", safe_serialization=True)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["pretrained_cfg"]["mean"] = [0.4815, 0.4578, 0.4082]
    cfg["pretrained_cfg"].update(changes)
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    for pretrained in (True, False):
        with pytest.raises(CheckpointError, match=field):
            trex_hub.load(tmp_path / "t", pretrained=pretrained)
    cfg["pretrained_cfg"] = [1]
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'pretrained_cfg' must be an object, found list"):
        trex_hub.load(tmp_path / "t")


def test_a_timm_pretrained_cfg_keeps_its_statistics(tmp_path):
    net = timm.create_model("resnet18", num_classes=0)
    timm.models.save_for_hf(net, tmp_path / "t", safe_serialization=True)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    clip = ([0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758])
    cfg["pretrained_cfg"].update(mean=clip[0], std=clip[1], crop_pct=0.875,
                                 interpolation="bilinear")
    del cfg["pretrained_cfg"]["input_size"]  # absent: timm's default 224
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    pre = trex_hub.load(tmp_path / "t").preprocess_config
    assert (pre.mean, pre.std) == (tuple(clip[0]), tuple(clip[1]))
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bilinear")
