"""decode="hybrid": the batched tensor path and the worker processes share one run's batches
(trex_hub.decode_hybrid). The merging is checked with stand-in lanes, the real lanes on the CPU
(libjpeg through decode_jpeg for the tensor lane); the CUDA run is marked ``cuda``."""
import os
import threading
import time

import numpy as np
import pytest
import torch

import trex_hub
from trex_hub import extract as ex
from trex_hub.decode_hybrid import HYBRID_NICE, Claims, hybrid_batches, merge_lanes
from trex_hub.decode_procs import process_batches
from trex_hub.decoding import Batch, batch_ranges, decode_batches
from trex_hub.extract import in_group_order
from trex_hub.tensor_decode import tensor_batches
from trex_hub.transforms import Decoder, ImageLoadError

from test_extract import make_bad_files, r18_path, rel_err  # noqa: F401 (fixture)
from test_scale import folder  # noqa: F401 (fixture)


def lane_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("trex-")]


def sleepy_lane(delay, log=None, fail_at=None):
    """A stand-in lane: one group at a time, ``delay`` s each, the positions as its data."""
    def lane(claimed):
        try:
            for k, group in enumerate(claimed):
                if fail_at is not None and k == fail_at:
                    raise ValueError(f"lane failed at its group {k}")
                time.sleep(delay)
                yield Batch(list(group), torch.tensor(list(group)), [])
        finally:
            if log is not None:
                log.append("closed")
    return lane


# ------------------------------------------------------------------------ merging ----------
def test_merge_lanes_shares_by_speed_and_the_features_go_back_in_order():
    groups = batch_ranges(240, 4)  # 60 groups
    claims = Claims(groups)
    t0 = time.perf_counter()
    out = list(merge_lanes(groups, {"fast": sleepy_lane(0.01), "slow": sleepy_lane(0.04)},
                           claims=claims))
    both = time.perf_counter() - t0
    assert sorted(b.positions for b in out) == [list(g) for g in groups]
    assert all(torch.equal(b.data, torch.tensor(b.positions)) for b in out)
    assert [b.positions for b, _ in in_group_order(((b, None) for b in out), groups)] == \
        [list(g) for g in groups]
    taken = claims.taken()
    # 100 against 25 groups/s: about 4 to 1 (in order, the slow lane stalled the fast one: 2 to 1)
    assert sum(taken.values()) == 60 and taken["fast"] > 2.5 * taken["slow"] > 0, taken
    t0 = time.perf_counter()
    assert len(list(merge_lanes(groups, {"fast": sleepy_lane(0.01)}))) == 60
    alone = time.perf_counter() - t0
    # the two lanes together beat the faster one alone (ideally 0.8x: 125 against 100 groups/s)
    assert both < 0.92 * alone, (both, alone)
    assert not lane_threads()


def test_in_group_order_holds_early_pairs_until_their_turn():
    groups = batch_ranges(10, 3)  # [0..2] [3..5] [6..8] [9]
    pairs = [(Batch([9], None, []), "d"), (Batch([4, 5], None, [(3, "bad")]), "b"),
             (Batch([], None, [(6, "x"), (7, "y"), (8, "z")]), "c"),
             (Batch([0, 1, 2], None, []), "a")]
    assert [f for _, f in in_group_order(iter(pairs), groups)] == ["a", "b", "c", "d"]
    with pytest.raises(RuntimeError, match="no group of this run"):
        list(in_group_order(iter(pairs[:1] + [(Batch([5], None, []), "?")]), groups))


def test_claims_keep_lanes_within_the_window_but_never_stall_the_oldest_holder():
    groups = batch_ranges(20, 1)
    claims = Claims(groups, window=3)
    a, b = claims.lane("a"), claims.lane("b")
    assert [next(a)[0] for _ in range(3)] == [0, 1, 2]
    assert next(a)[0] == 3  # "a" holds the oldest group: it may take more before handing it
    got = []
    waiting = threading.Thread(target=lambda: got.append(next(b)[0]), name="test-waiter",
                               daemon=True)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and not got  # group 4 is 3 past group 0, which "a" holds
    assert claims.delivered("a") == 0
    waiting.join(0.3)
    assert waiting.is_alive() and not got  # and 3 past group 1
    assert claims.delivered("a") == 1
    waiting.join(5)
    assert got == [4] and claims.taken() == {"a": 4, "b": 1}
    claims.close()
    assert list(a) == [] and list(b) == []


def test_a_failing_lane_stops_the_run_and_every_lane_is_closed():
    logs = {"a": [], "b": []}
    lanes = {"a": sleepy_lane(0.005, logs["a"]), "b": sleepy_lane(0.005, logs["b"], fail_at=2)}
    with pytest.raises(ValueError, match="lane failed at its group 2"):
        for _ in merge_lanes(batch_ranges(400, 4), lanes):
            pass
    assert logs == {"a": ["closed"], "b": ["closed"]}
    assert not lane_threads()


def test_leaving_early_closes_every_lane():
    logs = {"a": [], "b": []}
    merged = merge_lanes(batch_ranges(400, 4), {k: sleepy_lane(0.005, v) for k, v in logs.items()})
    for k, b in enumerate(merged):
        if k == 3:
            break
    merged.close()
    assert logs == {"a": ["closed"], "b": ["closed"]}
    assert not lane_threads()


def test_a_lane_that_takes_nothing_leaves_the_run_to_the_other_one():
    def idle(claimed):
        return iter(())  # never asks for a group

    groups = batch_ranges(20, 4)
    out = list(merge_lanes(groups, {"idle": idle, "busy": sleepy_lane(0.0)}))
    assert [b.positions for b in out] == [list(g) for g in groups]
    with pytest.raises(RuntimeError, match="lanes ended with batches of the run still to make"):
        list(merge_lanes(groups, {"idle": idle}))
    assert not lane_threads()


def test_a_lane_that_drops_a_batch_it_took_is_an_error_not_a_hang():
    def careless(claimed):
        next(claimed, None)  # takes a group, never makes its batch
        return iter(())

    with pytest.raises(RuntimeError, match="lane 'careless' ended with 1 batch"):
        list(merge_lanes(batch_ranges(400, 4), {"careless": careless,
                                                "busy": sleepy_lane(0.001)}))
    assert not lane_threads()


class Alternate(Claims):
    """Claims that give even groups to lane "gpu" and odd ones to "cpu": both lanes work in
    every run, whatever their speeds on this machine."""

    def lane(self, name):
        parity = 0 if name == "gpu" else 1
        while True:
            with self._cond:
                while not self._closed and self._next < len(self._groups) \
                        and self._next % 2 != parity:
                    self._cond.wait(0.05)
                if self._closed or self._next >= len(self._groups):
                    return
                i = self._take(name)
            yield self._groups[i]


# --------------------------------------------------------------------- the real lanes -----
def test_hybrid_batches_are_each_the_bytes_of_one_path(folder, tmp_path):  # noqa: F811
    """Every batch is byte for byte what the PIL path or the tensor path makes of it; the
    positions and failures are the PIL path's (bad files in both lanes)."""
    make_bad_files(tmp_path)
    files = sorted(folder.iterdir()) + sorted(tmp_path.iterdir())
    dec = Decoder("transfer", draft=False)
    cfg = trex_hub.preprocess.PRESETS["transfer"]
    groups = batch_ranges(len(files), 3)
    kw = dict(strict=False, catch_all=True, describe=lambda i: files[i].name)
    pil = list(decode_batches(groups, files.__getitem__, dec, **kw))
    tensor = list(tensor_batches(groups, files.__getitem__, dec, cfg, device="cpu", **kw))
    claims = Alternate(groups)
    merged = hybrid_batches(groups, files.__getitem__, dec, cfg, num_workers=3, claims=claims,
                            **kw)
    got = [(b.positions, None if b.data is None else b.data.clone(), b.failures)
           for b, _ in in_group_order(((b, None) for b in merged), groups)]
    assert claims.taken() == {"gpu": (len(groups) + 1) // 2, "cpu": len(groups) // 2}
    assert len(got) == len(groups)
    for k, ((pos, data, fails), p, t) in enumerate(zip(got, pil, tensor)):
        assert pos == p.positions and fails == p.failures
        ref = t if k % 2 == 0 else p  # even batches by the tensor lane, odd ones by PIL
        assert (data is None and ref.data is None) or torch.equal(data, ref.data)
    assert sum(len(f) for _, _, f in got) == 5
    assert not lane_threads()


def test_hybrid_strict_names_the_bad_file_and_stops_both_lanes(folder, tmp_path):  # noqa: F811
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")[:6]
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(files[0].read_bytes()[:200])
    for where in (3, 4):  # in a batch of each lane
        order = files[:where] + [bad] + files[where:]
        groups = batch_ranges(len(order), 2)
        with pytest.raises(ImageLoadError, match="truncated.jpg"):
            list(hybrid_batches(groups, order.__getitem__, Decoder("transfer"),
                                trex_hub.preprocess.PRESETS["transfer"], num_workers=3,
                                claims=Alternate(groups), describe=lambda i: order[i].name))
        assert not lane_threads()


def test_process_batches_reads_lazy_groups_only_as_far_as_it_has_slots(folder):  # noqa: F811
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    taken = []

    def groups():
        for g in batch_ranges(len(files), 2):
            taken.append(g)
            yield g

    gen = process_batches(groups(), files.__getitem__, Decoder("transfer"), num_workers=1,
                          crop=224, prefetch=2, batch_size=2)
    first = next(gen)
    assert first.positions == [0, 1] and len(taken) == 3  # the three slots' worth
    rest = list(gen)
    assert len(taken) == len(rest) + 1 == len(batch_ranges(len(files), 2))
    with pytest.raises(ValueError, match="larger than batch_size=2"):
        list(process_batches([[0, 1, 2]], files.__getitem__, Decoder("transfer"),
                             num_workers=1, crop=224, batch_size=2))


class NiceProbe:
    """A stand-in decoder that paints each image with the CPU priority of its process."""

    def __call__(self, item, what):
        return np.full((4, 4, 3), os.nice(0), dtype=np.uint8)


def test_hybrid_worker_processes_run_at_a_lower_priority():
    parent = os.nice(0)
    plain = next(process_batches([[0]], lambda i: i, NiceProbe(), num_workers=1, crop=4))
    lowered = next(process_batches([[0]], lambda i: i, NiceProbe(), num_workers=1, crop=4,
                                   nice=HYBRID_NICE))
    assert int(plain.data[0, 0, 0, 0]) == parent
    assert int(lowered.data[0, 0, 0, 0]) == min(19, parent + HYBRID_NICE)


# ------------------------------------------------------------------ choosing and using -----
def test_choose_decoding_hybrid_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ex.choose_decoding("hybrid", "auto", cuda, "transfer", True, 5000, 16) == "hybrid"
    assert ex.choose_decoding("hybrid", "threads", cpu, "imagenet", True, 1, 0) == "hybrid"
    # auto picks it on CUDA for many files and some workers (H200, 2026-11-27), not on the CPU
    assert ex.choose_decoding("auto", "auto", cuda, "transfer", True, 5000, 16) == "hybrid"
    assert ex.choose_decoding("auto", "auto", cpu, "transfer", True, 5000, 16) == "processes"
    with pytest.raises(ValueError, match="decode='hybrid' resizes to a preset"):
        ex.choose_decoding("hybrid", "auto", cpu, None, True, 1, 1)
    with pytest.raises(ValueError, match="pass paths, or use decode='gpu'"):
        ex.choose_decoding("hybrid", "auto", cpu, "transfer", False, 1, 1)


def test_extract_and_cli_with_hybrid_decoding(r18_path, folder, tmp_path):  # noqa: F811
    import json

    from trex_hub.cli.extract import main

    model = trex_hub.load(r18_path)
    files = sorted(folder.iterdir())
    ref = model.extract(files, decode="cpu", draft=False)
    got = model.extract(files, decode="hybrid", batch_size=3, draft=False)
    assert got.shape == ref.shape and rel_err(got, ref) < 1e-2
    out = tmp_path / "f.npy"
    assert main([str(r18_path), str(folder), "-o", str(out), "-q", "-b", "3", "-j", "3",
                 "--decode", "hybrid", "--no-draft"]) == 0
    assert rel_err(np.load(out), ref.numpy()) < 1e-2
    fp = json.loads((tmp_path / "f.npy.meta.json").read_text())["fingerprint"]
    assert (fp["decode"], fp["decoder"]) == ("hybrid", "hybrid")
    assert not lane_threads()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_hybrid_matches_the_cpu_path(r18_path, folder):  # noqa: F811
    """Both lanes on CUDA (the CPU lane's pinned batches go straight to the device) give the
    features of the exact path within the tensor path's distance, in order."""
    model = trex_hub.load(r18_path)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jpg") * 4
    ref = model.extract(files, decode="cpu", draft=False)
    for precision, tol in (("fp32", 2e-2), ("fp16", 2e-2)):
        got = model.extract(files, device="cuda", decode="hybrid", batch_size=4,
                            precision=precision, draft=False)
        assert rel_err(got, ref) < tol, precision


def test_hybrid_forks_its_workers_before_any_lane_thread_runs(folder, monkeypatch):  # noqa: F811
    """A fork copies only the forking thread: the CPU lane's processes start in the consumer's
    thread, before the lanes' threads (and the locks they take) exist."""
    import trex_hub.decode_hybrid as hy

    seen = []
    real = hy.DecodePool.__init__

    def spy(self, *a, **kw):
        seen.append((threading.current_thread() is threading.main_thread(), lane_threads()))
        real(self, *a, **kw)

    monkeypatch.setattr(hy.DecodePool, "__init__", spy)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    groups = batch_ranges(len(files), 4)
    out = list(hybrid_batches(groups, files.__getitem__, Decoder("transfer"),
                              trex_hub.preprocess.PRESETS["transfer"], num_workers=3))
    assert seen == [(True, [])] and len(out) == len(groups)


class Killer:
    """A stand-in decoder whose worker process dies on its first image."""

    def __call__(self, item, what):
        os._exit(3)


def test_a_dying_cpu_worker_stops_the_hybrid_run_with_its_error(folder):  # noqa: F811
    files = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")
    groups = batch_ranges(len(files), 2)
    with pytest.raises(RuntimeError, match=r"decoding worker trex-decode-0 died \(exit code 3\)"):
        list(hybrid_batches(groups, files.__getitem__, Killer(),
                            trex_hub.preprocess.PRESETS["transfer"], num_workers=3,
                            claims=Alternate(groups), strict=False, catch_all=True))
    assert not lane_threads()
