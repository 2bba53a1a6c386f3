"""The streaming, resumable, sharded run behind ``trex-extract``: files in, a features file out.

:func:`extract_to_file` takes the entries of :func:`trex_hub.imagefiles.collect_inputs` and a
:class:`RunOptions`, and goes through three steps, each a function of its own:

1. :func:`plan_run` - rank 0 checks what is on disk against the run's fingerprint (fresh start,
   resume, refusal, nothing to do) and records the fingerprint in ``<out>.parts/state.json``;
   every rank then picks its chunks (``rank, rank + world_size, ...``) not yet committed;
2. :func:`run_chunks` - decode and run the model over those chunks, committing each chunk as
   soon as it is complete, so an interruption loses at most one chunk per rank;
3. :func:`finish_run` - rank 0 merges every chunk in input order into the final files
   (:mod:`trex_hub.featurefile`) once all ranks are past the barrier.

A resumed run recomputes nothing committed and writes a file identical to that of an
uninterrupted run. Ranks share nothing but the parts folder and the barrier.
"""
from __future__ import annotations

import dataclasses
import hashlib
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
from .featurefile import (FORMAT_VERSION, ExtractError, chunk_done, merge, output_paths,
                          write_chunk)
from .fileio import PathLike, atomic_write
from .imagefiles import Entry
from .inference import prepare
from .transforms import Decoder, preset_geometry


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
    On disk: ``chunk_size`` inputs per committed chunk (rounded up to a multiple of the batch),
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
        preset_geometry(self.preprocess)  # validates the name
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

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Plan:
    """What this rank computes: chunks ``mine`` of ``n_chunks``, with the run's own sizes."""

    paths: Dict[str, Path]
    fingerprint: Dict[str, Any]
    batch_size: int
    chunk_size: int
    n_chunks: int
    mine: List[int]

    def batches(self, count: int) -> List[range]:
        """The forward-pass batches of this rank's chunks (``count`` inputs in all)."""
        out: List[range] = []
        for k in self.mine:
            start, stop = k * self.chunk_size, min((k + 1) * self.chunk_size, count)
            out += [range(s, min(s + self.batch_size, stop))
                    for s in range(start, stop, self.batch_size)]
        return out


# --------------------------------------------------------------------------------------------
# 1. plan
# --------------------------------------------------------------------------------------------


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entries_digest(entries: Sequence[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.path}\0{e.rel}\0{e.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def fingerprint(model: torch.nn.Module, entries: Sequence[Entry], opts: RunOptions
                ) -> Dict[str, Any]:
    """What a resumed run must share with the one it continues (``state.json``)."""
    chunk_size = int(math.ceil(opts.chunk_size / opts.batch_size) * opts.batch_size)
    fp = {
        "format_version": FORMAT_VERSION, "inputs": _entries_digest(entries),
        "count": len(entries), "weights": _weights_digest(model),
        "dim": int(getattr(model, "out_dim", 0) or 0), "preprocess": opts.preprocess,
        "normalize": bool(opts.normalize), "precision": opts.precision,
        "draft": bool(opts.draft), "max_pixels": opts.max_pixels, "decode": opts.decode,
        "batch_size": opts.batch_size, "chunk_size": chunk_size,
    }
    if opts.engine is not None:  # a resumed run must not mix engines
        fp["engine"] = type(opts.engine).__name__
    return fp


def _adopt_unfinished(parts: Path, fp: Dict[str, Any], log: Callable[[str], None]) -> None:
    """--resume: keep the parts folder if its run is this run, else refuse."""
    try:
        old = json.loads((parts / "state.json").read_text())
    except (OSError, ValueError):
        old = None
    if old is None:  # killed before the state was written: nothing committed
        shutil.rmtree(parts)
        return
    # batch and chunk sizes only shape the work: keep the run's own
    for key in ("batch_size", "chunk_size"):
        if key in old and old[key] != fp[key]:
            log(f"resuming with the run's {key.replace('_', ' ')} {old[key]}")
            fp[key] = old[key]
    if old != fp:
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        raise ExtractError(f"cannot resume {parts}: the run changed ({', '.join(diff)}); pass "
                           "--overwrite to start again")


def _prepare_parts(paths: Dict[str, Path], fp: Dict[str, Any], opts: RunOptions,
                   log: Callable[[str], None]) -> bool:
    """Rank 0: make ``parts`` hold this run's state; ``False`` when the output is complete."""
    parts = paths["parts"]
    if parts.exists():
        if opts.overwrite:
            shutil.rmtree(parts)
        elif not opts.resume:
            raise ExtractError(f"{parts} holds an unfinished run; pass --resume to continue it "
                               "or --overwrite to start again")
        else:
            _adopt_unfinished(parts, fp, log)
    elif paths["features"].exists() and paths["manifest"].exists() and not opts.overwrite:
        if opts.resume:
            log(f"{paths['features']} is already complete; nothing to do")
            return False
        raise ExtractError(f"{paths['features']} exists; pass --overwrite to replace it")
    if not parts.exists():
        parts.mkdir(parents=True)
        atomic_write(parts / "state.json", lambda fh: fh.write(json.dumps(fp, indent=2)), "w")
    for leftover in parts.glob("*.tmp"):
        leftover.unlink()
    return True


def plan_run(model: torch.nn.Module, entries: Sequence[Entry], out: PathLike,
             opts: RunOptions, shard: Shard = Shard(),
             log: Callable[[str], None] = _no_log) -> Optional[Plan]:
    """Step 1 on every rank (rank 0 prepares, the others wait at the barrier): the plan of this
    rank, or ``None`` when the output is already complete (with ``opts.resume``)."""
    paths = output_paths(out)
    fp = fingerprint(model, entries, opts)
    complete = shard.rank == 0 and not _prepare_parts(paths, fp, opts, log)
    shard.barrier()
    if complete or not paths["parts"].exists():  # rank 0 found the run already complete
        return None
    state = json.loads((paths["parts"] / "state.json").read_text())
    batch_size, chunk_size = int(state["batch_size"]), int(state["chunk_size"])
    n_chunks = max(1, math.ceil(len(entries) / chunk_size)) if entries else 0
    ours = range(shard.rank, n_chunks, shard.world_size)
    mine = [k for k in ours if not chunk_done(paths["parts"], k)]
    if len(ours) > len(mine):
        log(f"rank {shard.rank}: resuming, {len(ours) - len(mine)} committed chunk(s) kept")
    return Plan(paths, fp, batch_size, chunk_size, n_chunks, mine)


# --------------------------------------------------------------------------------------------
# 2. run chunks
# --------------------------------------------------------------------------------------------


class _ChunkBuffer:
    """Features and manifest rows of the chunk being computed, committed when the next starts."""

    def __init__(self, parts: Path, dim: int, normalize: bool):
        self.parts, self.dim, self.normalize = parts, dim, normalize
        self.current: Optional[int] = None
        self.feats: List[np.ndarray] = []
        self.rows: List[Tuple[int, Dict[str, Any]]] = []

    def enter(self, k: int) -> None:
        if self.current is not None and k != self.current:
            self.commit()
        self.current = k

    def add_row(self, pos: int, e: Entry, error: Optional[str] = None) -> None:
        self.rows.append((pos, {"index": None, "path": e.rel, "label": e.label,
                                "status": "ok" if error is None else "failed", "error": error}))

    def commit(self) -> None:
        if self.current is None:
            return
        arr = np.concatenate(self.feats) if self.feats else np.zeros((0, self.dim), np.float32)
        if self.normalize and arr.shape[0]:
            arr = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
        self.rows.sort(key=lambda r: r[0])
        write_chunk(self.parts, self.current, arr.astype(np.float32, copy=False),
                    [row for _, row in self.rows])
        self.feats.clear()
        self.rows.clear()


def run_chunks(model: torch.nn.Module, entries: Sequence[Entry], plan: Plan, opts: RunOptions,
               shard: Shard = Shard()) -> Tuple[int, List[Tuple[str, str]], int]:
    """Step 2: compute and commit this rank's chunks; returns (inputs computed, failures as
    ``(path, why)``, feature dimension)."""
    dim = int(getattr(model, "out_dim", 0) or 0)
    runner = ((opts.engine or prepare(model, opts.device, opts.precision, compile=opts.compile))
              if plan.mine else None)
    decoder = Decoder(opts.preprocess, draft=opts.draft, max_pixels=opts.max_pixels)
    workers = opts.num_workers if opts.num_workers is not None else default_workers()
    groups = plan.batches(len(entries))
    bar = progress_bar(sum(len(g) for g in groups), opts.progress and shard.rank == 0,
                       desc="trex-extract")
    failures: List[Tuple[str, str]] = []
    computed = 0
    chunk = _ChunkBuffer(plan.paths["parts"], dim, opts.normalize)
    try:
        kind = choose_decoding(opts.decode, opts.workers_mode, runner.device if runner else
                               torch.device("cpu"), opts.preprocess, True, len(entries), workers)
        batches = open_batches(groups, lambda i: entries[i].path, decoder, kind=kind,
                               device=runner.device if runner else torch.device("cpu"),
                               num_workers=workers, strict=False, catch_all=True,
                               describe=lambda i: entries[i].rel)
        for b, feats in run_batches(runner, batches):
            chunk.enter((b.positions or [b.failures[0][0]])[0] // plan.chunk_size)
            if b.failures and opts.strict:
                raise ExtractError(f"--strict: {b.failures[0][1]}")
            if feats is not None:
                chunk.feats.append(feats.numpy())
            for pos in b.positions:
                chunk.add_row(pos, entries[pos])
            for pos, why in b.failures:
                e = entries[pos]
                prefix = f"{e.rel} ({e.path}): "
                why = why[len(prefix):] if why.startswith(prefix) else why
                chunk.add_row(pos, e, why)
                failures.append((e.rel, why))
            computed += len(b.positions) + len(b.failures)
            if bar is not None:
                bar.update(len(b.positions) + len(b.failures))
                if failures:
                    bar.set_postfix(failed=len(failures), refresh=False)
        chunk.commit()
    finally:
        if bar is not None:
            bar.close()
    if dim == 0 and runner is not None:
        dim = runner.out_dim or dim
    return computed, failures, dim


# --------------------------------------------------------------------------------------------
# 3. finish
# --------------------------------------------------------------------------------------------


def finish_run(plan: Plan, opts: RunOptions, dim: int, total: int, world_size: int = 1,
               info: Optional[Dict[str, Any]] = None) -> Tuple[int, int]:
    """Step 3 on rank 0, after every rank's chunks are committed: merge them into the final
    files (with ``info`` in the meta), drop the parts folder; returns (ok, failed)."""
    meta = dict(info or {}, format_version=FORMAT_VERSION, dim=dim, total=total,
                preprocess=opts.preprocess, normalize=bool(opts.normalize),
                precision=opts.precision, draft=bool(opts.draft),
                weights_sha256=plan.fingerprint["weights"], world_size=world_size,
                manifest=plan.paths["manifest"].name)
    n_ok, n_failed = merge(plan.paths, plan.n_chunks, dim, meta)
    if not opts.keep_parts:
        shutil.rmtree(plan.paths["parts"], ignore_errors=True)
    return n_ok, n_failed


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
    shard = Shard(rank, world_size, barrier or _no_barrier)
    t_start = time.perf_counter()
    plan = plan_run(model, entries, out, opts, shard, log)
    if plan is None:
        dim = int(getattr(model, "out_dim", 0) or 0)
        return Summary(len(entries), -1, -1, dim, 0.0, 0, [], Path(out) if rank == 0 else None)
    computed, failures, dim = run_chunks(model, entries, plan, opts, shard)
    shard.barrier()
    if rank != 0:
        return Summary(len(entries), -1, len(failures), dim, time.perf_counter() - t_start,
                       computed, failures, None)
    n_ok, n_failed = finish_run(plan, opts, dim, len(entries), world_size, info)
    return Summary(len(entries), n_ok, n_failed, dim, time.perf_counter() - t_start, computed,
                   failures, plan.paths["features"])


__all__ = ["RunOptions", "Shard", "Summary", "Plan", "ExtractError", "fingerprint", "plan_run",
           "run_chunks", "finish_run", "extract_to_file"]
