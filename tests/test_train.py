"""Training building blocks: memory FIFO, prototypes, EMA, schedule, SGD groups, the loss, crops;
the options: help text, defaults, the default output folder."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trex_hub.train.augment import MultiCrop, MultiCropDataset, sample_crop_box
from trex_hub.train.module import Net, TrainModule, param_groups
from trex_hub.train.ocm import MemoryBank, ema_update
from trex_hub.train.schedule import lr_schedule, peak_lr

PROJ = {"num_layers": 1, "hidden_dim": 32, "out_dim": 16, "l2_norm": True}


# --------------------------------------------------------------------------------- memory bank
def test_memory_init_randn_and_random_labels():
    torch.manual_seed(0)
    mem = MemoryBank(size=4096, dim=8, num_classes=7)
    assert mem.features.shape == (4096, 8) and mem.features.dtype == torch.float32
    assert abs(float(mem.features.mean())) < 0.05 and abs(float(mem.features.std()) - 1) < 0.05
    assert mem.labels.dtype == torch.long and set(mem.labels.tolist()) == set(range(7))
    assert mem.ptr.tolist() == [0] and mem.ptr.dtype == torch.long
    assert sorted(dict(mem.named_buffers())) == ["features", "labels", "ptr"]


def test_memory_fifo_truncation_and_wrap():
    mem = MemoryBank(size=10, dim=2, num_classes=5)
    batch = lambda start, n: (torch.arange(start, start + n).float()[:, None].repeat(1, 2),  # noqa: E731
                              torch.arange(start, start + n) % 5)
    mem.update(*batch(100, 4))
    assert mem.ptr.item() == 4
    mem.update(*batch(200, 4))
    assert mem.ptr.item() == 8
    assert mem.features[:8, 0].tolist() == [100, 101, 102, 103, 200, 201, 202, 203]
    # 4 more do not fit: the first 2 go to slots 8, 9, the rest is dropped, the pointer wraps
    before = mem.features[:8].clone()
    mem.update(*batch(300, 4))
    assert mem.ptr.item() == 0
    assert mem.features[8:, 0].tolist() == [300, 301]
    assert mem.labels[8:].tolist() == [0, 1]
    assert torch.equal(mem.features[:8], before)
    # the next batch overwrites the oldest entries from slot 0
    mem.update(*batch(400, 3))
    assert mem.ptr.item() == 3
    assert mem.features[:4, 0].tolist() == [400, 401, 402, 103]
    # exactly reaching the end wraps too; a batch larger than the memory is truncated
    mem.update(*batch(500, 7))
    assert mem.ptr.item() == 0
    mem.update(*batch(600, 25))
    assert mem.ptr.item() == 0 and mem.features[:, 0].tolist() == list(range(600, 610))


def test_prototypes_are_normalised_class_sums_with_zero_rows():
    mem = MemoryBank(size=6, dim=3, num_classes=4)
    feats = torch.tensor([[1., 0, 0], [3, 4, 0], [0, 0, 2], [0, 1, 0], [2, 0, 0], [0, 0, 1]])
    labels = torch.tensor([0, 1, 2, 0, 0, 2])
    mem.update(feats, labels)
    protos = mem.prototypes()
    expected = torch.zeros(4, 3)
    for f, c in zip(feats, labels):
        expected[c] += f
    for c in range(3):
        expected[c] = expected[c] / expected[c].norm()
    assert torch.allclose(protos, expected, atol=1e-6)
    assert torch.equal(protos[3], torch.zeros(3))  # class 3 has no entry


def test_ema_update_parameters_only():
    torch.manual_seed(0)
    online, ema = Net("resnet18", PROJ), Net("resnet18", PROJ)
    ema_before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        online.encoder.bn1.running_mean.fill_(5.0)
    ema_update(ema, online, 0.999)
    params = dict(online.named_parameters())
    for name, p in ema.named_parameters():
        want = 0.999 * ema_before[name] + 0.001 * params[name]
        assert torch.allclose(p, want, rtol=0, atol=1e-7), name
    for name, b in ema.named_buffers():
        assert torch.equal(b, ema_before[name]), name  # BatchNorm statistics are not averaged


# ------------------------------------------------------------------------------ lr and groups
def test_schedule_warmup_end_and_last_step():
    peak = peak_lr(0.1, 256)
    assert peak == pytest.approx(0.1)
    assert peak_lr(0.1, 1024) == pytest.approx(0.4) and peak_lr(0.1, 64, 0) == 0.1
    sched = lr_schedule(peak, 1e-6, epochs=100, iters_per_epoch=50, warmup_epochs=10)
    assert sched.dtype == np.float64 and sched.shape == (5000,)
    warm = 500
    assert sched[0] == 0.0
    assert sched[warm - 1] == pytest.approx(peak * (warm - 1) / warm)
    assert np.all(np.diff(sched[:warm + 1]) > 0)
    assert sched[warm] == pytest.approx(peak)  # warm-up ends at the peak
    assert np.all(np.diff(sched[warm:]) <= 0)
    assert sched[-1] == pytest.approx(1e-6, abs=1e-15)  # cosine reaches min_lr at the last step
    mid = warm + (5000 - warm - 1) // 2
    assert sched[mid] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + np.cos(np.pi * (mid - warm) / (5000 - warm - 1))))


def test_weight_decay_groups():
    module = TrainModule("resnet18", PROJ, num_classes=5, memory_size=16)
    groups = param_groups(module, 1e-4)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim <= 1 for p in groups[1]["params"])
    ids = {id(p) for g in groups for p in g["params"]}
    online = {id(p) for p in module.model.parameters()}
    assert ids == online  # every online parameter once; no EMA parameter, memory holds buffers
    assert not any(id(p) in ids for p in module.model_ema.parameters())
    names = {id(p): n for n, p in module.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert "model.encoder.bn1.weight" in no_decay and "model.head.layers.1.fc.bias" in no_decay
    plain = TrainModule("resnet18", PROJ, num_classes=5, memory_size=0)
    decayed = {id(p) for p in param_groups(plain, 1e-4)[0]["params"]}
    assert id(plain.clf.fc.weight) in decayed
    assert all(g["weight_decay"] == 1e-4 for g in param_groups(plain, 1e-4, exclude_1d=False)[:1])
    assert len(param_groups(plain, 1e-4, exclude_1d=False)[1]["params"]) == 0


# --------------------------------------------------------------------------------------- loss
def test_loss_matches_hand_computation_and_memory_gets_ema_outputs():
    torch.manual_seed(0)
    module = TrainModule("resnet18", PROJ, num_classes=3, tau=0.1, memory_size=20)
    with torch.no_grad():  # make the EMA copy differ from the online network
        for p in module.model_ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    module.train()
    glob = torch.randn(4, 3, 16, 16)
    locs = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    labels = torch.tensor([0, 2, 1, 2])
    mem_feats, mem_labels = module.memory.features.clone(), module.memory.labels.clone()

    calls = {"encoder": [], "head": 0}
    h1 = module.model.encoder.register_forward_hook(
        lambda m, i, o: calls["encoder"].append(tuple(i[0].shape)))
    h2 = module.model.head.register_forward_hook(lambda m, i, o: calls.__setitem__(
        "head", calls["head"] + 1))
    loss, logits, targets = module([glob, *locs], labels)
    h1.remove(), h2.remove()
    # the backbone runs once per resolution, the projector once over all crops
    assert calls["encoder"][:2] == [(4, 3, 16, 16), (8, 3, 8, 8)] and calls["head"] == 1

    # by hand: prototypes from the memory BEFORE the update, cosine logits / tau, mean CE
    with torch.no_grad():
        feats = torch.cat([module.model.encoder(glob), module.model.encoder(torch.cat(locs))])
        z = module.model.head(feats)
        protos = torch.zeros(3, 16)
        for f, c in zip(mem_feats, mem_labels):
            protos[c] += f
        protos = protos / protos.norm(dim=1, keepdim=True)
        zn = z / z.norm(dim=1, keepdim=True)
        want_logits = zn @ protos.t() / 0.1
        tgt = labels.repeat(3)
        want = np.mean([float(torch.logsumexp(want_logits[i], 0) - want_logits[i, tgt[i]])
                        for i in range(12)])
        z_ema = module.model_ema([glob])
    assert torch.equal(targets, tgt)
    assert torch.allclose(logits, want_logits, atol=1e-4)
    assert float(loss.detach()) == pytest.approx(want, abs=1e-5)
    # the memory received the EMA network's raw outputs on the global crop
    assert module.memory.ptr.item() == 4
    assert torch.allclose(module.memory.features[:4], z_ema, atol=1e-5)
    assert torch.equal(module.memory.labels[:4], labels)
    assert torch.equal(module.memory.features[4:], mem_feats[4:])
    # gradients reach the online network, not the prototypes or the EMA copy
    loss.backward()
    assert module.model.head.layers[2].weight.grad is not None
    assert all(p.grad is None for p in module.model_ema.parameters())


def test_plain_cosine_classifier_loss():
    torch.manual_seed(0)
    module = TrainModule("resnet18", PROJ, num_classes=3, tau=0.1, memory_size=0)
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    loss, logits, _ = module([x], labels)
    with torch.no_grad():
        z = module.model([x])
        w = module.clf.fc.weight
        want = F.normalize(z, dim=1) @ F.normalize(w, dim=1).t() / 0.1
    assert torch.allclose(logits, want, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(want, labels)), abs=1e-5)
    assert module.memory is None and "clf.fc.weight" in module.state_dict()


# ------------------------------------------------------------------------------------- crops
def test_crop_box_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = sample_crop_box(100, 80, (0.05, 0.25), rng)
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 100
        assert 0.04 <= h * w / 8000 <= 0.26
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_multicrop_shapes_determinism_and_extras():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    mc = MultiCrop(global_size=24, global_scale=(0.25, 1), n_global=1, local_size=12,
                   local_scale=(0.05, 0.25), n_local=3)
    crops = mc(img, random.Random(1))
    assert [tuple(c.shape) for c in crops] == [(3, 24, 24)] + [(3, 12, 12)] * 3
    again = mc(img, random.Random(1))
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    other = mc(img, random.Random(2))
    assert not torch.equal(crops[0], other[0])
    # per crop type: global blur 0.2 + solarise 0.2, local blur 0.5 and no solarisation
    assert [(s.blur_p, s.solarize_p) for s in mc.specs] == [(0.2, 0.2)] + [(0.5, 0.0)] * 3
    simple = MultiCrop(global_size=24, n_local=0, simple=True)
    assert len(simple(img, random.Random(0))) == 1 and not simple.specs[0].photometric


def test_multicrop_dataset_is_seeded_per_epoch_and_index():
    imgs = [(Image.new("RGB", (30, 30), (i * 40, 90, 200)), i) for i in range(4)]
    ds = MultiCropDataset(imgs, MultiCrop(global_size=16, local_size=8, n_local=1), seed=3)
    a = ds[2]
    assert a[1] == 2 and torch.equal(a[0][0], ds[2][0][0])
    ds.set_epoch(1)
    assert not torch.equal(a[0][0], ds[2][0][0])


# --------------------------------------------------------------------- syncs and the memory
def test_memory_pointer_follows_a_loaded_state():
    mem = MemoryBank(size=10, dim=2, num_classes=3)
    mem.update(torch.ones(4, 2), torch.zeros(4, dtype=torch.long))
    state = {k: v.clone() for k, v in mem.state_dict().items()}
    mem.update(torch.ones(3, 2), torch.zeros(3, dtype=torch.long))
    assert mem.ptr.item() == 7
    mem.load_state_dict(state)  # back to ptr 4: the host mirror must not keep 7
    mem.update(torch.full((2, 2), 5.0), torch.ones(2, dtype=torch.long))
    assert mem.ptr.item() == 6 and mem.features[4:6, 0].tolist() == [5.0, 5.0]


def test_loss_guard_names_the_first_bad_step_when_read_late(tmp_path):
    from trex_hub.train.loop import LossGuard, TrainingError

    guard = LossGuard(torch.device("cpu"), distributed=False)
    sched = np.linspace(0.1, 0.0, 20)
    for step, value in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0]):
        guard.observe(torch.tensor(value), step)
        if step == 1:
            guard.check(step, 8, sched, tmp_path / "ckpt.pth")  # fine so far
    with pytest.raises(TrainingError) as err:
        guard.check(12, 8, sched, tmp_path / "ckpt.pth")
    msg = str(err.value)
    assert "non-finite loss (inf) at epoch 1, iteration 2 (read 10 step(s) later)" in msg
    assert f"lr {sched[2]:.4g}" in msg
    # a checkpoint is named only where one exists
    assert "No checkpoint was written yet" in msg and "ckpt.pth" not in msg
    (tmp_path / "ckpt.pth").write_bytes(b"saved")
    with pytest.raises(TrainingError) as err:
        guard.check(12, 8, sched, tmp_path / "ckpt.pth")
    assert f"The last good checkpoint is {tmp_path / 'ckpt.pth'}" in str(err.value)


def test_resume_trims_the_log_to_the_checkpoint(tmp_path):
    """Records of epochs after the checkpoint's (they are redone) and a half-written last line
    go; the records kept are unchanged, byte for byte. A log that needs nothing is not
    rewritten."""
    import json
    import os

    from trex_hub.train.loop import trim_log

    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"epoch": e, "loss": 1.0 / e}) for e in (1, 2, 3)]
    log.write_text("\n".join(lines) + "\n" + '{"epoch": 4, "lo')
    assert trim_log(log, 2) == 2
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
    stamp = os.stat(log).st_mtime_ns
    os.utime(log, ns=(stamp - 10**9, stamp - 10**9))
    assert trim_log(log, 2) == 0 and os.stat(log).st_mtime_ns == stamp - 10**9
    assert trim_log(log, 0) == 2 and log.read_text() == ""
    assert trim_log(tmp_path / "missing.jsonl", 3) == 0
    assert not (tmp_path / "missing.jsonl").exists()


# --------------------------------------------------------------------------------- options, help
def _help_example(marker: str, text: str = "") -> list:
    """The command under ``marker`` in trex-train --help's examples (or in ``text``), as argv
    (no program)."""
    import shlex

    from trex_hub.train.config import EPILOG

    lines = (text or EPILOG).splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line) + 1
    command = ""
    for line in lines[start:]:
        command += line.strip().rstrip("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    argv = shlex.split(command)
    assert argv[0] == "trex-train", argv
    return argv[1:]


def test_help_small_cpu_run_is_small():
    """The help's "small CPU run" is a few minutes on 2 cores at most: a data subset, few
    iterations, at most 2 loader workers, tiny crops, and a warm-up the run leaves."""
    from trex_hub.train.config import parse_args

    args = parse_args(_help_example("# small CPU run"))
    assert args.workers <= 2
    assert args.train_limit is not None and args.train_limit <= 2000
    iterations = args.epochs * (args.train_limit // args.batch_size)
    assert iterations <= 100, iterations
    assert args.global_size <= 32 and args.local_size <= 16
    assert args.warmup_epochs < args.epochs
    assert args.output_dir == "runs/fm"
    # the README's small run is the same command
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert _help_example("# a small CPU run", readme) == _help_example("# small CPU run")


def test_help_shows_every_default_and_where_resume_is_exact(capsys):
    from trex_hub.train.config import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("--workers WORKERS data-loader processes per GPU/process (8;",
                  "--epochs EPOCHS epochs (100)", "sampler order (0)", "(imagefolder)",
                  "--output-dir OUTPUT_DIR checkpoints and logs (runs/trex, whatever the preset",
                  "torchvision ResNet backbone (resnet50)", "progress line every N steps (50;",
                  "(bit for bit on CPU; on CUDA with --deterministic)"):
        assert words in text, words
    assert "bit-for-bit where it stopped" not in text
