"""Decoding in worker processes, into shared-memory uint8 batches.

Threads stop scaling past a few cores (the GIL is held between PIL calls), so for many files on
many cores :func:`process_batches` runs the same :class:`~trex_hub.transforms.Decoder` in worker
processes. The pixels never travel through a pipe: a small ring of preallocated shared uint8
slots ``[slots, batch, H, W, 3]`` is created once, each worker writes its images straight into
the slot row of their batch, and only ``(row, error)`` tuples come back. Each batch is cut into
pieces so that every worker has something to do even at large batch sizes, and at most
``prefetch + 1`` batches are in flight (the shared memory stays ``(prefetch + 1) x batch``
images, about 0.15 MB per 224x224 image).

Same decoder, same pixels: the batches are byte for byte those of the thread path
(:func:`trex_hub.decoding.decode_batches`). Only inputs that can be sent to another process
cheaply are decoded here (file paths); :mod:`trex_hub.extract` keeps threads for in-memory
lists and small jobs.
"""
from __future__ import annotations

import itertools
import math
import os
import queue
import signal
from collections import deque
from typing import (Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

import torch

from .decoding import Batch
from .transforms import Decoder, ImageLoadError

_POLL_S = 2.0


def start_method() -> str:
    """``fork`` where available (workers start in milliseconds and only use PIL / numpy, never
    the parent's CUDA context), else ``spawn``; ``TREX_HUB_MP_START`` overrides."""
    import multiprocessing as mp

    wanted = os.environ.get("TREX_HUB_MP_START")
    if wanted:
        return wanted
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _next_task(tasks, parent: int):
    """The next task, or ``None`` once the parent that started this worker is gone (killed:
    SIGKILL, the OOM killer, a scheduler's SIGTERM): an orphan would otherwise wait for ever,
    holding the run's output pipes."""
    while True:
        try:
            return tasks.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _worker(decoder: Decoder, slots: torch.Tensor, tasks, results, nice: int = 0,
            parent: Optional[int] = None) -> None:
    """Decode ``(batch id, slot, [(row, item, what), ...])`` tasks into ``slots[slot, row]``,
    ``nice`` steps below the parent's CPU priority. Ctrl-C in a terminal reaches the whole
    process group: the parent alone handles it (and stops the workers), so a worker ignores
    it instead of printing its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    if nice:
        try:
            os.nice(nice)
        except (AttributeError, OSError):  # not POSIX, or not allowed: the usual priority
            pass
    view = slots.numpy()  # the shared storage itself, no copy
    shape = tuple(view.shape[2:])
    while True:
        task = _next_task(tasks, os.getppid() if parent is None else parent)
        if task is None:
            return
        bid, slot, rows = task
        out: List[Tuple[int, Optional[str], Optional[str]]] = []
        for row, item, what in rows:
            try:
                arr = decoder(item, what)
                if arr.shape != shape:
                    raise ImageLoadError(f"{what}: decoded to {arr.shape}, expected {shape}")
                view[slot, row] = arr
                out.append((row, None, None))
            except ImageLoadError as exc:
                out.append((row, "image", str(exc)))
            except Exception as exc:  # reported to the parent, which decides (catch_all)
                out.append((row, "other", f"{what}: {type(exc).__name__}: {exc}"))
        results.put((bid, slot, out))


class DecodePool:
    """Worker processes and their ``n_slots`` shared slots of ``batch`` images, for one run
    (:func:`process_batches` starts one, or takes one started earlier: see
    :mod:`trex_hub.decode_hybrid`, which forks its workers before its threads start)."""

    def __init__(self, decoder: Decoder, workers: int, n_slots: int, batch: int,
                 shape: Tuple[int, int, int], nice: int = 0):
        import torch.multiprocessing as tmp

        self.n_slots, self.batch, self.shape = n_slots, batch, shape
        self.closed = False
        ctx = tmp.get_context(start_method())
        self.slots = torch.empty((n_slots, batch, *shape), dtype=torch.uint8).share_memory_()
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(decoder, self.slots, self.tasks,
                                                        self.results, nice, os.getpid()),
                                  name=f"trex-decode-{i}", daemon=True)
                      for i in range(workers)]
        for p in self.procs:
            p.start()

    def get(self):
        while True:
            try:
                return self.results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"decoding worker {dead[0].name} died (exit code "
                                       f"{dead[0].exitcode}); rerun with --workers-mode "
                                       "threads to decode in this process") from None

    def close(self) -> None:
        """Stop the workers (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        for _ in self.procs:
            try:
                self.tasks.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in (self.tasks, self.results):
            q.close()
            q.cancel_join_thread()


def process_batches(groups: Iterable[Sequence[int]], fetch: Callable[[int], Any],
                    decoder: Decoder, *, num_workers: int, crop: int, prefetch: int = 2,
                    strict: bool = True, describe: Callable[[int], str] = "item {}".format,
                    catch_all: bool = False, batch_size: Optional[int] = None,
                    nice: int = 0, pool: Optional[DecodePool] = None) -> Iterator[Batch]:
    """:func:`trex_hub.decoding.decode_batches` with ``num_workers`` processes instead of
    threads, for a decoder whose output is always ``crop x crop`` (a preset). A yielded
    batch's ``data`` is a view of shared memory, valid until the next batch is requested.

    ``groups`` is read as the workers have room: at most ``prefetch + 1`` groups are taken
    ahead of the consumer. With ``batch_size`` (the largest group) it may be a lazy iterator,
    read no further than that; without, it is read whole first to size the slots. ``nice``
    lowers the workers' CPU priority (:mod:`trex_hub.decode_hybrid`). A ``pool`` started
    earlier (with this ``decoder`` and ``crop``) sets the workers, slots and batch size; it is
    closed at the end too."""
    if pool is not None:
        batch_size, n_slots = pool.batch, pool.n_slots
    elif batch_size is None:
        groups = [list(g) for g in groups]
        if not groups:
            return
        batch_size = max(len(g) for g in groups)
        n_slots = min(len(groups), prefetch + 1)
    else:
        n_slots = prefetch + 1
    it = iter(groups)
    first = next(it, None)
    if first is None:
        if pool is not None:
            pool.close()
        return
    it = itertools.chain([first], it)
    if pool is None:
        pool = DecodePool(decoder, max(1, num_workers), n_slots, batch_size, (crop, crop, 3),
                          nice=nice)
    piece = max(1, math.ceil(batch_size / len(pool.procs)))
    try:
        free = list(range(n_slots))
        state: Dict[int, list] = {}  # batch id -> [slot, pieces left, rows]
        order: Deque[Tuple[int, List[int]]] = deque()  # the groups handed out, in order
        ids = itertools.count()

        def submit() -> None:
            while free:
                group = next(it, None)
                if group is None:
                    return
                group = list(group)
                if len(group) > batch_size:
                    raise ValueError(f"a group of {len(group)} items is larger than "
                                     f"batch_size={batch_size}")
                bid, slot = next(ids), free.pop(0)
                rows, known_bad = [], []
                for r, pos in enumerate(group):
                    try:
                        rows.append((r, fetch(pos), describe(pos)))
                    except ImageLoadError as exc:  # unreadable before decoding
                        known_bad.append((r, "image", str(exc)))
                chunks = [rows[i:i + piece] for i in range(0, len(rows), piece)]
                state[bid] = [slot, len(chunks), known_bad]
                order.append((bid, group))
                for c in chunks:
                    pool.tasks.put((bid, slot, c))

        submit()
        while order:
            bid, group = order.popleft()
            while state[bid][1] > 0:
                got, _, out = pool.get()
                state[got][1] -= 1
                state[got][2].extend(out)
            slot, _, rows = state.pop(bid)
            rows.sort(key=lambda r: r[0])
            ok = [r for r, kind, _ in rows if kind is None]
            failures = []
            for r, kind, msg in rows:
                if kind is None:
                    continue
                if strict and kind == "image":
                    raise ImageLoadError(msg)
                if kind == "other" and (strict or not catch_all):
                    raise RuntimeError(msg)
                failures.append((group[r], msg))
            data = None
            if ok:
                data = pool.slots[slot, :len(ok)] if len(ok) == len(group) \
                    else pool.slots[slot, ok].clone()
            yield Batch([group[r] for r in ok], data, failures)
            free.append(slot)  # the consumer is done with this batch
            submit()
    finally:
        pool.close()


__all__ = ["process_batches", "start_method", "DecodePool"]
