import pytest
import torch
import torch.nn.functional as F
import torchvision

import factories as fx
from trex_hub.model import (Projector, PrototypeClassifier, TReX, cosine_logits,
                            imagenet_categories, prototypes_from_memory)


def test_backbone_matches_torchvision_resnet50():
    sd = fx.backbone_state_dict("resnet50", seed=5)
    ref = torchvision.models.resnet50(weights=None)
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(sd)
    model = TReX("resnet50")
    model.backbone.load_state_dict(sd)
    assert list(model.backbone.state_dict()) == list(sd)  # exactly torchvision's names
    ref.eval(), model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff <= 1e-5
    assert model.num_features == 2048 and model.out_dim == 2048
    assert isinstance(model.head, torch.nn.Identity)


@pytest.mark.parametrize("layers", [1, 3])
def test_projector_layout_and_init(layers):
    p = Projector(2048, num_layers=layers)
    keys = list(p.state_dict())
    expected = fx.head_state_dict(layers)
    assert sorted(keys) == sorted(expected)
    for k, v in p.state_dict().items():
        assert v.shape == expected[k].shape, k
    assert isinstance(p.layers[0], torch.nn.Module) and not list(p.layers[0].parameters())
    w = p.layers[1].fc.weight
    # trunc_normal(std=0.02) with the usual absolute bounds [-2, 2]
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max().item() <= 2.0
    assert torch.all(p.layers[1].fc.bias == 0)
    assert p.layers[layers + 1].bias is None and p.layers[layers + 1].weight.shape == (256, 2048)
    assert isinstance(p.layers[1].act, torch.nn.GELU)


@pytest.mark.parametrize("layers", [1, 3])
def test_projector_forward_matches_reference(layers):
    head = fx.head_state_dict(layers, seed=3)
    p = Projector(2048, num_layers=layers)
    p.load_state_dict(head)
    p.eval()
    feats = torch.randn(5, 2048).abs()
    with torch.no_grad():
        out = p(feats)
    ref = fx.reference_projector(feats, head, layers)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_projector_without_input_norm():
    p = Projector(16, num_layers=1, hidden_dim=8, out_dim=4, l2_norm=False).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert not torch.allclose(p(x), p(x * 2))
    p2 = Projector(16, num_layers=1, hidden_dim=8, out_dim=4).eval()
    with torch.no_grad():
        assert torch.allclose(p2(x), p2(x * 2), atol=1e-6)


def test_prototypes_are_normalised_class_sums_with_empty_classes_zero():
    feats = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 2])
    protos = prototypes_from_memory(feats, labels, num_classes=4)
    s0 = torch.tensor([4.0, 4.0]) / (32 ** 0.5)
    s2 = torch.tensor([-1.0, 2.0]) / (5 ** 0.5)
    assert torch.allclose(protos[0], s0) and torch.allclose(protos[2], s2)
    assert torch.all(protos[1] == 0) and torch.all(protos[3] == 0)
    clf = PrototypeClassifier(2, 4, tau=0.1)
    clf.prototypes.copy_(protos)
    z = torch.tensor([[2.0, 0.0]])
    logits = clf(z)
    assert torch.allclose(logits, torch.tensor([[(4 / 32 ** 0.5) / 0.1, 0.0,
                                                 (-1 / 5 ** 0.5) / 0.1, 0.0]]), atol=1e-5)
    assert torch.allclose(logits, cosine_logits(z, protos, 0.1), atol=1e-6)
    with pytest.raises(ValueError, match="labels must lie"):
        prototypes_from_memory(feats, torch.tensor([0, 1, 2, 9]), num_classes=4)


def test_classify_without_prototypes_names_the_models_that_have_them():
    model = TReX("resnet18")
    with pytest.raises(RuntimeError) as err:
        model.classify(torch.zeros(1, 3, 32, 32))
    assert "trex_repro" in str(err.value) and "trex_star_repro" in str(err.value)


def test_forward_returns_the_active_head():
    model = TReX("resnet18", projector={"num_layers": 1, "hidden_dim": 64, "out_dim": 16},
                 num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == (2, 512)
        assert torch.allclose(model(x), model.head(f))
        assert model.forward_logits(x).shape == (2, 10)
    assert model.out_dim == 16 and model.classifier.class_names is None


def test_config_round_trip_and_imagenet_names():
    model = TReX("resnet50", projector={"num_layers": 3}, num_classes=1000)
    assert model.classifier.class_names == imagenet_categories()
    assert len(imagenet_categories()) == 1000
    cfg = model.config()
    assert "class_names" not in cfg["classifier"]  # ImageNet names are implied
    again = TReX.from_config(cfg)
    assert again.config() == cfg
    assert F.normalize(torch.ones(1, 3), dim=-1).shape == (1, 3)


def test_prototype_classifier_needs_projector():
    with pytest.raises(ValueError, match="projector"):
        TReX("resnet18", num_classes=5)


@pytest.mark.parametrize("preset", ["transfer", "imagenet"])
def test_timm_resolves_the_models_own_preprocessing(preset):
    """timm.data.resolve_data_config(model=...) reads pretrained_cfg; without crop_pct it fell
    back to 0.875 and resized the transfer models' images to 256."""
    timm = pytest.importorskip("timm")
    import trex_hub

    model = TReX("resnet18", preprocess=preset)
    model.pretrained_cfg["license"] = "cc-by-nc-sa-4.0"
    model.set_preprocess(preset)  # keeps what is not preprocessing
    assert model.pretrained_cfg["license"] == "cc-by-nc-sa-4.0"
    cfg = timm.data.resolve_data_config({}, model=model)
    got, want = timm.data.create_transform(**cfg), trex_hub.get_transform(model)
    sizes = [(t.__class__.__name__, getattr(t, "size", None)) for t in got.transforms[:2]]
    assert sizes == [(t.__class__.__name__, getattr(t, "size", None))
                     for t in want.transforms[:2]]
