"""The streaming, resumable, sharded run behind ``trex-extract``: files in, a features file out.

:func:`extract_to_file` takes the entries of :func:`trex_hub.imagefiles.collect_inputs` and a
:class:`RunOptions`, and goes through three steps, each a function of its own:

1. :func:`plan_run` - rank 0 checks what is on disk against the run's fingerprint (fresh start,
   resume, refusal, nothing to do; :mod:`trex_hub.run_state`), records the fingerprint in
   ``<out>.parts/state.json`` and holds the folder's lock; every rank then picks its chunks
   (``rank, rank + world_size, ...``) and, in each, the inputs not yet committed;
2. :func:`run_chunks` - decode and run the model over those inputs, committing a segment when a
   chunk is complete or ``commit_seconds`` after the last commit (always between batches, so
   the batches, hence the features, are those of an uninterrupted run);
3. :func:`finish_run` - rank 0 merges every chunk in input order into the final files
   (:mod:`trex_hub.featurefile`) once all ranks are past the barrier.

A resumed run recomputes nothing committed and writes a file identical to that of an
uninterrupted run. Ranks share nothing but the parts folder and the barrier.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .extract import (choose_decoding, default_workers, open_batches, progress_bar,
                      run_batches)
from .featurefile import (FORMAT_VERSION, ExtractError, committed_segments, merge, output_paths,
                          output_problem, segment_files, write_segment)
from .fileio import PathLike, WriteBehind
from .imagefiles import Entry, failure_reason
from .inference import InferenceModel, prepare
from .run_state import (decoding_kind, drop_unused_parts, fingerprint, prepare_parts, release,
                        write_errors)
from .transforms import Decoder, ImageLoadError, check_preprocess, resolve_preprocess


def _no_barrier() -> None:
    return None


def _no_log(msg: str) -> None:
    return None


@dataclass(frozen=True)
class RunOptions:
    """How a run computes and what it does with what is already on disk.

    Computing: ``batch_size`` images per forward pass, ``num_workers`` decoding workers (``None``:
    one per core this process may use), ``preprocess`` preset, ``normalize`` (L2 per row),
    ``precision``, ``device``, ``compile``, ``draft`` JPEG decoding, ``max_pixels`` per image,
    ``decode`` (``auto`` / ``cpu`` / ``gpu``) and ``workers_mode`` (``auto`` / ``threads`` /
    ``processes``): see :func:`trex_hub.extract.extract_features`.
    On disk: ``chunk_size`` inputs per chunk (rounded up to a multiple of the batch; the unit
    that ranks share out), committed when complete or after ``commit_seconds`` of work,
    whichever comes first (cuts fall between batches, so the merged file is the same wherever
    they fall),
    ``resume`` an unfinished run, ``overwrite`` an existing output or unfinished run, ``strict``
    (the first bad file stops the run), ``keep_parts`` after merging. ``progress`` shows a bar.
    ``engine`` replaces the PyTorch fast path with another batch runner of the same interface
    (uint8 NHWC batch in, float32 features out; e.g.
    :class:`trex_hub.onnx_export.OnnxRuntimeModel`).
    """

    batch_size: int = 32
    num_workers: Optional[int] = None
    preprocess: Optional[str] = "transfer"
    normalize: bool = False
    precision: str = "fp32"
    device: Union[str, torch.device, None] = None
    compile: bool = False
    draft: bool = True
    max_pixels: Optional[int] = None
    chunk_size: int = 1024
    commit_seconds: float = 5.0
    resume: bool = False
    overwrite: bool = False
    strict: bool = False
    keep_parts: bool = False
    progress: bool = False
    engine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    decode: str = "auto"
    workers_mode: str = "auto"

    def check(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be >= 1")
        if not self.commit_seconds > 0:
            raise ValueError("commit_seconds must be > 0")
        check_preprocess(self.preprocess)  # validates the name
        choose_decoding(self.decode, self.workers_mode, torch.device("cpu"), self.preprocess,
                        True, 0, 0)  # validates decode / workers_mode before anything is written


@dataclass(frozen=True)
class Shard:
    """This process's part of a ``torchrun`` job (the defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = _no_barrier


@dataclass
class Summary:
    total: int
    ok: int
    failed: int
    dim: int
    seconds: float
    computed: int
    failures: List[Tuple[str, str]]
    out: Optional[Path]
    loop_seconds: float = 0.0  # the batch loop alone: no planning, model preparation or merge
    # how this rank decoded: {"kind": threads | processes | tensor | hybrid, hybrid: "lanes":
    # {"gpu": batches, "cpu": batches}}
    decoding: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def loop_images_per_second(self) -> float:
        """Images/s of the batch loop (decoding, forward passes, segment commits), the part
        that grows with the number of images; ``images_per_second`` also counts the one-off
        steps (weights digest, model preparation, merge)."""
        return self.computed / self.loop_seconds if self.loop_seconds > 0 else float("nan")


@dataclass
class Plan:
    """What this rank computes: chunks ``mine`` of ``n_chunks`` (chunk ``k`` from input
    ``starts[k]`` on, past what a killed run committed), with the run's own sizes; ``lock`` is
    the parts folder's lock held by rank 0."""

    paths: Dict[str, Path]
    fingerprint: Dict[str, Any]
    batch_size: int
    chunk_size: int
    n_chunks: int
    mine: List[int]
    starts: Dict[int, int] = dataclasses.field(default_factory=dict)
    lock: Optional[int] = None

    def close(self) -> None:
        """Release the parts folder's lock (rank 0; done by :func:`finish_run`)."""
        release(self.lock)
        self.lock = None

    def batches(self, count: int) -> List[range]:
        """The forward-pass batches of this rank's chunks (``count`` inputs in all). Batches
        start at the chunk's start, every ``batch_size`` inputs, resumed or not."""
        out: List[range] = []
        for k in self.mine:
            first, stop = k * self.chunk_size, min((k + 1) * self.chunk_size, count)
            start = self.starts.get(k, first)
            out += [range(s, min(s + self.batch_size, stop))
                    for s in range(first, stop, self.batch_size) if s >= start]
        return out


# --------------------------------------------------------------------------------------------
# 1. plan
# --------------------------------------------------------------------------------------------


def _resume_point(parts: Path, segs: List[Tuple[int, int]], first: int, stop: int,
                  batch_size: int) -> int:
    """Where chunk ``first..stop-1`` resumes: the end of its committed segments from ``first``
    on (a batch boundary); segments past that point are stale and removed."""
    pos = first
    for a, b in segs:
        if a == pos and b <= stop:
            pos = b
    if (pos - first) % batch_size and pos != stop:  # not a batch boundary: redo the chunk
        pos = first
    for a, b in segs:
        if first <= a and a >= pos and a < stop:
            for f in segment_files(parts, a, b)[::-1]:
                f.unlink(missing_ok=True)
    return pos


def plan_run(model: torch.nn.Module, entries: Sequence[Entry], out: PathLike,
             opts: RunOptions, shard: Shard = Shard(),
             log: Callable[[str], None] = _no_log) -> Optional[Plan]:
    """Step 1 on every rank (rank 0 prepares, the others wait at the barrier): the plan of this
    rank, or ``None`` when the output is already complete (with ``opts.resume``)."""
    paths = output_paths(out)
    fp = fingerprint(model, entries, opts)
    lock = None
    complete = False
    if shard.rank == 0:
        with write_errors(paths):
            go, lock = prepare_parts(paths, fp, entries, opts.resume, opts.overwrite, log)
        complete = not go
    try:
        shard.barrier()
        if complete or not paths["parts"].exists():  # rank 0 found the run already complete
            return None
        state = json.loads((paths["parts"] / "state.json").read_text())
        batch_size, chunk_size = int(state["batch_size"]), int(state["chunk_size"])
        n_chunks = max(1, math.ceil(len(entries) / chunk_size)) if entries else 0
        segs = committed_segments(paths["parts"])
        mine, starts = [], {}
        for k in range(shard.rank, n_chunks, shard.world_size):
            first, stop = k * chunk_size, min((k + 1) * chunk_size, len(entries))
            pos = _resume_point(paths["parts"], segs, first, stop, batch_size)
            if pos < stop:
                mine.append(k)
                starts[k] = pos
        kept = sum(starts.get(k, min((k + 1) * chunk_size, len(entries))) - k * chunk_size
                   for k in range(shard.rank, n_chunks, shard.world_size))
        if kept:
            log(f"rank {shard.rank}: resuming, {kept} committed input(s) kept")
        return Plan(paths, fp, batch_size, chunk_size, n_chunks, mine, starts, lock)
    except BaseException:
        release(lock)
        raise


# --------------------------------------------------------------------------------------------
# 2. run chunks
# --------------------------------------------------------------------------------------------


class _Segment:
    """Features and manifest rows not yet committed: the inputs from ``start`` to ``stop``."""

    def __init__(self, parts: Path, dim: int, normalize: bool, chunk_size: int,
                 writer: WriteBehind):
        self.parts, self.dim, self.normalize = parts, dim, normalize
        self.chunk_size, self.writer = chunk_size, writer
        self.start: Optional[int] = None
        self.stop = 0
        self.feats: List[np.ndarray] = []
        self.rows: List[Tuple[int, Dict[str, Any]]] = []
        self.since = time.monotonic()

    def add_batch(self, group: range) -> None:
        if self.start is not None and (group.start != self.stop or  # another chunk
                                       group.start // self.chunk_size
                                       != self.start // self.chunk_size):
            self.commit()
        if self.start is None:
            self.start = group.start
        self.stop = group.stop

    def add_row(self, pos: int, e: Entry, error: Optional[str] = None) -> None:
        self.rows.append((pos, {"index": None, "path": e.rel, "label": e.label,
                                "status": "ok" if error is None else "failed", "error": error}))

    def commit(self) -> None:
        """Hand the segment to the writer thread, so the batch loop (and the GPU it feeds) does
        not wait for ``np.save`` and the fsyncs: 0.13-0.19 s for 4,096 features on the 2-core
        machine. Each batch's features are a tensor of their own, which nothing else writes."""
        self.since = time.monotonic()
        if self.start is None:
            return
        feats, rows, start, stop = self.feats, self.rows, self.start, self.stop
        self.start, self.feats, self.rows = None, [], []

        def write() -> None:
            arr = np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)
            if self.normalize and arr.shape[0]:
                arr = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
            rows.sort(key=lambda r: r[0])
            write_segment(self.parts, start, stop, arr.astype(np.float32, copy=False),
                          [row for _, row in rows])

        self.writer.submit(write)


def _fetch(entries: Sequence[Entry]) -> Callable[[int], str]:
    def fetch(i: int) -> str:
        e = entries[i]
        if e.error is not None:
            raise ImageLoadError(f"{e.rel} ({e.path}): {e.error}")
        return e.path
    return fetch


def run_chunks(model: torch.nn.Module, entries: Sequence[Entry], plan: Plan, opts: RunOptions,
               shard: Shard = Shard(), stats: Optional[Dict[str, Any]] = None
               ) -> Tuple[int, List[Tuple[str, str]], int, float]:
    """Step 2: compute and commit this rank's chunks; returns (inputs computed, failures as
    ``(path, why)``, feature dimension, seconds of the batch loop: from opening the decoder to
    the last commit, after the model is prepared). ``stats`` gets how it decoded
    (:func:`~trex_hub.extract.open_batches`)."""
    dim = int(getattr(model, "out_dim", 0) or 0)
    runner = ((opts.engine or prepare(model, opts.device, opts.precision, compile=opts.compile))
              if plan.mine else None)
    if isinstance(runner, InferenceModel):
        runner.expect_batch(min(opts.batch_size, len(entries)))
    decoder = Decoder(resolve_preprocess(opts.preprocess, model), draft=opts.draft,
                      max_pixels=opts.max_pixels)
    workers = opts.num_workers if opts.num_workers is not None else default_workers()
    groups = plan.batches(len(entries))
    bar = progress_bar(sum(len(g) for g in groups), opts.progress and shard.rank == 0,
                       desc="trex-extract")
    failures: List[Tuple[str, str]] = []
    computed = 0
    writer = WriteBehind("trex-extract-writer")
    chunk = _Segment(plan.paths["parts"], dim, opts.normalize, plan.chunk_size, writer)
    t_loop = time.perf_counter()
    done = False
    try:
        kind = decoding_kind(model, len(entries), opts,
                             runner.device if runner else torch.device("cpu"))
        batches = open_batches(groups, _fetch(entries), decoder, kind=kind,
                               device=runner.device if runner else torch.device("cpu"),
                               num_workers=workers, strict=False, catch_all=True,
                               describe=lambda i: entries[i].rel, stats=stats)
        for group, (b, feats) in zip(groups, run_batches(runner, batches, groups)):
            chunk.add_batch(group)
            if b.failures and opts.strict:
                raise ExtractError(f"--strict: {b.failures[0][1]}")
            if feats is not None:
                chunk.feats.append(feats.numpy())
            for pos in b.positions:
                chunk.add_row(pos, entries[pos])
            for pos, why in b.failures:
                e = entries[pos]
                why = failure_reason(e, why)
                chunk.add_row(pos, e, why)
                failures.append((e.rel, why))
            computed += len(b.positions) + len(b.failures)
            if time.monotonic() - chunk.since >= opts.commit_seconds:
                chunk.commit()
            if bar is not None:
                bar.update(len(b.positions) + len(b.failures))
                if failures:
                    bar.set_postfix(failed=len(failures), refresh=False)
        chunk.commit()
        done = True
    finally:
        # the segments already handed over are written even when the loop stopped (Ctrl-C, a
        # bad file under --strict): a resumed run then recomputes less
        writer.close(raise_error=done)
        if bar is not None:
            bar.close()
    loop_seconds = time.perf_counter() - t_loop
    if dim == 0 and runner is not None:
        dim = runner.out_dim or dim
    return computed, failures, dim, loop_seconds


# --------------------------------------------------------------------------------------------
# 3. finish
# --------------------------------------------------------------------------------------------


def finish_run(plan: Plan, opts: RunOptions, dim: int, total: int, world_size: int = 1,
               info: Optional[Dict[str, Any]] = None) -> Tuple[int, int]:
    """Step 3 on rank 0, after every rank's chunks are committed: merge them into the final
    files (with ``info`` in the meta), drop the parts folder; returns (ok, failed)."""
    meta = dict(info or {}, format_version=FORMAT_VERSION, dim=dim, total=total,
                preprocess=plan.fingerprint["preprocess"], normalize=bool(opts.normalize),
                precision=opts.precision, draft=bool(opts.draft),
                weights_sha256=plan.fingerprint["weights"], world_size=world_size,
                manifest=plan.paths["manifest"].name, fingerprint=plan.fingerprint)
    n_ok, n_failed = merge(plan.paths, total, dim, meta)
    if not opts.keep_parts:
        shutil.rmtree(plan.paths["parts"], ignore_errors=True)
    plan.close()
    return n_ok, n_failed


def check_engine(model: torch.nn.Module, opts: RunOptions) -> None:
    """An engine of one input size (an ONNX graph is exported at one) must take the run's crop:
    ONNX Runtime refuses any other at the first batch, after the parts folder is made."""
    size = getattr(opts.engine, "image_size", None)
    if size is None:
        return
    cfg = resolve_preprocess(opts.preprocess, model)
    if cfg is not None and cfg.crop != size:
        raise ExtractError(f"the engine takes {size}x{size} inputs but the run's preprocessing "
                           f"crops to {cfg.crop}x{cfg.crop}; make it with image_size={cfg.crop} "
                           "(trex_hub.onnx_export.engine_for)")


def extract_to_file(model: torch.nn.Module, entries: Sequence[Entry], out: PathLike,
                    options: Optional[RunOptions] = None, *, rank: int = 0, world_size: int = 1,
                    barrier: Optional[Callable[[], None]] = None,
                    info: Optional[Dict[str, Any]] = None,
                    log: Callable[[str], None] = _no_log, **overrides: Any) -> Summary:
    """Extract features of ``entries`` (from :func:`~trex_hub.imagefiles.collect_inputs`) into
    ``out``, streaming: plan, run chunks, finish (see the module docstring).

    ``options`` (default :class:`RunOptions`), with any of its fields given as keywords on top
    (``extract_to_file(model, entries, "f.npy", batch_size=64, resume=True)``). Bad files are
    skipped and listed as failed in the manifest unless ``strict`` (then the first one raises
    :class:`~trex_hub.featurefile.ExtractError`).

    Under ``torchrun``, pass ``rank`` / ``world_size`` and a ``barrier``: rank ``r`` computes
    chunks ``r, r + world_size, ...``; rank 0 prepares the run and merges every chunk in input
    order once all ranks are done. The parts folder must be on a filesystem every rank sees.
    """
    opts = dataclasses.replace(options or RunOptions(), **overrides)
    opts.check()
    output_paths(out)  # validates the suffix before anything else
    problem = output_problem(out)  # a folder of that name fails only at the merge, after the work
    if problem:
        raise ValueError(problem)
    check_engine(model, opts)
    shard = Shard(rank, world_size, barrier or _no_barrier)
    t_start = time.perf_counter()
    plan = plan_run(model, entries, out, opts, shard, log)
    if plan is None:
        dim = int(getattr(model, "out_dim", 0) or 0)
        return Summary(len(entries), -1, -1, dim, 0.0, 0, [], Path(out) if rank == 0 else None)
    try:
        decoding: Dict[str, Any] = {}
        with write_errors(plan.paths):
            computed, failures, dim, loop_s = run_chunks(model, entries, plan, opts, shard,
                                                         decoding)
        shard.barrier()
        if rank != 0:
            return Summary(len(entries), -1, len(failures), dim, time.perf_counter() - t_start,
                           computed, failures, None, loop_s, decoding)
        with write_errors(plan.paths):
            n_ok, n_failed = finish_run(plan, opts, dim, len(entries), world_size, info)
    except BaseException:
        if world_size == 1:  # under torchrun, the other ranks may be committing
            drop_unused_parts(plan.paths, plan.lock)
        raise
    finally:
        plan.close()
    return Summary(len(entries), n_ok, n_failed, dim, time.perf_counter() - t_start, computed,
                   failures, plan.paths["features"], loop_s, decoding)


__all__ = ["RunOptions", "Shard", "Summary", "Plan", "ExtractError", "fingerprint", "plan_run",
           "run_chunks", "finish_run", "extract_to_file", "check_engine"]
