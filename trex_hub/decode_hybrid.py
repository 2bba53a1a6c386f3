"""Two decoders on one run: batched nvJPEG and the CPU worker processes share the batches.

On a GPU machine each decoding path alone leaves capacity idle: the batched ``decode_jpeg``
path (:mod:`trex_hub.tensor_decode`) keeps a few cores busy and the GPU's JPEG engine, the
worker processes (:mod:`trex_hub.decode_procs`) the other cores. :func:`hybrid_batches` runs
both as *lanes*. A lane takes the run's next batch whenever it has room for one
(:class:`Claims`), so the faster lane takes more of them. The worker processes run at a lower
CPU priority (``nice``), so that they use the cores the GPU lane's threads and the model's
launches leave idle instead of slowing them.

The batches come out as they are finished, not in the run's order (:func:`merge_lanes`):
waiting for the slower lane's batch stalls the faster one. With stand-in lanes at 100 and 25
batches/s, a first version that merged in order let the fast lane take only 40 of 60 batches
(the slow one's 20 alone took 0.8 s, more than the fast lane alone needs for all 60); as
finished, the fast lane takes 47 and the pair needs 0.83x the fast lane's time alone (the
ideal is 0.80x; ``tests/test_decode_hybrid.py``). The order is restored after the model, on
the features, which are 20-40 times smaller than the pixels
(:func:`trex_hub.extract.run_batches` with ``groups``); no lane takes a batch more than
``window`` batches past the oldest unfinished one (unless it holds that one), which bounds
what is held.

Which lane decodes a batch depends on timing. Each file's pixels are those of one of the two
paths, which differ by the tensor path's documented distance from PIL (well within 1e-2 on
features); ``decode="cpu"`` or ``"gpu"`` give runs that repeat bit for bit.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Union

import torch

from .decode_procs import DecodePool, process_batches
from .decoding import END, Batch, Pump
from .preprocess import PreprocessConfig
from .tensor_decode import callers_stream, tensor_batches
from .transforms import Decoder

# CPU priority steps below the run for the worker processes of the CPU lane
HYBRID_NICE = 10
# cores left to the run's own threads (model launches, the GPU lane's decoding and readers)
HYBRID_RESERVED_CORES = 2
# how far past the oldest unfinished batch a lane may take one
HYBRID_WINDOW = 64

Lane = Callable[[Iterator[Sequence[int]]], Iterator[Batch]]


class Claims:
    """Hands the groups of a run out in order, each to the lane that asks for one first, at
    most ``window`` groups past the oldest one not yet delivered; remembers which lane took
    which, so that a lane's batches (which come in the order it took them) can be named."""

    def __init__(self, groups: Sequence[Sequence[int]], window: int = HYBRID_WINDOW):
        self._groups = groups
        self._window = max(1, window)
        self._next = 0
        self._oldest = 0  # every group before it was delivered
        self._done = [False] * len(groups)
        self._owners: List[str] = []  # the lane of each group taken so far
        self._by_lane: Dict[str, Deque[int]] = {}
        self._counts: Dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = False

    def _take(self, name: str) -> int:
        """Record the next group as lane ``name``'s (with the lock held)."""
        i = self._next
        self._next += 1
        self._owners.append(name)
        self._by_lane.setdefault(name, deque()).append(i)
        self._counts[name] = self._counts.get(name, 0) + 1
        self._cond.notify_all()
        return i

    def _must_wait(self, name: str) -> bool:
        """Whether lane ``name`` must wait before taking the next group: it is ``window`` past
        the oldest undelivered group, and another lane holds that one. (A lane holding it
        itself delivers it first, so it never waits for itself: a lane may ask for more work
        before it hands over what it holds.)"""
        return (not self._closed and self._next < len(self._groups)
                and self._next >= self._oldest + self._window
                and self._owners[self._oldest] != name)

    def lane(self, name: str) -> Iterator[Sequence[int]]:
        """The groups lane ``name`` takes: the next one each time it asks (see
        :meth:`_must_wait` for when it waits)."""
        while True:
            with self._cond:
                while self._must_wait(name):
                    self._cond.wait(0.5)
                if self._closed or self._next >= len(self._groups):
                    return
                i = self._take(name)
            yield self._groups[i]

    def delivered(self, name: str) -> int:
        """The index of the group of lane ``name``'s next batch, now delivered."""
        with self._cond:
            i = self._by_lane[name].popleft()
            self._done[i] = True
            while self._oldest < len(self._done) and self._done[self._oldest]:
                self._oldest += 1
            self._cond.notify_all()
            return i

    def held(self, name: str) -> int:
        """How many groups lane ``name`` took and has not delivered yet."""
        with self._cond:
            return len(self._by_lane.get(name, ()))

    def close(self) -> None:
        """Hand out no more groups (lanes then finish what they took and end)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def taken(self) -> Dict[str, int]:
        """How many groups each lane has taken so far."""
        with self._cond:
            return dict(self._counts)


def merge_lanes(groups: Sequence[Sequence[int]], lanes: Dict[str, Lane], *, depth: int = 1,
                contexts: Optional[Dict[str, Callable[[], Any]]] = None,
                claims: Optional[Claims] = None) -> Iterator[Batch]:
    """The batches of ``groups``, each made by one of ``lanes``, as they are finished.

    ``lanes[name](claimed)`` is a lane: it turns the groups it takes from ``claimed`` (a lazy
    iterator) into one :class:`Batch` each, in that order, reading ``claimed`` only when it has
    room for more work. Every lane runs in a :class:`~trex_hub.decoding.Pump` thread of its own
    (``contexts[name]`` entered there); together they are at most ``depth`` batches per lane
    ahead of the consumer. A lane's failure is raised at once. Closing the merged iterator
    stops handing out groups and closes every lane."""
    if not groups:
        return
    claims = claims if claims is not None else Claims(groups)
    contexts = contexts or {}
    ready: "queue.Queue" = queue.Queue(maxsize=max(1, depth) * len(lanes))
    pumps: List[Pump] = []
    try:
        for name, lane in lanes.items():
            pumps.append(Pump(lambda name=name, lane=lane: lane(claims.lane(name)),
                              name=f"trex-lane-{name}", into=ready, tag=name,
                              context=contexts.get(name, contextlib.nullcontext)))
        ended = set()
        for _ in range(len(groups)):
            while True:
                name, ok, item = ready.get()
                if not ok:
                    raise item
                if item is not END:
                    break
                ended.add(name)
                if claims.held(name):  # it took groups and ended without their batches
                    raise RuntimeError(f"the decoding lane {name!r} ended with "
                                       f"{claims.held(name)} batch(es) it took still to make")
                if len(ended) == len(lanes):
                    raise RuntimeError("the decoding lanes ended with batches of the run "
                                       "still to make")
            claims.delivered(name)
            yield item
    finally:
        claims.close()
        for pump in pumps:
            pump.close()


def _own_copies(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """The batches of the CPU lane in memory of their own: a worker batch is a view of a shared
    slot that the next batch reuses, and the merged order may hold it longer. For CUDA the copy
    is pinned, so the model's upload needs no staging copy of its own."""
    pin = device.type == "cuda"
    try:
        for b in batches:
            if b.data is not None:
                b = b._replace(data=b.data.pin_memory() if pin else b.data.clone())
            yield b
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def hybrid_batches(groups: Sequence[Sequence[int]], fetch: Callable[[int], Any],
                   decoder: Decoder, cfg: PreprocessConfig, *,
                   device: Union[str, torch.device] = "cpu", num_workers: int = 4,
                   strict: bool = True, describe: Callable[[int], str] = "item {}".format,
                   catch_all: bool = False, claims: Optional[Claims] = None,
                   stats: Optional[Dict[str, Any]] = None) -> Iterator[Batch]:
    """Batches of ``crop x crop`` uint8 NHWC tensors, as they are finished, from two lanes at
    once (the module docstring): ``"gpu"``, the
    batched ``decode_jpeg`` path on ``device`` (its batches on the device) and ``"cpu"``, the
    PIL decoder in ``num_workers - 2`` worker processes (at least one; their batches in host
    memory, pinned for CUDA). Failures follow :func:`trex_hub.decoding.decode_batches`.
    ``stats["lanes"]`` gets the number of batches each lane took, once the run ends."""
    device = torch.device(device)
    groups = [list(g) for g in groups]
    claims = claims if claims is not None else Claims(groups)
    # the GPU lane queues its kernels on the caller's stream, as tensor_batches does for its
    # caller: the lane's thread enters that stream before it decodes
    stream = callers_stream(device)
    return _hybrid(groups, fetch, decoder, cfg, device, num_workers, claims, stream,
                   dict(strict=strict, describe=describe, catch_all=catch_all), stats)


def _hybrid(groups: List[List[int]], fetch: Callable[[int], Any], decoder: Decoder,
            cfg: PreprocessConfig, device: torch.device, num_workers: int, claims: Claims,
            stream: Callable[[], Any], kw: Dict[str, Any],
            stats: Optional[Dict[str, Any]]) -> Iterator[Batch]:
    if not groups:
        return
    # the worker processes are forked here, in the consumer's thread, before any lane's
    # thread runs: a fork copies only the forking thread, and locks another thread holds at
    # that moment (an allocator's, a decoder's) would stay locked in the children
    pool = DecodePool(decoder, max(1, num_workers - HYBRID_RESERVED_CORES), 3,
                      max(len(g) for g in groups), (cfg.crop, cfg.crop, 3), nice=HYBRID_NICE)

    def gpu_lane(claimed: Iterator[Sequence[int]]) -> Iterator[Batch]:
        # the lane's own thread decodes and resizes: no second thread to hand batches over
        return tensor_batches(claimed, fetch, decoder, cfg, device=device,
                              num_workers=max(1, num_workers), background=False, **kw)

    def cpu_lane(claimed: Iterator[Sequence[int]]) -> Iterator[Batch]:
        return _own_copies(process_batches(claimed, fetch, decoder, num_workers=0,
                                           crop=cfg.crop, pool=pool, **kw), device)

    try:
        yield from merge_lanes(groups, {"gpu": gpu_lane, "cpu": cpu_lane},
                               contexts={"gpu": stream}, claims=claims)
    finally:
        pool.close()  # already closed by its lane, unless that lane never started
        if stats is not None:
            stats["lanes"] = claims.taken()


__all__ = ["hybrid_batches", "merge_lanes", "Claims", "HYBRID_NICE", "HYBRID_RESERVED_CORES",
           "HYBRID_WINDOW"]
