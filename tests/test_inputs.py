"""model.extract(): every input kind of the public contract, and every bad input."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import factories as fx
import trex_hub
from trex_hub.transforms import ImageLoadError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "r18.pth"
    fx.write_backbone_file(path, arch="resnet18", seed=0)
    return trex_hub.load(path)


def rgb_array(h=70, w=90, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference(model, pil, preprocess="transfer"):
    if preprocess == "transfer":
        ops = [T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)]
    elif preprocess == "imagenet":
        ops = [T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224)]
    else:
        ops = []
    x = T.Compose(ops + [T.ToTensor(), T.Normalize(MEAN, STD)])(pil).unsqueeze(0)
    with torch.no_grad():
        return model(x)


def test_every_input_kind_gives_the_same_features(model, tmp_path):
    arr = rgb_array()
    pil = Image.fromarray(arr)
    pil.save(tmp_path / "a.png")
    items = [str(tmp_path / "a.png"), tmp_path / "a.png", pil, arr,
             torch.from_numpy(arr).permute(2, 0, 1).contiguous()]
    feats = model.extract(items)
    assert feats.shape == (5, 512) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    ref = reference(model, pil)
    for row in feats:
        assert torch.allclose(row, ref[0], atol=1e-4, rtol=1e-4)
    # single items give a batch of one; generators work; numpy output
    assert model.extract(pil).shape == (1, 512)
    gen = (x for x in [arr, arr])
    out = model.extract(gen, output="numpy", batch_size=1)
    assert isinstance(out, np.ndarray) and out.shape == (2, 512) and out.dtype == np.float32


def test_uint8_batches_and_normalised_float_batch(model):
    arrs = np.stack([rgb_array(seed=i) for i in range(3)])
    via_numpy = model.extract(arrs)  # N x H x W x C uint8
    via_tensor = model.extract(torch.from_numpy(arrs).permute(0, 3, 1, 2))  # N x C x H x W
    assert via_numpy.shape == (3, 512) and torch.allclose(via_numpy, via_tensor, atol=1e-5)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    assert torch.allclose(model.extract(x, batch_size=3), want, atol=1e-5)
    assert torch.allclose(model.extract(x[0]), want[:1], atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F",
                                  "YCbCr", "1"])
def test_any_pil_mode_becomes_rgb(model, mode):
    base = Image.fromarray(rgb_array())
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype("<u2"))
        assert img.mode == "I;16"
        expect = base.convert("L").convert("RGB")
    elif mode == "PA":
        img = base.convert("P").convert("PA")
        expect = None
    else:
        img = base.convert(mode)
        expect = None
    feats = model.extract(img)
    assert feats.shape == (1, 512) and torch.isfinite(feats).all()
    if expect is not None:
        assert torch.allclose(feats, reference(model, expect), atol=1e-4, rtol=1e-4)


def test_grayscale_arrays(model):
    gray = rgb_array()[:, :, 0]
    rgb = Image.fromarray(gray).convert("RGB")
    ref = reference(model, rgb)
    assert torch.allclose(model.extract(gray), ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(model.extract(gray[:, :, None]), ref, atol=1e-4, rtol=1e-4)


def test_transparent_pixels_are_flattened_on_white(model):
    rgba = np.zeros((50, 60, 4), np.uint8)  # fully transparent black
    white = Image.new("RGB", (60, 50), (255, 255, 255))
    assert torch.allclose(model.extract(rgba), reference(model, white), atol=1e-4, rtol=1e-4)


def test_exif_orientation_is_applied(model, tmp_path):
    arr = rgb_array(60, 100)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = Image.open(tmp_path / "rot.jpg").transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (60, 100)
    assert torch.allclose(model.extract(tmp_path / "rot.jpg"), reference(model, upright),
                          atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("preset", ["transfer", "imagenet"])
def test_preprocess_presets(model, preset):
    pil = Image.fromarray(rgb_array(300, 400))
    assert torch.allclose(model.extract(pil, preprocess=preset), reference(model, pil, preset),
                          atol=1e-4, rtol=1e-4)


def test_preprocess_none_keeps_the_size(model):
    pil = Image.fromarray(rgb_array(64, 64))
    assert torch.allclose(model.extract(pil, preprocess=None), reference(model, pil, None),
                          atol=1e-4, rtol=1e-4)


def test_normalize_and_empty_input(model):
    feats = model.extract([rgb_array(), rgb_array(seed=1)], normalize=True)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)
    empty = model.extract([])
    assert empty.shape == (0, 512) and empty.dtype == torch.float32
    assert model.extract([], output="numpy").shape == (0, 512)


def test_bad_items_name_their_index_and_path(model, tmp_path):
    good = rgb_array()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(rgb_array(200, 200)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:300])
    cases = {
        str(tmp_path / "missing.jpg"): "missing.jpg",
        str(tmp_path / "empty.jpg"): "empty.jpg",
        str(tmp_path / "notes.jpg"): "notes.jpg",
        str(tmp_path / "cut.jpg"): "cut.jpg",
    }
    for bad, name in cases.items():
        with pytest.raises(ImageLoadError) as err:
            model.extract([good, good, bad])
        assert "item 2" in str(err.value) and name in str(err.value)
    with pytest.raises(ImageLoadError, match="item 1.*uint8"):
        model.extract([good, good.astype(np.float32)])
    with pytest.raises(ImageLoadError, match="item 0.*shape"):
        model.extract([np.zeros((5, 5, 7), np.uint8)])
    with pytest.raises(ImageLoadError, match="item 0.*unsupported input type"):
        model.extract([{"not": "an image"}])
    with pytest.raises(ValueError, match="preprocess"):
        model.extract(good, preprocess="bogus")


def test_decompression_bomb_is_refused(model, tmp_path, monkeypatch):
    Image.fromarray(rgb_array(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2x the limit
    with pytest.raises(ImageLoadError, match="item 0.*big.png"):
        model.extract([tmp_path / "big.png"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_extract_on_cuda(tmp_path):
    path = tmp_path / "r18.pth"
    fx.write_backbone_file(path, arch="resnet18")
    cpu = trex_hub.load(path)
    gpu = trex_hub.load(path, device="cuda")
    arr = rgb_array()
    out = gpu.extract([arr, arr])
    assert out.device.type == "cpu" and out.dtype == torch.float32
    ref = cpu.extract([arr, arr])
    # precision="fp32" (the default) is full fp32 on CUDA: TF32 is off inside the call
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    for precision in ("bf16", "fp16"):
        low = gpu.extract([arr, arr], precision=precision)
        assert float((low - ref).abs().max() / ref.abs().max()) < 1e-2, precision


def test_a_3d_array_is_one_image(model):
    """A 3-D array is one HxWxC image, however short: a 4x64 RGB strip is not 4 rows."""
    strip = rgb_array(4, 64)
    feats = model.extract(strip)
    assert feats.shape == (1, 512)
    assert torch.allclose(feats, reference(model, Image.fromarray(strip)), atol=1e-4, rtol=1e-4)


def test_channels_first_arrays_are_refused_with_the_fix(model):
    """A CxHxW array (torch's layout) is not taken as C grayscale images: the error names the
    shape and the transpose that fixes it, as an image alone, in a list or in a 4-D batch."""
    chw = np.ascontiguousarray(rgb_array(64, 64).transpose(2, 0, 1))
    rgba = np.concatenate([chw, chw[:1]])
    for images, shape in ((chw, chw.shape), ([chw], chw.shape), (chw[None], chw.shape),
                          (rgba, (4, 64, 64))):
        with pytest.raises(ImageLoadError) as err:
            model.extract(images)
        msg = str(err.value)
        assert "item 0" in msg and str(shape) in msg, msg
        assert "transpose(1, 2, 0)" in msg and "list(arr)" in msg, msg
    # an NxHxW stack of grayscale images (MNIST-style) is N images, as it always was; one of a
    # single image is that image either way
    stack = np.stack([rgb_array(28, 28, seed=i)[..., 0] for i in range(5)])
    assert torch.equal(model.extract(stack), model.extract(list(stack)))
    assert model.extract(stack).shape == (5, 512) and model.extract(stack[:1]).shape == (1, 512)
    # the documented batches still work: a list, and an NxHxWxC array
    arrs = np.stack([rgb_array(seed=i) for i in range(2)])
    assert model.extract(list(arrs)).shape == model.extract(arrs).shape == (2, 512)
