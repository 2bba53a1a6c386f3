"""The extraction engine: fast path equivalence, BN folding, decode pipeline, bad files, formats."""
import io
import struct
import time
import zlib

import factories as fx
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import trex_hub
from trex_hub import extract as ex
from trex_hub.inference import InferenceModel, prepare
from trex_hub.transforms import Decoder, ImageLoadError, build_transform, open_image


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def r18_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    fx.write_backbone_file(path, arch="resnet18", seed=4)
    return path


@pytest.fixture(scope="module")
def r50_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt50") / "trex.pth"
    fx.write_backbone_file(path, arch="resnet50", seed=5)
    return path


@pytest.fixture(scope="module")
def proj_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckptp") / "full.pth"
    fx.write_full_checkpoint(path, num_layers=3, arch="resnet18", memory_size=64, seed=6)
    return path


def photos(n, size=(70, 50), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 255, (size[1] // 10 + 1, size[0] // 10 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (size[1], size[0], 3))
        out.append(np.clip(arr, 0, 255).astype(np.uint8))
    return out


# --------------------------------------------------------------------------- fast path ------
def test_bn_folding_resnet50_within_1e4(r50_path):
    model = trex_hub.load(r50_path)
    runner = InferenceModel(model, torch.device("cpu"))
    assert runner.folded == 53  # stem + 3 per bottleneck x 16 + 4 downsamples
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in runner.module.modules())
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    got = runner(x)
    assert rel_err(got, want) < 1e-4
    # the user's model is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_projector_bn_folded(proj_path):
    model = trex_hub.load(proj_path, projector=True)
    runner = InferenceModel(model, torch.device("cpu"))
    assert runner.folded == 20 + 3
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    assert want.shape == (3, 256)
    assert rel_err(runner(x), want) < 1e-4


class _ReluFirstBlock(torchvision.models.resnet.BasicBlock):
    """bn1 is not applied right after conv1 here: folding it would be wrong."""

    def forward(self, x):
        out = self.bn1(torch.relu(self.conv1(x)) - 0.5)
        out = self.bn2(self.conv2(self.relu(out)))
        return self.relu(out + x)


def test_fold_leaves_unknown_layouts_alone():
    net = fx.torchvision_backbone("resnet18", seed=0)
    net.layer1[0].__class__ = _ReluFirstBlock
    runner = InferenceModel(net, torch.device("cpu"))
    assert runner.folded == 20 - 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(runner(x), net(x)) < 1e-5


def test_launch_on_another_gpu_records_on_that_gpus_stream(r18_path, monkeypatch):
    """A cuda:1 model called where cuda:0 is current: the event that says the features are
    back must be on cuda:1's stream, where the copy runs (recorded on the current device's, it
    let the features be read before they arrived). Stand-ins for the CUDA calls; on a GPU the
    CUDA tests hold the numbers."""
    runner = InferenceModel(trex_hub.load(r18_path), torch.device("cpu"))
    runner.device = torch.device("cuda", 1)
    entered, recorded = [], []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

    class OnDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", OnDevice)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(runner, "forward", lambda batch: torch.ones(len(batch), 4))
    assert runner.launch(torch.zeros(2, 3, 8, 8)).result().shape == (2, 4)
    assert recorded == [("stream of", torch.device("cuda", 1))]
    assert entered == [torch.device("cuda", 1), None]  # forward and the copy ran on cuda:1


def test_uint8_batch_is_normalised_like_totensor(r18_path):
    model = trex_hub.load(r18_path)
    runner = prepare(model)
    u8 = torch.from_numpy(np.stack(photos(2, (64, 64))))
    ref = torch.stack([build_transform(None)(Image.fromarray(a.numpy())) for a in u8])
    assert torch.allclose(runner.to_input(u8), ref, atol=1e-6)
    assert runner.to_input(u8).is_contiguous(memory_format=torch.channels_last)


def test_prepare_cached_and_refreshed_when_weights_change(r18_path):
    model = trex_hub.load(r18_path)
    a = prepare(model)
    assert prepare(model) is a
    x = torch.randn(1, 3, 64, 64)
    before = a(x)
    with torch.no_grad():
        model.backbone.conv1.weight.mul_(2.0)
    b = prepare(model)
    assert b is not a
    with torch.no_grad():
        want = model(x)
    assert rel_err(b(x), want) < 1e-4 and rel_err(before, want) > 1e-3
    assert prepare(model, precision="bf16") is not b


def test_extract_fast_equals_plain_eval(r18_path):
    model = trex_hub.load(r18_path)
    imgs = photos(5)
    fast = model.extract(imgs, batch_size=2)
    plain = model.extract(imgs, batch_size=2, fast=False, num_workers=0)
    with torch.no_grad():
        ref = model(torch.stack([build_transform("transfer")(Image.fromarray(a)) for a in imgs]))
    assert fast.shape == (5, 512) and fast.dtype == torch.float32
    assert rel_err(plain, ref) < 1e-5
    assert rel_err(fast, ref) < 1e-4


def test_extract_normalises_with_the_models_own_mean_and_std(r18_path, tmp_path):
    """A model whose preprocessing has its own mean / std (a timm or exported config): every
    engine path normalises with them, as get_transform(model) does; the preset only sets the
    geometry. Also for decoded images mixed with already normalised tensors, and for the
    ONNX Runtime engine when it is installed."""
    from trex_hub import get_transform

    model = trex_hub.load(r18_path)
    model.set_preprocess(trex_hub.PreprocessConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    imgs = photos(4)
    tf = get_transform(model)
    x = torch.stack([tf(Image.fromarray(a)) for a in imgs])
    with torch.no_grad():
        ref = model(x)
    assert rel_err(model.extract(imgs, batch_size=2), ref) < 1e-4
    paths = []
    for i, a in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    assert rel_err(model.extract(paths, batch_size=2, decode="cpu"), ref) < 1e-4
    mixed = model.extract([x[0], imgs[1], x[2], imgs[3]], batch_size=4, fast=False)
    assert rel_err(mixed, ref) < 1e-5
    default = trex_hub.load(r18_path)  # ImageNet's mean / std: other features
    assert rel_err(default.extract(imgs, batch_size=2), ref) > 1e-2
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from trex_hub.onnx_export import prepare_onnxruntime

    runner = prepare_onnxruntime(model)
    u8 = torch.from_numpy(np.stack([np.asarray(Decoder("transfer")(Image.fromarray(a)))
                                    for a in imgs]))
    assert rel_err(runner(u8), ref) < 1e-4


def test_preprocess_model_uses_the_weights_own_geometry(r18_path, tmp_path):
    """preprocess="model" is get_transform(model): the weights' own resize / crop /
    interpolation (and mean / std), on every decoding path; a model without a config (a plain
    torchvision ResNet) is told what to pass instead."""
    from trex_hub import get_transform

    model = trex_hub.load(r18_path)
    model.set_preprocess(trex_hub.PreprocessConfig(resize=40, crop=32, interpolation="bilinear",
                                                   mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    imgs = photos(6)
    tf = get_transform(model)
    with torch.no_grad():
        ref = model(torch.stack([tf(Image.fromarray(a)) for a in imgs]))
    paths = []
    for i, a in enumerate(imgs):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(a).save(paths[-1], quality=95)
    assert rel_err(model.extract(imgs, preprocess="model", batch_size=4), ref) < 1e-4
    by_file = model.extract(paths, preprocess="model", decode="cpu", draft=False)
    procs = model.extract(paths, preprocess="model", decode="cpu", draft=False, num_workers=2,
                          workers_mode="processes")
    assert torch.equal(by_file, procs)
    tensor = model.extract(paths, preprocess="model", decode="gpu")  # decode_jpeg on the CPU
    assert rel_err(tensor, by_file) < 1e-2  # the tensor path's documented bound (3e-3 here)
    with pytest.raises(ValueError, match="this model has none.*'transfer' or 'imagenet'"):
        ex.extract_features(torchvision.models.resnet18(), imgs, preprocess="model")
    with pytest.raises(ValueError, match="choose one of .*'model' or None"):
        model.extract(imgs, preprocess="imagenet256")


def test_extract_inputs_and_options(r18_path, tmp_path):
    model = trex_hub.load(r18_path)
    imgs = photos(3)
    paths = []
    for i, a in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    mixed = [paths[0], Image.fromarray(imgs[1]), torch.from_numpy(imgs[2]).permute(2, 0, 1)]
    want = model.extract(imgs)
    got = model.extract(mixed, num_workers=2, output="numpy")
    assert isinstance(got, np.ndarray) and rel_err(got, want) < 1e-6
    # a single image, normalised output, an empty list, a float batch
    one = model.extract(str(paths[0]), normalize=True)
    assert one.shape == (1, 512) and torch.allclose(one.norm(dim=1), torch.ones(1))
    assert model.extract([]).shape == (0, 512)
    batch = torch.stack([build_transform("transfer")(Image.fromarray(a)) for a in imgs])
    assert rel_err(model.extract(batch, batch_size=2), want) < 1e-5
    # float [3,H,W] items mix with decoded ones
    mixed2 = [batch[0], imgs[1]]
    assert rel_err(model.extract(mixed2), want[:2]) < 1e-5
    with pytest.raises(ImageLoadError, match="different sizes"):
        model.extract([imgs[0], photos(1, (30, 30))[0]], preprocess=None)
    with pytest.raises(ValueError, match="precision"):
        model.extract(imgs, precision="int8")


def test_extract_bad_file_names_it(r18_path, tmp_path):
    model = trex_hub.load(r18_path)
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*empty file"):
        model.extract([photos(1)[0], bad], num_workers=2)


def test_bf16_autocast_cpu_is_close(r18_path):
    model = trex_hub.load(r18_path)
    imgs = photos(2)
    ref = model.extract(imgs)
    got = model.extract(imgs, precision="bf16")
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 0.1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_match_cpu(r18_path):
    model = trex_hub.load(r18_path)
    imgs = photos(4)
    ref = model.extract(imgs)
    assert rel_err(model.extract(imgs, device="cuda"), ref) < 1e-5  # fp32 = IEEE fp32
    for precision in ("bf16", "fp16"):
        assert rel_err(model.extract(imgs, device="cuda", precision=precision), ref) < 1e-2


# ------------------------------------------------------------------------------ decoding ----
def test_decoder_matches_torchvision_transform_exactly(tmp_path):
    img = Image.fromarray(photos(1, (333, 250))[0])
    path = tmp_path / "a.jpg"
    img.save(path, quality=90)
    for preset in ("transfer", "imagenet"):
        dec = Decoder(preset, draft=False)(path)
        ref = build_transform(preset)(Image.open(path).convert("RGB"))
        got = (torch.from_numpy(np.array(dec)).permute(2, 0, 1).float() / 255.0
               - torch.tensor(trex_hub.preprocess.IMAGENET_MEAN).view(3, 1, 1)) \
            / torch.tensor(trex_hub.preprocess.IMAGENET_STD).view(3, 1, 1)
        assert got.shape == ref.shape == (3, 224, 224)
        assert torch.allclose(got, ref, atol=1e-6)


def test_jpeg_draft_decodes_large_photos_at_reduced_scale(tmp_path):
    big = Image.fromarray(photos(1, (1800, 1200), seed=3)[0])
    path = tmp_path / "big.jpg"
    big.save(path, quality=92)
    with Image.open(path) as im:
        im.draft("RGB", (336, 224))
        assert min(im.size) >= 224 and im.size[0] < 1800  # the decoder does reduce
    exact = Decoder("transfer", draft=False)(path).astype(np.float64)
    fast = Decoder("transfer", draft=True)(path).astype(np.float64)
    assert fast.shape == exact.shape == (224, 224, 3)
    assert np.abs(fast - exact).mean() < 3.0  # same picture, slightly different pixels
    # small images are decoded exactly either way
    small = tmp_path / "small.jpg"
    Image.fromarray(photos(1, (400, 300))[0]).save(small)
    assert np.array_equal(Decoder("transfer", draft=True)(small),
                          Decoder("transfer", draft=False)(small))


def _png_header_only(width, height):
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def make_bad_files(folder):
    """One file per kind of bad input; returns {name: expected words in the error}."""
    good = io.BytesIO()
    Image.fromarray(photos(1, (120, 90))[0]).save(good, format="JPEG")
    data = good.getvalue()
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.jpg").write_bytes(data[:20] + bytes(range(256)) * 8)
    (folder / "notimage.png").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(_png_header_only(40000, 40000))
    return {"zero.jpg": "empty file", "truncated.jpg": "not a readable image",
            "corrupt.jpg": "not a readable image", "notimage.png": "not a readable image",
            "bomb.png": "decompression bomb"}


def test_bad_files_raise_image_load_error(tmp_path):
    expected = make_bad_files(tmp_path)
    dec = Decoder("transfer")
    for name, words in expected.items():
        with pytest.raises(ImageLoadError, match=words):
            dec(tmp_path / name)
    # a configurable pixel limit
    ok = tmp_path / "ok.png"
    Image.fromarray(photos(1, (100, 100))[0]).save(ok)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        open_image(ok, max_pixels=5000)
    assert open_image(ok, max_pixels=0).size == (100, 100)


def test_any_mode_and_exif_orientation(tmp_path):
    arr = photos(1, (60, 40))[0]
    rgb = Image.fromarray(arr)
    for img in (rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA"), rgb.convert("CMYK"),
                rgb.convert("I;16"), rgb.convert("F"), rgb.convert("LA")):
        out = Decoder("transfer")(img)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # EXIF orientation 6 (rotate 90) is applied: a 60x40 image becomes 40x60
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    rgb.save(path, exif=exif.tobytes())
    assert open_image(path).size == (40, 60)


def test_decode_pipeline_keeps_order_and_reports_failures(tmp_path):
    make_bad_files(tmp_path)
    goods = []
    for i, a in enumerate(photos(5)):
        goods.append(tmp_path / f"g{i}.png")
        Image.fromarray(a).save(goods[-1])
    items = [goods[0], tmp_path / "zero.jpg", goods[1], goods[2], tmp_path / "bomb.png",
             goods[3], goods[4]]
    groups = [[0, 1, 2], [3, 4, 5], [6]]
    for workers in (0, 3):
        batches = list(ex.decode_batches(groups, items.__getitem__, Decoder("transfer"),
                                         num_workers=workers, strict=False))
        assert [b.positions for b in batches] == [[0, 2], [3, 5], [6]]
        assert [[p for p, _ in b.failures] for b in batches] == [[1], [4], []]
        assert batches[0].data.shape == (2, 224, 224, 3) and batches[0].data.dtype == torch.uint8
    with pytest.raises(ImageLoadError):
        list(ex.decode_batches(groups, items.__getitem__, Decoder("transfer"), num_workers=2))


@pytest.mark.slow
def test_threads_overlap_decoding_with_forward(r18_path, tmp_path):
    model = trex_hub.load(r18_path)
    imgs = [Image.fromarray(a) for a in photos(16, (500, 375))]
    model.extract(imgs[:2])
    t0 = time.perf_counter()
    a = model.extract(imgs, num_workers=0)
    t1 = time.perf_counter()
    b = model.extract(imgs, num_workers=2)
    t2 = time.perf_counter()
    assert torch.equal(a, b)
    assert t2 - t1 < (t1 - t0) * 1.5


@pytest.mark.benchmark
def test_benchmark_script_runs(tmp_path):
    """`benchmarks/extract_bench.py` end to end on a handful of images (timings meaningless)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "extract_bench.py"
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(script), "--images", "8", "--batch-size", "4",
                          "--rounds", "1", "--e2e-rounds", "1", "--skip-memory",
                          "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["model_only"]["rel_err"] < 1e-4 and results["e2e"]["rel_err"] < 1e-2
    assert "ratio_best" in results["e2e"] and "| model-only" in res.stdout
