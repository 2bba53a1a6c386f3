"""A real 2-process ``torchrun`` run on CPU (gloo): identical parameters on both ranks after every
step, and an OCM memory holding both ranks' EMA outputs in rank order (recomputed here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trex_hub
from trex_hub.train.module import Net
from train_helpers import make_pattern_folder, small_args

TORCHRUN = Path(sys.executable).parent / "torchrun"
MEMORY = 20  # 3 steps x 2 ranks x 4 images: the third step is truncated and wraps


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
@pytest.mark.timeout(900)
def test_torchrun_gloo_two_processes(tmp_path):
    data = make_pattern_folder(tmp_path / "data", n_train=8, n_val=2)  # 24 training images
    out, dump = tmp_path / "run", tmp_path / "dump"
    argv = small_args(data, out, "--epochs", "1", "--batch-size", "4", "--memory-size",
                      str(MEMORY), "--debug-dump", str(dump), "--print-freq", "1")
    (tmp_path / "tmp").mkdir()  # torchrun's own temporary folders, not left in /tmp
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", TMPDIR=str(tmp_path / "tmp"))
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "trex_hub.cli.train",
           *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x 4 = batch 8" in proc.stderr
    assert "per-process BatchNorm (SyncBatchNorm needs CUDA)" in proc.stderr

    proj = {"num_layers": 3, "hidden_dim": 64, "out_dim": 32, "l2_norm": True}
    steps = sorted({p.name.split("_")[0] for p in dump.glob("step*_rank0.pt")})
    assert len(steps) == 3  # 12 images per rank / 4
    for step in steps:
        r0 = torch.load(dump / f"{step}_rank0.pt")
        r1 = torch.load(dump / f"{step}_rank1.pt")
        # DDP keeps the online and EMA parameters identical on both ranks, bit for bit
        assert torch.equal(r0["params"], r1["params"]), step
        assert torch.equal(r0["ema_params"], r1["ema_params"]), step
        assert torch.equal(r0["memory_features"], r1["memory_features"]), step
        assert torch.equal(r0["memory_labels"], r1["memory_labels"]), step
        assert torch.equal(r0["memory_ptr"], r1["memory_ptr"]), step
        assert not torch.equal(r0["global_crops"][0], r1["global_crops"][0])  # distinct shards

        # recompute the EMA network's outputs on each rank's global crops (train-mode BN, each
        # rank with its own batch statistics, as on CPU there is no SyncBatchNorm)
        ema = Net("resnet18", proj)
        ema.load_state_dict(r0["before"]["ema_state"])
        ema.train()
        with torch.no_grad():
            z = torch.cat([ema(r0["global_crops"]), ema(r1["global_crops"])])
        labels = torch.cat([r0["labels"], r1["labels"]])
        start = int(r0["before"]["memory_ptr"][0])
        n = min(len(z), MEMORY - start)
        after, before = r0["memory_features"], r0["before"]["memory_features"]
        assert torch.allclose(after[start:start + n], z[:n], atol=1e-5, rtol=1e-4), step
        assert torch.equal(r0["memory_labels"][start:start + n], labels[:n])
        untouched = torch.ones(MEMORY, dtype=torch.bool)
        untouched[start:start + n] = False
        assert torch.equal(after[untouched], before[untouched])
        assert int(r0["memory_ptr"][0]) == (start + n) % MEMORY
    # the last step hit the end of the memory: rank 1's outputs were cut, the pointer wrapped
    assert int(r0["before"]["memory_ptr"][0]) == 16 and int(r0["memory_ptr"][0]) == 0

    model = trex_hub.load(out / "checkpoint.pth", projector=True)
    assert model.classifier.num_classes == 3
