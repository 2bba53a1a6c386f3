"""get_transform: the preprocessing that travels with the weights, as a torchvision transform."""
import numpy as np
import pytest
import torch
from PIL import Image

import trex_hub
from trex_hub import preprocess as pp
from trex_hub.model import TReX
from trex_hub.transforms import build_transform, get_transform, preset_geometry

IMG = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), np.uint8))


def same(a, b, img=IMG):
    return torch.equal(a(img), b(img))


@pytest.mark.parametrize("preset", ["transfer", "imagenet"])
def test_equal_outputs_to_build_transform_for_both_presets(preset):
    ref = build_transform(preset)
    assert same(get_transform("trex_star", preset=preset), ref)
    assert same(get_transform(None, preset=preset), ref)
    assert same(get_transform(pp.PRESETS[preset]), ref)
    assert same(get_transform(TReX("resnet18", preprocess=preset)), ref)
    assert get_transform(None, preset=preset)(IMG).shape == (3, 224, 224)


def test_the_weights_own_config_is_the_default():
    # every released model carries the paper's transfer protocol
    for name in trex_hub.list_models():
        assert same(get_transform(name), build_transform("transfer"))
        assert trex_hub.model_info(name)["preprocess"]["interpolation"] == "bicubic"
    assert same(get_transform("T-ReX*"), build_transform("transfer"))
    model = TReX("resnet18", preprocess=pp.PreprocessConfig(resize=64, crop=48,
                                                            mean=(0.5,) * 3, std=(0.5,) * 3))
    out = get_transform(model)(IMG)
    assert out.shape == (3, 48, 48)
    # a preset replaces the geometry and keeps the weights' mean/std
    geo = get_transform(model, preset="imagenet")(IMG)
    ref = build_transform("imagenet")(IMG)
    mean = torch.tensor(pp.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(pp.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(geo * 0.5 + 0.5, ref * std + mean, atol=1e-6)


def test_registry_models_carry_their_config_onto_the_model():
    for name in ("trex", "trex_repro"):  # pretrained=False: no download
        model = trex_hub.load(name, pretrained=False)
        assert model.preprocess_config == pp.PRESETS["transfer"]
        assert model.pretrained_cfg["name"] == name
        assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_clear_errors():
    with pytest.raises(ValueError, match="not a registry model.*trex_hub.load"):
        get_transform("some/path.pth")
    with pytest.raises(TypeError, match="registry name, a TReX model"):
        get_transform(42)
    with pytest.raises(ValueError, match="unknown preprocess 'bogus'"):
        get_transform("trex", preset="bogus")
    with pytest.raises(ValueError, match="interpolation 'cubic' is not one of"):
        pp.PreprocessConfig(interpolation="cubic")
    with pytest.raises(ValueError, match="unknown preprocessing keys \\['size'\\]"):
        pp.PreprocessConfig.from_dict({"size": 3})


def test_preset_geometry_comes_from_the_presets():
    for name, cfg in pp.PRESETS.items():
        resize, crop, interp = preset_geometry(name)
        assert (resize, crop, interp.value) == (cfg.resize, cfg.crop, cfg.interpolation)
    assert preset_geometry(None) is None


def test_an_extreme_aspect_ratio_is_refused_before_the_resize(tmp_path):
    """A 140-byte 1 x 20,000 PNG passed the decompression-bomb check, then Resize(224) made a
    224 x 4,480,000 image (5 GB, 13 s) for the centre crop to throw away."""
    import time

    from trex_hub.cli.extract import main
    from trex_hub.featurefile import read_features
    from trex_hub.transforms import Decoder, ImageLoadError, resized_size

    import factories as fx

    assert resized_size(500, 375, 224) == (298, 224) and resized_size(1, 20000, 224) == (
        224, 4480000)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (20000, 1), (128, 128, 128)).save(folder / "thin.png")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(folder / "ok.png")
    t0 = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"thin.png\): refused: resizing 20000x1 to a "
                                             r"shorter side of 224 px would make 4480000x224"):
        Decoder("transfer")(folder / "thin.png")
    assert time.perf_counter() - t0 < 2
    # the limit is the decompression-bomb limit: a wide image far below it is decoded as before
    assert Decoder("transfer")(Image.new("RGB", (3000, 10))).shape == (224, 224, 3)
    # a small --max-pixels (thumbnails) bounds the source, not the resize every image needs
    tiny = Decoder("transfer", max_pixels=10_000)
    assert tiny(Image.new("RGB", (64, 48))).shape == (224, 224, 3)
    assert tiny(Image.new("RGB", (150, 20))).shape == (224, 224, 3)  # 7.5:1, under the floor
    with pytest.raises(ImageLoadError, match="over the limit of 3211264 .an extreme aspect"):
        tiny(Image.new("RGB", (2000, 20)))  # 100:1
    ckpt = tmp_path / "r18.pth"
    fx.write_backbone_file(ckpt, arch="resnet18")
    for decode in ("cpu", "gpu"):  # the tensor path leaves it to PIL, which refuses it
        out = tmp_path / f"{decode}.npy"
        assert main([str(ckpt), str(folder), "-o", str(out), "-q", "--decode", decode]) == 0
        feats, rows = read_features(out)
        by_name = {r["path"]: r for r in rows}
        assert feats.shape[0] == 1 and by_name["thin.png"]["status"] == "failed"
        assert "extreme aspect ratio" in by_name["thin.png"]["error"]
