"""A real 2-process ``torchrun`` run on CPU (gloo): identical parameters on both ranks after every
step, and an OCM memory holding both ranks' EMA outputs in rank order (recomputed here)."""
from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------------------------
# a failure in one process: one line from that process, the others quiet
# ---------------------------------------------------------------------------------------------
INJECT = """import os, sys
from trex_hub.cli import train as cli
from trex_hub.cli.common import exit_now
from trex_hub.train import module
from trex_hub.train.runtime import TrainingError

if os.environ["RANK"] == "1":  # a failure that only rank 1 meets, in the middle of a step
    def update_ema(self, momentum):
        raise TrainingError("the disk of rank 1 is on fire")
    module.TrainModule.update_ema = update_ema
exit_now(cli.main(sys.argv[1:]))
"""


def _torchrun(tmp_path: Path, *argv: str, script=None) -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", TMPDIR=str(tmp_path / "tmp"))
    target = [str(script)] if script else ["-m", "trex_hub.cli.train"]
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *target, *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _error_lines(proc: subprocess.CompletedProcess) -> list:
    """trex-train's error lines; no traceback of ours and no lost-connection error anywhere
    (torchrun's own summary and traceback follow whenever a process fails)."""
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    assert "trex_hub/" not in proc.stderr.replace(str(Path(trex_hub.__file__).parent), "#"), \
        proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("trex-train: ")]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
def test_torchrun_failure_of_one_rank_is_one_line_from_it(tmp_path):
    data = make_pattern_folder(tmp_path / "data", n_train=8, n_val=2)
    (tmp_path / "inject.py").write_text(INJECT)
    proc = _torchrun(tmp_path, *small_args(data, tmp_path / "run", "--batch-size", "4",
                                           "--epochs", "1"), script=tmp_path / "inject.py")
    assert _error_lines(proc) == ["trex-train: error: the disk of rank 1 is on fire [rank 1]"]
    # torchrun's summary shows the error too, not a link to its docs
    assert "traceback : the disk of rank 1 is on fire" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
def test_torchrun_unreadable_image_is_named_once(tmp_path):
    data = make_pattern_folder(tmp_path / "data", n_train=8, n_val=2)
    bad = data / "train" / "vertical" / "003.png"
    bad.write_bytes(b"not an image")
    proc = _torchrun(tmp_path, *small_args(data, tmp_path / "run", "--batch-size", "4",
                                           "--epochs", "1"))
    (line,) = _error_lines(proc)
    assert str(bad) in line and "not a readable image" in line and "[rank " in line, line


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
def test_torchrun_error_of_every_rank_is_printed_once(tmp_path):
    data = make_pattern_folder(tmp_path / "data", n_train=4, n_val=1)  # 12 images
    for extra, expected in (([], "12 training images do not make one batch of 8 x 2"),
                            (["--epochs", "0"], "argument --epochs: must be >= 1")):  # parsing
        proc = _torchrun(tmp_path, *small_args(data, tmp_path / "run", *extra))
        (line,) = _error_lines(proc)
        assert expected in line, proc.stderr[-3000:]
        assert proc.stderr.count("usage: trex-train") <= 1


class FakeStore:
    """The calls of a c10d store that failure_in_group makes, on a dict."""

    def __init__(self):
        self.data = {}
        self.waited = []

    def check(self, keys):
        return all(k in self.data for k in keys)

    def get(self, key):
        return self.data[key]

    def set(self, key, value):
        self.data[key] = value.encode()

    def compare_set(self, key, expected, desired):
        if self.data.get(key, b"").decode() == expected:
            self.data[key] = desired.encode()
        return self.data[key]

    def wait(self, keys, timeout):
        self.waited.append(keys)


def test_failure_in_group_reports_the_first_failure_once(monkeypatch, tmp_path):
    from trex_hub.train import runtime as rt

    store = FakeStore()
    monkeypatch.setattr(rt, "_group_store", lambda: store)
    monkeypatch.setattr(rt, "_REPORTING", [])
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "e1.json"))
    first = rt.TrainingError("bad image on rank 1")
    assert rt.failure_in_group(first, rt.DistEnv(rank=1, world_size=2)) is first
    assert "bad image on rank 1" in (tmp_path / "e1.json").read_text()
    # rank 0 then loses its connection to rank 1: quiet, after rank 1's line is out
    gone = RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:28876")
    quiet = rt.failure_in_group(gone, rt.DistEnv(rank=0, world_size=2))
    assert isinstance(quiet, rt.FailedElsewhere) and "rank 1 failed: bad image" in str(quiet)
    assert store.waited == [[rt.REPORTED_KEY]]
    rt.failure_reported()
    assert store.data[rt.REPORTED_KEY] == b"1"
    # the same error in every process: the second one is quiet too
    again = rt.failure_in_group(rt.TrainingError("same"), rt.DistEnv(rank=0, world_size=2))
    assert isinstance(again, rt.FailedElsewhere)


def test_failure_in_group_when_the_peer_died_without_a_word(monkeypatch):
    from trex_hub.train import runtime as rt

    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setattr(rt, "_REPORTING", [])
    store = FakeStore()
    monkeypatch.setattr(rt, "_group_store", lambda: store)
    gone = RuntimeError("[/__w/gloo/pair.cc:545] Read error [127.0.0.1]:20864: Connection reset "
                        "by peer. This is typically caused by a remote worker hanging")
    said = rt.failure_in_group(gone, rt.DistEnv(rank=0, world_size=2))
    assert isinstance(said, rt.TrainingError)
    assert str(said) == ("another process of this run ended without a message (this one lost "
                         "its connection to it: Read error [127.0.0.1]:20864: Connection reset "
                         "by peer); look for its error above, and for its exit code or signal "
                         "in torchrun's summary")
    # a broken pipe of this process's own (stdout closed) is its own error, not a lost peer
    monkeypatch.setattr(rt, "_group_store", FakeStore)
    own_pipe = BrokenPipeError(32, "Broken pipe")
    assert rt.failure_in_group(own_pipe, rt.DistEnv(rank=1, world_size=2)) is own_pipe
    # without a store (it went with rank 0) every process says its own
    monkeypatch.setattr(rt, "_group_store", lambda: None)
    own = ValueError("x")
    assert rt.failure_in_group(own, rt.DistEnv(rank=1, world_size=2)) is own


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_error_before_the_group_exists_reaches_torchruns_summary(monkeypatch, tmp_path):
    """--device cuda without CUDA, met alike by every process before the process group
    exists: local rank 0 reports it, and torchrun's error file holds it (its summary showed a
    link to its docs instead)."""
    from trex_hub.train.config import parse_args
    from trex_hub.train.loop import train
    from trex_hub.train.runtime import TrainingError

    error_file = tmp_path / "error.json"
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("TORCHELASTIC_ERROR_FILE", str(error_file))):
        monkeypatch.setenv(key, value)
    args = parse_args(["--device", "cuda", "--output-dir", str(tmp_path / "run")])
    with pytest.raises(TrainingError, match="CUDA is not available"):
        train(args)
    recorded = json.loads(error_file.read_text())["message"]["message"]
    assert "--device cuda was asked for but CUDA is not available" in recorded


def _no_launcher(monkeypatch, **env):
    for var in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_USE_AGENT_STORE", "LOCAL_RANK", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_and_world_size_without_master_addr_is_one_line(monkeypatch, tmp_path, capsys):
    """A SLURM script exporting RANK / WORLD_SIZE without torchrun: "unexpected ValueError:
    ... env:// rendezvous ..." before."""
    from trex_hub.cli.train import main

    _no_launcher(monkeypatch, WORLD_SIZE="2", RANK="0")
    data = make_pattern_folder(tmp_path / "data", n_train=1, n_val=1)
    assert main(small_args(data, tmp_path / "run")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["trex-train: error: WORLD_SIZE=2 and RANK=0 are set but MASTER_ADDR is not: "
                   "launch with torchrun (or srun + torchrun), set MASTER_ADDR and MASTER_PORT "
                   "(the address and a free port of the rank-0 machine), or unset WORLD_SIZE "
                   "and RANK to run one process [rank 0]"], err
    assert not (tmp_path / "run").exists()


def test_processes_meet_with_a_bounded_wait_and_keep_the_long_timeout(monkeypatch):
    """Without torchrun the processes meet on a TCPStore of their own: a late one is waited
    for (said once), a missing one given up on after TREX_HUB_RENDEZVOUS_TIMEOUT (the
    collectives' timeout, days for trex-extract, used to be the wait), and the store then takes
    the collectives' timeout. Two ranks in two threads here."""
    import threading
    import time
    from datetime import timedelta

    from trex_hub import rendezvous

    port = _free_port()
    _no_launcher(monkeypatch, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    said, stores = [], {}

    def rank(r, delay):
        time.sleep(delay)
        stores[r] = rendezvous.meet(r, 2, timedelta(days=3), said.append, wait_s=20)

    monkeypatch.setattr(rendezvous, "GRACE_S", 0.3)
    threads = [threading.Thread(target=rank, args=(0, 0)),
               threading.Thread(target=rank, args=(1, 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {r: s.timeout for r, s in stores.items()} == {0: timedelta(days=3),
                                                         1: timedelta(days=3)}
    assert said == [f"waiting for 1 more process at 127.0.0.1:{port} (WORLD_SIZE=2, this is "
                    "RANK=0); giving up after 20 s (TREX_HUB_RENDEZVOUS_TIMEOUT)"]
    stores.clear()
    # nobody hosts the meeting point: rank 1 gives up too
    port = _free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TREX_HUB_RENDEZVOUS_TIMEOUT", "1")
    t = time.monotonic()
    with pytest.raises(rendezvous.RendezvousError,
                       match=f"^the rank-0 process of this run did not answer at "
                             f"127.0.0.1:{port} within 1 s; .*torchrun"):
        rendezvous.meet(1, 2, timedelta(days=3), said.append)
    assert time.monotonic() - t < 10
    assert said[-1].startswith("waiting for the rank-0 process at ")
    monkeypatch.setenv("TREX_HUB_RENDEZVOUS_TIMEOUT", "soon")
    with pytest.raises(rendezvous.RendezvousError, match="TREX_HUB_RENDEZVOUS_TIMEOUT='soon'"):
        rendezvous.meet(0, 2, timedelta(days=3), said.append)
