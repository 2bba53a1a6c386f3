"""Dense features: ``load(..., features_only=True)``, timm's ``feature_info``, torchvision FPN."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import factories as fx
import trex_hub
from trex_hub.api import ModelLoadError
from trex_hub.model import FeatureMaps, TReX

pytestmark = pytest.mark.usefixtures("one_torch_thread")

X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "trex.pth"
    fx.write_backbone_file(path, arch="resnet50", seed=5)
    return path


@pytest.fixture(scope="module")
def maps(r50_file):
    return trex_hub.load(r50_file, features_only=True)


def test_stage_outputs_strides_channels_and_feature_info(maps, r50_file):
    assert isinstance(maps, FeatureMaps) and not maps.training
    info = maps.feature_info
    assert info.channels() == [256, 512, 1024, 2048]
    assert info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ["layer1", "layer2", "layer3", "layer4"]
    assert len(info) == 5 and info[0]["num_chs"] == 64 and info.reduction(0) == 2
    assert info.get_dicts(keys=["num_chs"], idx=[0]) == [{"num_chs": 64}]
    with torch.no_grad():
        outs = maps(X)
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 // r, 96 // r)
                                              for c, r in zip(info.channels(), info.reduction())]
    # the last map, pooled, is the model's own 2048-d feature
    model = trex_hub.load(r50_file)
    with torch.no_grad():
        assert torch.allclose(outs[-1].mean((2, 3)), model(X), atol=1e-5)
    assert set(maps.state_dict()) == {k for k in model.backbone.state_dict()}  # torchvision keys


def test_out_indices_pick_levels_and_stop_early(r50_file):
    maps = trex_hub.load(r50_file, features_only=True, out_indices=(0, -3))
    assert maps.out_indices == (0, 2) and maps.feature_info.channels() == [64, 512]
    assert not hasattr(maps, "layer3") and not hasattr(maps, "layer4")  # never run
    with torch.no_grad():
        stem, l2 = maps(X)
    assert stem.shape == (2, 64, 32, 48) and l2.shape == (2, 512, 8, 12)
    for bad in ((5,), (), (1, "x"), (-6,)):
        with pytest.raises(ValueError, match="pick levels from 0"):
            FeatureMaps(TReX("resnet18"), bad)
    with pytest.raises(ModelLoadError, match="drop projector=True"):
        trex_hub.load(r50_file, features_only=True, projector=True)


def test_same_maps_and_feature_info_as_timm(maps):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("resnet50", pretrained=False, features_only=True,
                            out_indices=(1, 2, 3, 4)).eval()
    ref.load_state_dict(maps.state_dict())  # strict: the same names
    assert ref.feature_info.channels() == maps.feature_info.channels()
    assert ref.feature_info.reduction() == maps.feature_info.reduction()
    assert ref.feature_info.module_name() == maps.feature_info.module_name()
    with torch.no_grad():
        for a, b in zip(maps(X), ref(X)):
            assert torch.equal(a, b)


def test_drops_into_torchvision_fpn_and_faster_rcnn(maps):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import FeaturePyramidNetwork

    channels = maps.feature_info.channels()
    fpn = FeaturePyramidNetwork(channels, out_channels=64).eval()
    with torch.no_grad():
        pyramid = fpn(OrderedDict((str(i), f) for i, f in enumerate(maps(X))))
    assert [tuple(v.shape[1:]) for v in pyramid.values()] == \
        [(64, 64 // r, 96 // r) for r in maps.feature_info.reduction()]

    names = maps.feature_info.module_name()
    backbone = BackboneWithFPN(maps, {n: str(i) for i, n in enumerate(names)}, channels, 64)
    torch.manual_seed(0)
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128).eval()
    with torch.no_grad():
        [det] = detector([torch.rand(3, 120, 128)])
    assert set(det) == {"boxes", "labels", "scores"} and det["boxes"].shape[1] == 4


def test_out_indices_as_timm_takes_them(r50_file):
    """An int n is the last n levels (timm's features_only); floats and bools are refused, not
    truncated; the check comes before any download."""
    maps = trex_hub.load(r50_file, features_only=True, out_indices=3)
    assert maps.out_indices == (2, 3, 4)
    assert maps.feature_info.module_name() == ["layer2", "layer3", "layer4"]
    for bad in (0, 6, True, (2.7,), (True,), "12"):
        with pytest.raises(ValueError, match="pick levels from 0"):
            FeatureMaps(TReX("resnet18"), bad)
    with pytest.raises(ValueError, match="pick levels from 0"):  # refused before resolving
        trex_hub.load("no-such-model-anywhere", features_only=True, out_indices=(2.5,))


def test_a_features_only_model_gives_its_transform(maps, r50_file):
    want = trex_hub.get_transform(trex_hub.load(r50_file))
    assert repr(trex_hub.get_transform(maps)) == repr(want)


def test_frozen_batchnorm_and_trainable_layers_as_torchvision_detection(r50_file):
    """frozen_bn keeps the pretrained statistics through a train-mode forward (a detector's
    batches of 1-2 images would otherwise rewrite them); trainable_layers=3 freezes the stem and
    layer1, as torchvision's resnet_fpn_backbone does; the state_dict keys stay torchvision's."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    live = trex_hub.load(r50_file, features_only=True)
    maps = trex_hub.load(r50_file, features_only=True, frozen_bn=True, trainable_layers=3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in maps.modules())
    assert isinstance(maps.layer2[0].bn1, FrozenBatchNorm2d)
    trainable = {n.split(".")[0] for n, p in maps.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    with torch.no_grad():
        want = live(X)
        maps.train()
        got = maps(X)
        again = maps(X)
    for a, b, c in zip(got, want, again):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5 and torch.equal(a, c)
    assert set(maps.state_dict()) == {k for k in live.state_dict()
                                      if not k.endswith("num_batches_tracked")}
    every = trex_hub.load(r50_file, features_only=True, trainable_layers=5)
    assert all(p.requires_grad for p in every.parameters())  # bn1 too, BatchNorm left live
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in every.modules())
    for bad in (6, -1, True, 2.0):
        with pytest.raises(ValueError, match="trainable_layers"):
            trex_hub.load("no-such-model-anywhere", features_only=True, trainable_layers=bad)
    with pytest.raises(ModelLoadError, match="add features_only=True"):
        trex_hub.load(r50_file, frozen_bn=True)
