"""ONNX export and the ONNX Runtime engine, with the real onnx / onnxscript / onnxruntime."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import factories as fx  # noqa: E402
import trex_hub  # noqa: E402
from http_server import FileServer  # noqa: E402
from trex_hub.cli.download import main as download_main  # noqa: E402
from trex_hub.cli.extract import main as extract_main  # noqa: E402
from trex_hub.featurefile import read_features  # noqa: E402
from trex_hub.model import TReX  # noqa: E402
from trex_hub.onnx_export import OnnxRuntimeModel, export_onnx, read_onnx_metadata  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PHOTOS = sorted(str(p) for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
REL = 1e-4  # ONNX Runtime vs PyTorch: max |a - b| <= REL * max |b|


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max())


def photo_batch() -> torch.Tensor:
    """The sample photos through the paper's transfer preprocessing, normalised."""
    from PIL import Image

    from trex_hub.transforms import build_transform

    tf = build_transform("transfer")
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in PHOTOS])


@pytest.fixture(scope="module")
def downloaded(released_files, tmp_path_factory):
    """``trex-download trex_star --to-onnx --to-timm`` from a loopback mirror (ResNet-50)."""
    root = tmp_path_factory.mktemp("dl")
    with FileServer(released_files) as srv:
        code = download_main(["trex_star", "-q", "--base-url", srv.url, "--cache-dir",
                              str(root / "cache"), "--to-onnx", str(root / "onnx"),
                              "--to-timm", str(root / "timm")])
    assert code == 0
    model = trex_hub.load(released_files / "trexstar.pth")
    return model, root


@pytest.mark.slow  # a ResNet-50 export: 20-30 s on 2 busy cores
def test_download_to_onnx_metadata_and_names(downloaded):
    _, root = downloaded
    path = root / "onnx" / "trex_star.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["trex_star.onnx"]  # one file
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == ["features"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    meta = read_onnx_metadata(path)
    assert meta["model_name"] == "trex_star" and meta["arch"] == "resnet50"
    assert meta["input_name"] == "pixel_values" and json.loads(meta["output_names"]) == ["features"]
    assert meta["license"] == "cc-by-nc-sa-4.0"
    pre = json.loads(meta["preprocess"])
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (224, 224, "bicubic")
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert (root / "timm" / "trex_star" / "config.json").is_file()


@pytest.mark.slow
def test_onnxruntime_matches_pytorch_on_the_sample_photos(downloaded):
    model, root = downloaded
    x = photo_batch()
    with torch.no_grad():
        ref = model(x)
    sess = ort.InferenceSession(str(root / "onnx" / "trex_star.onnx"),
                                providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"pixel_values": x.numpy()})
    assert got.shape == (len(PHOTOS), 2048)
    assert rel_err(got, ref) <= REL
    (one,) = sess.run(None, {"pixel_values": x[:1].numpy()})  # the batch dimension is dynamic
    assert rel_err(one, ref[:1]) <= REL


def small_model() -> TReX:
    torch.manual_seed(0)
    model = TReX("resnet18", projector={"num_layers": 2, "hidden_dim": 64, "out_dim": 16},
                 name="mini")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_projector_head_parity_on_the_sample_photos(tmp_path):
    model = small_model()
    path = export_onnx(model, tmp_path / "mini.onnx", head="projector", opset=18)
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["features", "embeddings"]
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    meta = read_onnx_metadata(path)
    assert json.loads(meta["output_dims"]) == {"features": [512], "embeddings": [16]}
    assert "license" not in meta  # not a registry model: no licence claimed
    x = photo_batch()
    with torch.no_grad():
        feats, emb = model.forward_features(x), model(x)
    runner = OnnxRuntimeModel(path)  # the last output by default: the projector's
    assert runner.output == "embeddings" and runner.out_dim == 16
    assert rel_err(runner(x), emb) <= REL
    assert rel_err(OnnxRuntimeModel(path, output="features")(x), feats) <= REL
    # uint8 NHWC batches are normalised like the PyTorch engine does it
    u8 = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    from trex_hub.inference import prepare

    assert rel_err(runner(u8), prepare(model, fold_bn=False, channels_last=False)(u8)) <= REL
    with pytest.raises(ValueError, match="no output 'logits'"):
        OnnxRuntimeModel(path, output="logits")


def test_static_batch(tmp_path):
    """A static-batch export; the file gets the umask's mode like every other output (it was
    0600, unreadable for colleagues on a shared machine)."""
    model = TReX("resnet18").eval()
    old_mask = os.umask(0o022)
    try:
        path = export_onnx(model, tmp_path / "static.onnx", dynamic_batch=False)
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["static.onnx"]
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == \
        [1, 3, 224, 224]
    assert json.loads(read_onnx_metadata(path)["input_shape"]) == [1, 3, 224, 224]
    x = photo_batch()[:1]
    with torch.no_grad():
        assert rel_err(OnnxRuntimeModel(path)(x), model(x)) <= REL


def test_export_errors_are_clear(tmp_path):
    backbone_only = TReX("resnet18")
    with pytest.raises(ValueError, match="projector=True"):
        export_onnx(backbone_only, tmp_path / "x.onnx", head="projector")
    with pytest.raises(ValueError, match="use 'backbone' or 'projector'"):
        export_onnx(backbone_only, tmp_path / "x.onnx", head="logits")
    assert not list(tmp_path.iterdir())


def test_trex_extract_engine_onnxruntime_matches_torch(tmp_path, capsys):
    ckpt = tmp_path / "r18.pth"
    fx.write_backbone_file(ckpt, arch="resnet18", seed=4)
    common = [str(ckpt), str(SAMPLES), "--no-progress", "-q", "--threads", "1", "-b", "2"]
    assert extract_main(common + ["-o", str(tmp_path / "torch.npy")]) == 0
    assert extract_main(common + ["-o", str(tmp_path / "ort.npy"), "--engine",
                                  "onnxruntime"]) == 0
    ref, ref_rows = read_features(tmp_path / "torch.npy")
    got, rows = read_features(tmp_path / "ort.npy")
    assert rows == ref_rows and got.shape == (len(PHOTOS), 512)
    assert np.abs(got - ref).max() <= REL * np.abs(ref).max()
    meta = json.loads((tmp_path / "ort.npy.meta.json").read_text())
    assert meta["engine"] == "onnxruntime"
    capsys.readouterr()
    code = extract_main(common + ["-o", str(tmp_path / "x.npy"), "--engine", "onnxruntime",
                                  "--precision", "bf16"])
    assert code == 2 and "runs fp32 on the CPU" in capsys.readouterr().err


def test_trex_extract_engine_onnxruntime_with_the_models_own_crop(tmp_path, capsys):
    """--preprocess model with a crop other than 224: the graph is exported at the run's crop
    (it was always 224, and ONNX Runtime refused the first batch, leaving a parts folder)."""
    fx.write_backbone_file(tmp_path / "r18.pth", arch="resnet18", seed=4)
    model = trex_hub.load(tmp_path / "r18.pth")
    model.set_preprocess({"resize": 72, "crop": 64})
    folder = trex_hub.save_pretrained(model, tmp_path / "m64")
    common = [str(folder), str(SAMPLES), "--no-progress", "-q", "--threads", "1", "-b", "2",
              "--preprocess", "model"]
    assert extract_main(common + ["-o", str(tmp_path / "torch.npy")]) == 0
    code = extract_main(common + ["-o", str(tmp_path / "ort.npy"), "--engine", "onnxruntime"])
    assert code == 0, capsys.readouterr().err
    ref, ref_rows = read_features(tmp_path / "torch.npy")
    got, rows = read_features(tmp_path / "ort.npy")
    assert rows == ref_rows and got.shape == (len(PHOTOS), 512)
    assert np.abs(got - ref).max() <= REL * np.abs(ref).max()


def test_an_engine_for_another_input_size_is_refused_before_anything_is_written(tmp_path):
    from trex_hub.extract_run import ExtractError, extract_to_file
    from trex_hub.imagefiles import collect_inputs
    from trex_hub.onnx_export import prepare_onnxruntime

    model = TReX("resnet18").eval()
    engine = prepare_onnxruntime(model, image_size=64)
    assert engine.image_size == 64
    out = tmp_path / "o" / "f.npy"
    with pytest.raises(ExtractError, match=r"takes 64x64 inputs but the run's preprocessing "
                                           r"crops to 224x224; make it with image_size=224"):
        extract_to_file(model, collect_inputs([SAMPLES]), out, engine=engine)
    assert not out.parent.exists()


def crop64_model() -> TReX:
    model = TReX("resnet18", name="r18-64").eval()
    model.set_preprocess({"resize": 72, "crop": 64})
    return model


def test_the_graph_takes_the_models_own_crop_or_any_size(tmp_path):
    """image_size defaults to the model's crop (it was always 224 while the metadata said the
    crop), and dynamic_size gives a graph of any height and width."""
    model = crop64_model()
    path = export_onnx(model, tmp_path / "fixed.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = read_onnx_metadata(path)
    assert sess.get_inputs()[0].shape[1:] == [3, 64, 64]
    assert json.loads(meta["preprocess"])["crop"] == 64 and meta["dynamic_size"] == "false"
    assert json.loads(meta["input_shape"]) == ["N", 3, 64, 64]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(sess.run(None, {"pixel_values": x.numpy()})[0], model(x)) <= REL
    path = export_onnx(model, tmp_path / "any.onnx", dynamic_size=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, channels, height, width = sess.get_inputs()[0].shape
    assert channels == 3 and all(isinstance(d, str) for d in (batch, height, width))
    assert len({batch, height, width}) == 3
    meta = read_onnx_metadata(path)
    assert meta["dynamic_size"] == "true" and json.loads(meta["input_shape"]) == ["N", 3, "H", "W"]
    for size in ((64, 64), (50, 77)):
        x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert rel_err(sess.run(None, {"pixel_values": x.numpy()})[0], model(x)) <= REL
    with pytest.raises(ValueError, match=r"image_size=0: .* leave it out for the model's own"):
        export_onnx(model, tmp_path / "bad.onnx", image_size=0)
    assert not (tmp_path / "bad.onnx").exists()


def test_download_to_onnx_of_a_hub_model_takes_its_crop(tmp_path, monkeypatch):
    """trex-download --to-onnx of a model whose preprocessing crops to 64: the graph takes 64
    (ONNX Runtime refused the documented input)."""
    from http_server import HubServer

    folder = trex_hub.save_pretrained(crop64_model(), tmp_path / "m64")
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url.rstrip("/"))
        hub.add("org/m64", {n: (folder / n).read_bytes()
                            for n in ("config.json", "model.safetensors")})
        code = download_main(["hf-hub:org/m64", "-q", "--cache-dir", str(tmp_path / "hf"),
                              "--to-onnx", str(tmp_path / "onnx")])
    assert code == 0
    path = tmp_path / "onnx" / "org--m64.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [3, 64, 64]
    assert json.loads(read_onnx_metadata(path)["preprocess"])["crop"] == 64


def test_an_opset_the_exporter_cannot_write_is_refused_before_export(tmp_path, capfd):
    """opset < 18 (or past onnx's newest) was silently written as 18, after tracebacks."""
    model = TReX("resnet18").eval()
    for opset in (13, 17, 99, 18.0, True, "18"):
        with pytest.raises(ValueError, match=r"opset=.*: the torch.export-based exporter "
                                             r"writes ONNX opset 18 to \d+; pass one of those"):
            export_onnx(model, tmp_path / "o.onnx", opset=opset)
    assert not list(tmp_path.iterdir())
    assert "Traceback" not in capfd.readouterr().err
    path = export_onnx(model, tmp_path / "o19.onnx", opset=19, image_size=32)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 19
    assert read_onnx_metadata(path)["opset"] == "19"
    path = export_onnx(model, tmp_path / "default.onnx", image_size=32)  # the exporter's own
    written = {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]
    assert read_onnx_metadata(path)["opset"] == str(written) and written >= 18


def test_a_failed_opset_conversion_is_one_error_and_no_file(tmp_path, capfd, monkeypatch):
    """An opset the exporter accepts but cannot convert to: one ValueError, no file, and none
    of the converter's tracebacks on stderr (it saved the unconverted opset)."""
    newest = onnx.defs.onnx_opset_version()
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: newest + 5)
    with pytest.raises(ValueError, match=rf"opset={newest + 1}: the exporter could not convert"):
        export_onnx(TReX("resnet18").eval(), tmp_path / "o.onnx", opset=newest + 1,
                    image_size=32)
    assert not list(tmp_path.iterdir())
    assert "Traceback" not in capfd.readouterr().err


def test_features_only_model_exports_one_output_per_level(tmp_path):
    ckpt = tmp_path / "r18.pth"
    fx.write_backbone_file(ckpt, arch="resnet18", seed=4)
    maps = trex_hub.load(ckpt, features_only=True, out_indices=(0, 2, 4))
    names = maps.feature_info.module_name()
    path = export_onnx(maps, tmp_path / "maps.onnx", dynamic_size=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == names == ["relu", "layer2", "layer4"]
    meta = read_onnx_metadata(path)
    assert meta["head"] == "feature_maps" and json.loads(meta["output_names"]) == names
    assert json.loads(meta["output_dims"]) == {"relu": [64], "layer2": [128], "layer4": [512]}
    assert json.loads(meta["output_strides"]) == {"relu": 2, "layer2": 8, "layer4": 32}
    for size in ((64, 64), (65, 97)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
        got = sess.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            ref = maps(x)
        assert [g.shape for g in got] == [tuple(r.shape) for r in ref]
        assert all(rel_err(g, r) <= REL for g, r in zip(got, ref))
    fixed = export_onnx(maps, tmp_path / "fixed.onnx", dynamic_batch=False)  # the model's crop
    assert [d.dim_value for d in onnx.load(str(fixed)).graph.input[0].type.tensor_type.shape.dim
            ] == [1, 3, 224, 224]
    with pytest.raises(ValueError, match="features_only model exports its feature maps"):
        export_onnx(maps, tmp_path / "p.onnx", head="projector")
    assert not (tmp_path / "p.onnx").exists()


def test_licence_comes_from_the_models_pretrained_cfg_first():
    from trex_hub.onnx_export import onnx_metadata

    model = TReX("resnet18", name="hf-hub:org/renamed")  # not a registry name
    assert "license" not in onnx_metadata(model, "backbone", 224, True)
    model.pretrained_cfg["license"] = "cc-by-nc-sa-4.0"
    assert onnx_metadata(model, "backbone", 224, True)["license"] == "cc-by-nc-sa-4.0"
    model = TReX("resnet18", name="trex_star")  # the registry, as before
    assert onnx_metadata(model, "backbone", 224, True)["license"] == "cc-by-nc-sa-4.0"
