"""Decoding in threads: inputs -> uint8 batches, in order, a bounded number of batches ahead.

The reference CPU decoding (:class:`~trex_hub.transforms.Decoder`, PIL) run by a thread pool
(PIL releases the GIL while decoding and resizing). :class:`Batch` is what every decoding path
yields: this one, the worker processes of :mod:`trex_hub.decode_procs` and the tensor / nvJPEG
path of :mod:`trex_hub.tensor_decode`; :mod:`trex_hub.extract` picks one.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import (Any, Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch

from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .transforms import Decoder, ImageLoadError


class Batch(NamedTuple):
    """A decoded batch: ``data`` holds the items at ``positions`` (uint8 ``[n, H, W, 3]``, or
    float ``[n, 3, H, W]`` when an input was an already-normalised tensor; ``None`` when every
    item failed); ``failures`` lists ``(position, reason)`` of the items that could not be used."""

    positions: List[int]
    data: Optional[torch.Tensor]
    failures: List[Tuple[int, str]]


def _decode_one(decoder: Decoder, item: Any, what: str) -> Union[np.ndarray, torch.Tensor]:
    if isinstance(item, torch.Tensor) and item.is_floating_point():
        if item.ndim != 3 or item.shape[0] != 3:
            raise ImageLoadError(f"{what}: a float tensor item must be a normalised [3, H, W] "
                                 f"image; got {tuple(item.shape)}")
        return item.detach().float().cpu()
    return decoder(item, what)


def decode_item(decoder: Decoder, get_item: Callable[[], Any], what: str, *, strict: bool,
                catch_all: bool) -> Tuple[Optional[Union[np.ndarray, torch.Tensor]], Optional[str]]:
    """``(decoded, None)`` or ``(None, why)``: one input through the PIL decoder, with the
    engine's failure rules (``strict`` raises; ``catch_all`` also reports unexpected errors)."""
    try:
        return _decode_one(decoder, get_item(), what), None
    except ImageLoadError as exc:
        if strict:
            raise
        return None, str(exc)
    except Exception as exc:
        if strict or not catch_all:
            raise
        return None, f"{what}: {type(exc).__name__}: {exc}"


def normalise(pixels: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]``, normalised with ``mean`` / ``std``
    (ImageNet's by default)."""
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    return (pixels.movedim(-1, -3).float() / 255.0 - m) / s


def batch_ranges(count: int, batch_size: int) -> List[range]:
    """Positions ``0..count-1`` cut into consecutive batches of ``batch_size``."""
    return [range(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def _stack(positions: List[int], arrays: List[Union[np.ndarray, torch.Tensor]],
           decoder: Decoder) -> torch.Tensor:
    shapes = {tuple(a.shape) for a in arrays}
    floats = any(isinstance(a, torch.Tensor) for a in arrays)
    if floats:  # decoded images join the caller's normalised tensors, normalised the same way
        arrays = [a if isinstance(a, torch.Tensor) else
                  normalise(torch.from_numpy(np.array(a)), decoder.mean, decoder.std)
                  for a in arrays]
        shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        raise ImageLoadError(f"items {positions[0]}..{positions[-1]} have different sizes "
                             f"{sorted(shapes)}; use a preprocess preset to resize them")
    if floats:
        return torch.stack(arrays)
    return torch.from_numpy(np.stack(arrays))


def decode_batches(groups: Iterable[Sequence[int]], fetch: Callable[[int], Any],
                   decoder: Decoder, *, num_workers: int = 0, prefetch: int = 2,
                   strict: bool = True, describe: Callable[[int], str] = "item {}".format,
                   catch_all: bool = False) -> Iterator[Batch]:
    """Decode ``fetch(i)`` for the positions of each group into one :class:`Batch` per group,
    in order. With ``num_workers > 0`` a thread pool decodes up to ``prefetch`` groups ahead of
    the consumer (PIL releases the GIL while decoding and resizing, so this overlaps the forward
    pass). ``strict`` raises the first :class:`ImageLoadError`; otherwise failures are reported
    in the batch. ``catch_all`` also turns unexpected exceptions into failures.
    """

    def work(pos: int):
        return decode_item(decoder, lambda: fetch(pos), describe(pos), strict=strict,
                           catch_all=catch_all)

    def assemble(group: Sequence[int], results) -> Batch:
        ok_pos, arrays, failures = [], [], []
        for pos, (arr, err) in zip(group, results):
            if err is None:
                ok_pos.append(pos)
                arrays.append(arr)
            else:
                failures.append((pos, err))
        data = _stack(ok_pos, arrays, decoder) if arrays else None
        return Batch(ok_pos, data, failures)

    if num_workers <= 0:
        for group in groups:
            yield assemble(group, [work(p) for p in group])
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="trex-decode")
    try:
        it = iter(groups)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) <= prefetch:
                group = next(it, None)
                if group is None:
                    return
                group = list(group)
                pending.append((group, [pool.submit(work, p) for p in group]))

        fill()
        while pending:
            group, futures = pending.popleft()
            results = [f.result() for f in futures]
            fill()  # keep the workers busy while the consumer runs the model
            yield assemble(group, results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


END = object()  # what :meth:`Pump.get` returns once the iterator is exhausted


class Pump:
    """The items of the iterator ``make()``, produced by a thread of its own (started at once)
    into a queue of at most ``depth`` items. :meth:`get` returns them in order, then
    :data:`END`; an exception raised by ``make()`` is raised by :meth:`get` where the item would
    have been. :meth:`close` stops the thread and closes ``make()``'s iterator there (its
    ``finally`` runs). ``context()`` is entered around the whole run in that thread (a CUDA
    device and stream).

    With ``into`` (a queue shared by several pumps) the entries go there instead, as ``(tag,
    ok, item)``: ``(tag, True, item)`` per item, ``(tag, True, END)`` at the end, ``(tag,
    False, exception)`` on failure; the reader of that queue takes them (:meth:`get` is then
    not used)."""

    def __init__(self, make: Callable[[], Iterator[Any]], *, depth: int = 1,
                 name: str = "trex-bg", context: Callable[[], Any] = contextlib.nullcontext,
                 into: "Optional[queue.Queue]" = None, tag: Any = None):
        self._items: "queue.Queue[Tuple[Any, bool, Any]]" = (
            into if into is not None else queue.Queue(maxsize=max(1, depth)))
        self._tag = tag
        self._stop = threading.Event()
        self._over = False
        self._thread = threading.Thread(target=self._run, args=(make, context), name=name,
                                        daemon=True)
        self._thread.start()

    def _put(self, ok: bool, item: Any) -> bool:
        entry = (self._tag, ok, item)
        while not self._stop.is_set():
            try:
                self._items.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[Any]], context: Callable[[], Any]) -> None:
        try:
            with context():
                source = make()
                try:
                    for item in source:
                        if not self._put(True, item):
                            return
                finally:
                    close = getattr(source, "close", None)
                    if close is not None:
                        close()
            self._put(True, END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(False, exc)

    def get(self) -> Any:
        """The next item, :data:`END` after the last one; raises what ``make()`` raised."""
        if self._over:
            return END
        _, ok, item = self._items.get()
        if not ok or item is END:
            self._over = True
        if not ok:
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (after the item it is producing) and wait for it."""
        self._stop.set()
        self._thread.join()


def in_background(make: Callable[[], Iterator[Any]], *, depth: int = 1, name: str = "trex-bg",
                  context: Callable[[], Any] = contextlib.nullcontext) -> Iterator[Any]:
    """The items of the iterator ``make()``, produced by a :class:`Pump` up to ``depth`` items
    ahead of the consumer, in order. An exception raised by ``make()`` reaches the consumer
    where the item would have been; closing the consumer (``break``, an error, garbage
    collection) stops the thread and closes ``make()``'s iterator there (its ``finally`` runs).
    The thread starts on the first ``next()``: an iterator never used starts none."""

    def consume() -> Iterator[Any]:
        pump = Pump(make, depth=depth, name=name, context=context)
        try:
            while True:
                item = pump.get()
                if item is END:
                    return
                yield item
        finally:
            pump.close()

    return consume()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Decoding workers by default: one per core this process may run on (no cap: worker
    processes scale where threads were held back by the GIL). Under ``torchrun`` with several
    processes on this machine (``LOCAL_WORLD_SIZE``) whose cores were not split among them by
    an affinity mask, this process's share: 8 ranks on 64 cores decode with 8 workers each, not
    64 (512 decoding processes on 64 cores)."""
    cores = available_cores()
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    except ValueError:
        local = 1
    if local > 1 and cores >= (os.cpu_count() or cores):
        return max(1, cores // local)
    return cores


__all__ = ["Batch", "decode_batches", "batch_ranges", "default_workers", "available_cores",
           "normalise", "in_background", "Pump", "END"]
