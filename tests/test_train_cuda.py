"""The GPU path of trex-train (``--aug gpu`` on CUDA, channels_last, fused SGD, deferred
non-finite check). Skipped without CUDA; run on a GPU machine with ``pytest -m cuda``
(``tests/test_train_augment.py`` holds the same augmentation against PIL on CPU tensors)."""
from __future__ import annotations

import json

import pytest
import torch

from trex_hub.checkpoint import torch_load
from trex_hub.cli.train import main
from trex_hub.preprocess import IMAGENET_STD
from trex_hub.train.augment import MultiCrop
from trex_hub.train.batch_augment import BatchAugment, DecodedMultiCropDataset, collate_decoded
from train_helpers import make_pattern_folder, photo_images, small_args

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_images(tmp_path_factory.mktemp("photos"), (12, (320, 240)), (6, (240, 300)))


def test_augmentation_on_cuda_matches_cpu_tensors(photos):
    """Same decoded batch, same drawn parameters: the CUDA result equals the CPU tensor result up
    to the resize's float32 rounding (cuBLAS sums in another order): the same bound as the CPU
    path against PIL."""
    mc = MultiCrop(global_size=224, local_size=96, n_local=8)
    ds = DecodedMultiCropDataset(photos, mc, seed=0)
    batch = collate_decoded([ds[(1, i)] for i in range(len(photos))])
    cpu, _ = BatchAugment(mc, "cpu")(batch)
    gpu, labels = BatchAugment(mc, "cuda", channels_last=True)(batch)
    assert labels.is_cuda and all(g.is_cuda for g in gpu)
    assert gpu[0].is_contiguous(memory_format=torch.channels_last)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    d = torch.cat([((g.cpu() - c) * std * 255).abs().flatten() for g, c in zip(gpu, cpu)])
    assert d.max() <= 8.01
    assert (d > 0.5).float().mean() <= 2e-3


def test_augmentation_does_not_read_the_device(photos):
    """The batched path never waits for the GPU: no synchronising call while it runs."""
    mc = MultiCrop(global_size=224, local_size=96, n_local=8)
    ds = DecodedMultiCropDataset(photos, mc, seed=0)
    batch = collate_decoded([ds[(0, i)] for i in range(len(photos))])
    aug = BatchAugment(mc, "cuda", channels_last=True)
    aug(batch)  # warm-up (allocations)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_pattern_folder(tmp_path_factory.mktemp("patterns"), n_train=16, n_val=4,
                               size=48)


def _cuda_args(folder, out, *extra):
    argv = small_args(folder, out, "--device", "cuda", "--aug", "gpu", "--deterministic",
                      "--global-size", "32", "--local-size", "16", "--batch-size", "12",
                      *extra)
    return argv


def test_short_cuda_run_resumes_bit_for_bit(folder, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_cuda_args(folder, straight)) == 0
    assert main(_cuda_args(folder, resumed, "--stop-after-epoch", "1")) == 0
    assert main(_cuda_args(folder, resumed, "--resume")) == 0
    a, b = torch_load(straight / "checkpoint.pth"), torch_load(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert a["model"][k].is_contiguous(), k  # channels_last runs write the plain layout
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    strip = lambda r: {k: v for k, v in json.loads(r).items()  # noqa: E731
                       if k not in ("images_per_s", "epoch_time_s")}
    la = (straight / "log.jsonl").read_text().splitlines()
    lb = (resumed / "log.jsonl").read_text().splitlines()
    assert [strip(r) for r in la] == [strip(r) for r in lb]


def test_cuda_run_one_batch_ahead_learns_bit_for_bit_what_the_plain_run_learns(folder,
                                                                               tmp_path):
    """--aug-ahead: each batch is augmented on a stream of its own beside the previous step;
    the main stream waits for it, and the run (--deterministic) learns exactly the same."""
    plain, ahead = tmp_path / "plain", tmp_path / "ahead"
    assert main(_cuda_args(folder, plain)) == 0
    assert main(_cuda_args(folder, ahead, "--aug-ahead")) == 0
    a, b = torch_load(plain / "checkpoint.pth"), torch_load(ahead / "checkpoint.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])


def test_cuda_run_with_pil_augmentation_and_fp16(folder, tmp_path):
    out = tmp_path / "pil"
    assert main(small_args(folder, out, "--device", "cuda", "--aug", "cpu", "--amp", "fp16",
                           "--epochs", "1", "--workers", "2")) == 0
    assert torch_load(out / "checkpoint.pth")["epoch"] == 1


def test_non_finite_loss_is_reported_late_but_exactly(folder, tmp_path, monkeypatch, capsys):
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the third step's loss is NaN
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    assert main(_cuda_args(folder, tmp_path / "nan", "--check-finite-every", "4",
                           "--amp", "none")) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "epoch 1, iteration 2" in err
    assert "read 1 step(s) later" in err
    assert not (tmp_path / "nan" / "checkpoint.pth").exists()


def test_fused_sgd_survives_an_overflowing_first_step():
    """fp16's first steps often overflow and GradScaler skips them; the fused SGD kernel then
    never fills the momentum buffers it made with empty_like, and the next step read garbage
    (NaN weights in the short CUDA runs above). build_optimizer gives it zero buffers: same
    update."""
    from types import SimpleNamespace

    from trex_hub.train.loop import build_optimizer

    dev = torch.device("cuda")
    for _ in range(4):  # leave freed NaN blocks of the right size for empty_like to pick up
        torch.full((64, 32), float("nan"), device=dev)
    w = torch.nn.Parameter(torch.randn(64, 32, device=dev))
    module = SimpleNamespace(trainable_parameters=lambda: [("w", w)])
    args = SimpleNamespace(weight_decay=1e-4, wd_all=False, momentum=0.9)
    opt = build_optimizer(module, args, dev)
    scaler = torch.amp.GradScaler("cuda")
    for first in (True, False):
        opt.param_groups[0]["lr"] = 0.1
        opt.zero_grad(set_to_none=True)
        loss = (w.float() ** 2).sum() * (float("inf") if first else 1.0)
        scaler.scale(loss).backward()
        before = w.detach().clone()
        scaler.step(opt)
        scaler.update()
        if first:  # skipped: the weights did not move
            assert torch.equal(w.detach(), before)
    assert torch.isfinite(w).all()
    expected = before - 0.1 * (2 * before + 1e-4 * before)  # buf = grad on the first real step
    assert torch.allclose(w.detach(), expected, rtol=1e-5, atol=1e-6)
