import argparse
import os
import pickle

import numpy as np
import pytest
import torch

import factories as fx
import trex_hub
from trex_hub.checkpoint import (CheckpointError, build_model, read_checkpoint, safe_globals,
                                 save_safetensors)
from trex_hub.model import prototypes_from_memory

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _forward(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def test_backbone_file_loads_into_torchvision_names(tmp_path):
    sd = fx.write_backbone_file(tmp_path / "trex.pth", arch="resnet50", seed=4)
    ckpt = read_checkpoint(tmp_path / "trex.pth")
    assert ckpt.format == "backbone" and ckpt.config["arch"] == "resnet50"
    assert not ckpt.has_projector and not ckpt.has_classifier
    model = trex_hub.load(tmp_path / "trex.pth")
    ref = fx.torchvision_backbone("resnet50", seed=4)
    assert (_forward(model) - _forward(ref)).abs().max() <= 1e-5
    for k, v in sd.items():
        assert torch.equal(model.backbone.state_dict()[k], v)


@pytest.mark.parametrize("layers", [1, 3])
def test_full_checkpoint_online_ema_and_prototypes(tmp_path, layers):
    path = tmp_path / "full.pth"
    ck = fx.write_full_checkpoint(path, num_layers=layers, arch="resnet18", seed=layers,
                                  num_classes=1000, memory_size=512)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) <= {
        "argparse.Namespace", "numpy.dtype", "numpy.ndarray",
        "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
        "numpy.dtypes.Float64DType"}
    model = trex_hub.load(path, projector=True)
    assert model.has_projector and model.head.num_layers == layers
    sd = ck["model"]
    online = fx.torchvision_backbone("resnet18", seed=layers)
    feats = _forward(online)
    ref = fx.reference_projector(feats, fx.strip(sd, "module.model.head."), layers)
    assert torch.allclose(_forward(model), ref, atol=1e-5, rtol=1e-4)
    # the online encoder by default, the EMA copy on request
    ema = trex_hub.load(path, projector=True, ema=True)
    ema_ref = fx.torchvision_backbone("resnet18", seed=layers + 100)
    assert torch.allclose(ema.forward_features(X), _forward(ema_ref), atol=1e-5)
    assert not torch.allclose(ema.forward_features(X), model.forward_features(X))
    # prototypes: normalised per-class sums of the memory, computed by hand
    feats_m, labels = sd["module.memory.features"], sd["module.memory.labels"]
    hand = torch.zeros(1000, 256)
    for f, y in zip(feats_m, labels):
        hand[y] += f
    norms = hand.norm(dim=1, keepdim=True)
    hand = torch.where(norms > 0, hand / norms.clamp_min(1e-12), hand)
    assert torch.allclose(model.classifier.prototypes, hand, atol=1e-5)
    assert model.classifier.tau == 0.1
    # backbone-only view of the same file
    bb = trex_hub.load(path)
    assert not bb.has_projector and bb.classifier is None
    assert torch.allclose(_forward(bb), feats, atol=1e-5)


def test_classify_matches_hand_computation(tmp_path):
    path = tmp_path / "full.pth"
    labels = torch.arange(512) % 1000
    fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=512, labels=labels)
    model = trex_hub.load(path, projector=True)
    img = np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)
    top = model.classify([img, img], topk=5)
    assert len(top) == 2 and len(top[0]) == 5
    z = model.extract([img])
    logits = torch.nn.functional.normalize(z, dim=-1) @ model.classifier.prototypes.t() / 0.1
    probs = logits.softmax(-1)[0]
    want = probs.topk(5)
    assert [p.index for p in top[0]] == want.indices.tolist()
    assert np.allclose([p.prob for p in top[0]], want.values.tolist(), atol=1e-5)
    assert top[0][0].label == trex_hub.model.imagenet_categories()[top[0][0].index]
    assert top[0] == top[1]


def test_plain_classifier_variant(tmp_path):
    path = tmp_path / "plain.pth"
    ck = fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", ocm=False, num_classes=10)
    model = trex_hub.load(path, projector=True)
    w = ck["model"]["module.clf.fc.weight"]
    assert torch.allclose(model.classifier.prototypes, torch.nn.functional.normalize(w, dim=-1))
    assert model.classifier.num_classes == 10 and model.classifier.class_names is None


def test_allow_list_is_minimal():
    names = {getattr(g[0] if isinstance(g, tuple) else g, "__name__", "") for g in safe_globals()}
    assert names <= {"Namespace", "ndarray", "dtype", "_reconstruct", "Float64DType"}


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": evil}, path)
    with pytest.raises(CheckpointError) as err:
        trex_hub.load(path)
    assert "refused" in str(err.value) and "weights_only" in str(err.value)
    assert not marker.exists()
    # also as a raw pickle stream (legacy format)
    raw = tmp_path / "evil_legacy.pth"
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(CheckpointError):
        read_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_non_checkpoint_files_get_clear_errors(tmp_path):
    fx.write_backbone_file(tmp_path / "ok.pth", arch="resnet18")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth.*truncated or corrupted"):
        trex_hub.load(tmp_path / "cut.pth")
    (tmp_path / "notes.pth").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes.pth: not a readable PyTorch checkpoint"):
        trex_hub.load(tmp_path / "notes.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth"):
        trex_hub.load(tmp_path / "empty.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        trex_hub.load(tmp_path / "list.pth")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    sd = fx.backbone_state_dict("resnet18")
    bad = dict(sd)
    del bad["layer4.1.bn2.weight"]
    bad["layer9.extra"] = torch.zeros(3)
    bad["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        trex_hub.load(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing: layer4.1.bn2.weight" in msg.replace("backbone.", "")
    assert "layer9.extra" in msg and "conv1.weight (64, 3, 5, 5)" in msg


def test_unexpected_entries_in_full_checkpoint_are_named(tmp_path):
    path = tmp_path / "full.pth"
    ck = fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=64)
    ck["model"]["module.teacher.weight"] = torch.zeros(2)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="module.teacher.weight"):
        read_checkpoint(path)


def test_torchvision_classifier_and_ddp_prefix_are_accepted(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "tv.pth")
    model = trex_hub.load(tmp_path / "tv.pth")
    net.fc = torch.nn.Identity()
    assert torch.allclose(_forward(model), _forward(net), atol=1e-5)


def test_ema_needs_a_full_checkpoint(tmp_path):
    fx.write_backbone_file(tmp_path / "b.pth", arch="resnet18")
    with pytest.raises(CheckpointError, match="ema=True needs a full training checkpoint"):
        read_checkpoint(tmp_path / "b.pth", ema=True)


def test_safetensors_folder_round_trip_is_bit_identical(tmp_path):
    path = tmp_path / "full.pth"
    fx.write_full_checkpoint(path, num_layers=3, arch="resnet18", memory_size=256, num_classes=7,
                             hidden=64, out=32)
    model = trex_hub.load(path, projector=True)
    folder = save_safetensors(model, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    again = trex_hub.load(folder, projector=True)
    assert torch.equal(_forward(model), _forward(again))
    assert torch.equal(model.classifier.prototypes, again.classifier.prototypes)
    assert again.config() == model.config()
    # a lone safetensors file of backbone weights also loads
    from safetensors.torch import save_file

    save_file(fx.backbone_state_dict("resnet18"), str(tmp_path / "bb.safetensors"))
    assert trex_hub.load(tmp_path / "bb.safetensors").arch == "resnet18"


def test_build_model_can_drop_the_projector(tmp_path):
    path = tmp_path / "full.pth"
    fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=64)
    ckpt = read_checkpoint(path)
    full, bb = build_model(ckpt), build_model(ckpt, projector=False)
    assert full.has_projector and not bb.has_projector
    assert torch.equal(_forward(bb), full.eval().forward_features(X).detach())


def test_namespace_args_survive(tmp_path):
    path = tmp_path / "full.pth"
    fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=64)
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt.extra["args"]["lr_schedule"], np.ndarray)
    assert ckpt.extra["args"]["lr_schedule"].dtype == np.float64
    assert ckpt.extra["epoch"] == 100
    assert isinstance(argparse.Namespace(**ckpt.extra["args"]), argparse.Namespace)
    assert prototypes_from_memory is not None


def test_a_zip_checkpoint_cut_short_is_called_corrupt_not_unreadable(tmp_path):
    """torch's zip reader raises OSError(EINVAL) for an archive shorter than its end-of-directory
    window: the bytes' fault (a cache deletes such a file), not the environment's."""
    from trex_hub.checkpoint import CheckpointReadError

    path = tmp_path / "b.pth"
    fx.write_backbone_file(path, arch="resnet18")
    cut = tmp_path / "cut.pth"
    for size in (100, 30_000, 60_000):
        cut.write_bytes(path.read_bytes()[:size])
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
            read_checkpoint(cut)
        assert not isinstance(info.value, CheckpointReadError)


def test_args_resaved_as_a_dict_load_like_the_namespace(tmp_path):
    """``ckpt["args"] = vars(ckpt["args"])`` is how a released checkpoint is made loadable by a
    plain ``weights_only`` torch.load: same model, same options."""
    path = tmp_path / "full.pth"
    ck = fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=64)
    ns = read_checkpoint(path)
    ck["args"] = vars(ck["args"])
    torch.save(ck, tmp_path / "dict.pth")
    as_dict = read_checkpoint(tmp_path / "dict.pth")
    assert as_dict.config == ns.config and as_dict.extra["args"].keys() == ns.extra["args"].keys()
    assert all(torch.equal(v, ns.state_dict[k]) for k, v in as_dict.state_dict.items())


@pytest.mark.parametrize("args, message", [
    (["resnet18"], "'args' must hold the training options.*found list"),
    ({"tau": "abc"}, "args.tau must be a positive number, found 'abc'"),
    ({"tau": float("nan")}, "args.tau must be a positive number"),
    ({"tau": -1.0}, "args.tau must be a positive number"),
    ({"num_classes": 10 ** 12}, "the OCM memory needs 1000000000000 classes.*at most 100,000"),
    ({"num_classes": 2.5}, "the OCM memory needs 2.5 classes"),
    ({"projector_l2_norm": "False"}, "args.projector_l2_norm must be true or false"),
    ({"arch": ["resnet50"]}, "args.arch is \\['resnet50'\\] but the weights are resnet18"),
])
def test_bad_training_args_are_named_before_anything_is_allocated(tmp_path, args, message):
    path = tmp_path / "full.pth"
    ck = fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=64)
    ck["args"] = args if not isinstance(args, dict) else dict(vars(ck["args"]), **args)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=f"{path}: {message}"):
        read_checkpoint(path)


def test_class_names_of_a_training_run_label_classify_on_the_checkpoint(tmp_path):
    """``trex-train`` keeps the class names in ``args.class_names``: loading the checkpoint
    itself labels ``classify`` with them, as its export does (it gave '4' for 'Coat')."""
    names = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"]
    path = tmp_path / "full.pth"
    ck = fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=64,
                                  labels=torch.arange(64) % 5)
    ck["args"] = dict(vars(ck["args"]), num_classes=5, class_names=names)
    torch.save(ck, path)
    assert read_checkpoint(path).config["classifier"]["class_names"] == names
    model = trex_hub.load(path, projector=True)
    top = model.classify(torch.rand(2, 3, 32, 32), topk=5)
    assert {p.label for row in top for p in row} == set(names)
    # names of other classes, or not names: indices, as before, and the weights still load
    for other in (names[:3], "Coat", list(range(5)), {"a": 1}):
        ck["args"]["class_names"] = other
        torch.save(ck, path)
        assert "class_names" not in read_checkpoint(path).config["classifier"]


def test_a_huge_memory_label_is_refused_not_allocated(tmp_path):
    path = tmp_path / "full.pth"
    labels = torch.zeros(64, dtype=torch.long)
    labels[3] = 10 ** 12  # would ask for a [10**12, 256] prototype table
    ck = fx.write_full_checkpoint(path, num_layers=1, arch="resnet18", memory_size=64,
                                  labels=labels)
    ck["args"] = dict(vars(ck["args"]), num_classes=None)  # the labels decide
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="needs 1000000000001 classes"):
        read_checkpoint(path)
    ck["model"]["module.memory.labels"] = labels.float()
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="memory.labels' must hold integers"):
        read_checkpoint(path)


def test_every_tensor_comes_from_the_checkpoint_and_absent_counters_start_at_zero(tmp_path):
    # the model is built without random initialisation: each tensor must be the file's
    sd = fx.backbone_state_dict("resnet18", seed=7)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "bb.pth")
    model = build_model(read_checkpoint(tmp_path / "bb.pth"))
    got = model.backbone.state_dict()
    for k, v in got.items():
        if k.endswith("num_batches_tracked"):
            assert v.item() == 0, k
        else:
            assert torch.equal(v, sd[k]), k
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())


def test_a_buffer_outside_the_state_dict_keeps_its_initialisation(tmp_path, monkeypatch):
    import trex_hub.checkpoint as ckmod

    class WithScratch(ckmod.TReX):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("scratch", torch.full((4,), 3.0), persistent=False)

    monkeypatch.setattr(ckmod, "TReX", WithScratch)
    fx.write_backbone_file(tmp_path / "bb.pth", arch="resnet18", seed=1)
    model = build_model(read_checkpoint(tmp_path / "bb.pth"))
    assert torch.equal(model.scratch, torch.full((4,), 3.0))


def _rewrite_tensors(folder, convert):
    """Rewrite an export's model.safetensors with ``convert(name, tensor)`` applied."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    save_file({k: convert(k, v).contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_integer_or_bool_weights_are_refused_naming_the_keys(tmp_path, dtype):
    """Review F #9: load_state_dict would cast them into the float parameters silently."""
    torch.manual_seed(0)
    folder = save_safetensors(trex_hub.TReX("resnet18"), tmp_path / "export")
    _rewrite_tensors(folder, lambda k, v: v.to(dtype) if v.is_floating_point() else v)
    kind = str(dtype).replace("torch.", "")
    with pytest.raises(CheckpointError, match=rf"does not fit the resnet18 t-ReX model; wrong "
                                              rf"dtype: backbone\.\S+ {kind} \(expected a "
                                              r"floating type\)") as info:
        trex_hub.load(folder)
    assert "\n" not in str(info.value) and "more" in str(info.value)  # many keys, a few named


def test_half_precision_weights_upcast_and_non_count_counters_refused(tmp_path):
    torch.manual_seed(0)
    model = trex_hub.TReX("resnet18").eval()
    folder = save_safetensors(model, tmp_path / "export")
    _rewrite_tensors(folder, lambda k, v: v.float() + 0.5 if k.endswith("num_batches_tracked")
                     else v)
    with pytest.raises(CheckpointError, match=r"wrong dtype: backbone\.bn1\.num_batches_tracked "
                                              r"float32 \(expected an integer type\)"):
        trex_hub.load(folder)
    for half in (torch.float16, torch.bfloat16):
        folder = save_safetensors(model, tmp_path / str(half))
        _rewrite_tensors(folder, lambda k, v: v.to(half) if v.is_floating_point() else v)
        loaded = trex_hub.load(folder)
        want = model.state_dict()["backbone.conv1.weight"].to(half).float()
        assert loaded.backbone.conv1.weight.dtype == torch.float32
        assert torch.equal(loaded.backbone.conv1.weight, want)


def _trained_backbone(counter: int) -> dict:
    sd = fx.backbone_state_dict("resnet18", seed=5)
    return {k: torch.tensor(counter) if k.endswith("num_batches_tracked") else v
            for k, v in sd.items()}


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_a_checkpoint_halved_whole_counters_included_loads(tmp_path, half):
    """Review I #3: ``{k: v.half() for k, v in sd.items()}`` turns the BatchNorm counters into
    floats; they are cast back (an fp16-overflowed one restarts at 0) and the features agree
    with the float copy's within half precision."""
    sd = _trained_backbone(1000)
    sd["layer1.0.bn1.num_batches_tracked"] = torch.tensor(70000)  # over float16's 65504: inf
    torch.save({k: v.to(half) for k, v in sd.items()}, tmp_path / "half.pth")
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
               tmp_path / "float.pth")
    halved = trex_hub.load(tmp_path / "half.pth").eval()
    ref = trex_hub.load(tmp_path / "float.pth").eval()
    bn = halved.backbone.bn1
    assert bn.num_batches_tracked.dtype == torch.int64 and int(bn.num_batches_tracked) == 1000
    overflowed = halved.backbone.layer1[0].bn1.num_batches_tracked
    assert int(overflowed) == (0 if half == torch.float16 else 70144)  # bf16 rounds, never inf
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(halved(x), ref(x), rtol=0.05, atol=0.05)


def test_integer_weights_are_still_refused_beside_float_counters(tmp_path):
    sd = {k: v.half() for k, v in _trained_backbone(10).items()}
    sd["conv1.weight"] = sd["conv1.weight"].to(torch.int8)
    torch.save(sd, tmp_path / "q.pth")
    with pytest.raises(CheckpointError, match=r"wrong dtype: backbone\.conv1\.weight int8 "
                                              r"\(expected a floating type\) \(integer or bool "
                                              r"data is not cast into weights") as info:
        trex_hub.load(tmp_path / "q.pth")
    assert "num_batches_tracked" not in str(info.value)
