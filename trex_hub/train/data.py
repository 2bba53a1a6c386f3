"""Training data: the datasets (ImageFolder or Fashion-MNIST), the multi-crop loaders of the two
augmentation paths (PIL in the workers, or decode in the workers + batched tensors on the
device), and the validation loader."""
from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..transforms import ImageLoadError
from .augment import EpochBatches, MultiCrop, MultiCropDataset
from .batch_augment import BatchAugment, DecodedMultiCropDataset, collate_decoded
from .config import LOADER_STARTS
from .runtime import TrainingError


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace):
    """(train, val or None) as :class:`trex_hub.datasets.LabeledImages`."""
    from .. import datasets as ds

    try:
        if args.dataset == "fashion-mnist":
            train = ds.load_fashion_mnist(args.data, "train", classes=args.classes,
                                          limit=args.train_limit, seed=args.data_seed)
            val = None if args.no_val else ds.load_fashion_mnist(
                args.data, "test", classes=args.classes, limit=args.val_limit,
                seed=args.data_seed)
        else:
            if not args.data:
                raise TrainingError("--data is required: an ImageFolder root with train/ and val/ "
                                    "class folders (or --dataset fashion-mnist)")
            parts = ds.load_image_folder(args.data, classes=args.classes, seed=args.data_seed)
            train, val = parts["train"], (None if args.no_val else parts["test"])
            if args.train_limit:
                train = train.subset(ds.balanced_subset(train.labels, args.train_limit,
                                                        args.data_seed))
            if val is not None and args.val_limit:
                val = val.subset(ds.balanced_subset(val.labels, args.val_limit, args.data_seed))
    except (ds.DatasetError, ValueError) as exc:
        if isinstance(exc, TrainingError):
            raise
        raise TrainingError(str(exc)) from None
    if len(train) == 0:
        raise TrainingError("the training set is empty")
    return train, val




# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def resolve_aug(mode: str, device: torch.device) -> str:
    """``--aug``: ``auto`` = ``gpu`` (batched tensors on the device) on CUDA, ``cpu`` (PIL in the
    loader workers) elsewhere; ``gpu`` on a CPU device runs the batched path on the CPU."""
    if mode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if mode not in ("cpu", "gpu"):
        raise TrainingError(f"unknown --aug '{mode}' (auto, cpu or gpu)")
    return mode


@dataclass
class TrainLoader:
    """The training loader and what the loop needs around it. ``augment`` is None on the PIL path
    (the loader yields ``(list of crop batches, labels)``); on the batched path the loader yields
    decoded batches and ``augment(batch)`` returns ``(crops on the device, labels)``."""

    loader: DataLoader
    dataset: MultiCropDataset
    sampler: EpochBatches
    mode: str
    augment: Optional[Callable[[Any], Tuple[List[torch.Tensor], torch.Tensor]]] = None

    def epochs(self, start: int, end: int, what: str = "training") -> Iterator[Iterator[Any]]:
        """For each epoch from ``start`` to ``end - 1``, an iterator of its batches, all drawn
        from one loader iterator (:class:`EpochBatches`): the workers go on into the next epoch
        while this one's last batches train. Take each epoch's batches before the next."""
        self.sampler.set_epochs(start, end)
        stream = loader_batches(self.loader, what)
        for _ in range(start, end):
            yield itertools.islice(stream, self.sampler.per_epoch)


def multicrop_from_args(args: argparse.Namespace) -> MultiCrop:
    return MultiCrop(global_size=args.global_size, global_scale=args.global_scale,
                     n_global=args.global_crops, local_size=args.local_size,
                     local_scale=args.local_scale, n_local=args.local_crops,
                     blur_radius=args.blur_radius, simple=bool(args.simple_aug))


def worker_start_method(choice: str, device: torch.device) -> Optional[str]:
    """How loader workers start: ``None`` for the platform's default, else a start method.

    ``auto`` keeps the platform default (``fork`` on Linux), as a plain ``DataLoader`` does.
    It was ``forkserver`` on CUDA for a while, against the locks of CUDA's threads that a fork
    copies; on the H200 of 2026-11-27 every ``--preset trex_star`` run of ``train_bench.py``
    with forkserver workers hung (three tries), while the same run with ``fork`` workers
    trained at 1,538 images/s (docs/training.md, "Loader"). ``forkserver`` and ``spawn`` stay
    to be asked for."""
    import multiprocessing

    if choice not in LOADER_STARTS:
        raise ValueError(f"--loader-start must be one of {', '.join(LOADER_STARTS)}, "
                         f"not {choice!r}")
    available = multiprocessing.get_all_start_methods()
    if choice == "auto":
        return None
    if choice not in available:
        raise ValueError(f"--loader-start {choice} is not available on this platform "
                         f"(available: {', '.join(available)})")
    return choice


def worker_kwargs(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """The ``DataLoader`` keywords for the workers, shared by the training and validation
    loaders: how they start (``--loader-start``; nothing for the platform's default) and how
    long a batch may take (``--loader-timeout``). Empty without workers."""
    if args.workers <= 0:
        return {}
    out: Dict[str, Any] = {}
    start = worker_start_method(getattr(args, "loader_start", "auto"), device)
    if start:
        out["multiprocessing_context"] = start
    timeout = float(getattr(args, "loader_timeout", 0) or 0)
    if timeout > 0:
        out["timeout"] = timeout
    return out


def _stop_workers(it: Any, wait: float = 5.0) -> None:
    """Shut the workers of loader iterator ``it`` down and make sure they are gone: torch's
    shutdown (private, since 1.x) terminates a stuck worker, but before 2.14 it does not wait
    for it to exit, so it is reaped here, and killed if SIGTERM did not end it."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in getattr(it, "_workers", ()):
        w.join(timeout=wait)
        if w.is_alive():
            w.kill()
            w.join(timeout=wait)


# torch re-raises a worker's exception as "Caught KeyError in DataLoader worker process 0.\n
# Original Traceback (most recent call last): ...", the worker's traceback ending in the line
# "package.module.KeyError: message", or the type alone for an exception without a message
# (MemoryError(), a bare assert) (torch.utils._utils.ExceptionWrapper)
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process (\d+)\.\n"
                           r"Original Traceback.*\n(?:[\w.]+\.)?\1(?:: (.*?))?\s*\Z", re.S)


def worker_error(exc: BaseException) -> Optional[Tuple[str, str, str]]:
    """``(type name, worker number, the exception's own message)`` of an exception that torch
    re-raised from a loader worker; ``None`` for any other."""
    match = _WORKER_ERROR.match(str(exc))
    if match is None:
        return None
    kind, worker, message = match.groups()
    return kind, worker, " ".join((message or "").split())


def _image_error(exc: ImageLoadError, what: str) -> TrainingError:
    """One line naming the file (not the worker's traceback, which torch's message holds)."""
    found = worker_error(exc)
    message = found[2] if found else str(exc)
    return TrainingError(f"{message}; remove or fix the file (the {what} set reads every image "
                         "each epoch), then run again (--resume goes on from the last "
                         "checkpoint)")


def loader_batches(loader: DataLoader, what: str) -> Iterator[Any]:
    """The batches of ``loader``; a batch that took longer than its ``timeout`` becomes a
    :class:`TrainingError` that says what to do (torch's own message names no cause or fix),
    after the workers are shut down (a stuck one is terminated: persistent workers would
    otherwise live on with the loader). An unreadable image, and any other error a worker
    raised, becomes one line too: torch's message for the latter holds the worker's whole
    traceback, which a user must not get as the error line."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except ImageLoadError as exc:
            _stop_workers(it)
            raise _image_error(exc, what) from exc
        except RuntimeError as exc:
            if not loader.timeout or "timed out" not in str(exc):
                _raise_worker_error(it, exc, what)
                raise
            _stop_workers(it)
            raise TrainingError(
                f"no {what} batch from the {loader.num_workers} loader workers in "
                f"{loader.timeout:.0f} s: a worker is stuck, or reading the data is far slower "
                "than expected. The last checkpoint written is kept (--resume goes on "
                "from it). Try --loader-start spawn or fork, or --workers 0 to see the worker's "
                "error here; for slow storage, raise --loader-timeout (0: no limit)") from exc
        except Exception as exc:
            _raise_worker_error(it, exc, what)
            raise
        yield batch


def _raise_worker_error(it: Any, exc: Exception, what: str) -> None:
    """Raise a one-line :class:`TrainingError` for an error re-raised from a worker; return
    for any other (raised in this process: its traceback is there for ``--debug``)."""
    found = worker_error(exc)
    if found is None:
        return
    kind, worker, message = found
    _stop_workers(it)
    if kind == "MemoryError":
        raise TrainingError(f"{what} loader worker {worker} ran out of memory"
                            f"{f' ({message})' if message else ''}: lower --workers or "
                            "--batch-size, then run again (--resume goes on from the last "
                            "checkpoint)") from exc
    raise TrainingError(
        f"{what} loader worker {worker} failed: {kind}{f': {message}' if message else ''}. "
        "Run with --workers 0 (and --debug) to see where") from exc


def device_batches(batches: Iterable[Any], data: TrainLoader, device: torch.device,
                   memory_format: torch.memory_format = torch.preserve_format,
                   ahead: bool = False) -> Iterator[Tuple[List[torch.Tensor], torch.Tensor]]:
    """``(crop batches, labels)`` on ``device`` for each loader batch of ``data``.

    ``ahead`` (batched path only, ``--aug-ahead``): the next batch is augmented before this one
    is handed over, on a CUDA stream of its own, so its kernels run beside this batch's step
    instead of after it. The crops are the same; the main stream waits for them (an event) and
    the allocator keeps them until the main stream is done with them (``record_stream``). On
    the CPU the order is the same, without a stream."""
    if data.augment is None:
        for crops, labels in batches:
            yield ([x.to(device, non_blocking=True, memory_format=memory_format) for x in crops],
                   labels.to(device, non_blocking=True))
        return
    if not ahead:
        for batch in batches:
            yield data.augment(batch)
        return
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    pending = None
    for batch in batches:
        done = None
        if side is None:
            ready = data.augment(batch)
        else:
            with torch.cuda.stream(side):
                ready = data.augment(batch)
                done = torch.cuda.Event()
                done.record(side)
        if pending is not None:
            yield _hand_over(*pending, device)
        pending = (ready, done)
    if pending is not None:
        yield _hand_over(*pending, device)


def _hand_over(ready: Tuple[List[torch.Tensor], torch.Tensor], done: Optional[Any],
               device: torch.device) -> Tuple[List[torch.Tensor], torch.Tensor]:
    crops, labels = ready
    if done is not None:
        main = torch.cuda.current_stream(device)
        main.wait_event(done)
        for t in (*crops, labels):
            t.record_stream(main)
    return crops, labels


def build_train_loader(args: argparse.Namespace, train_data: Any, device: torch.device,
                       rank: int = 0, world_size: int = 1,
                       channels_last: bool = False) -> TrainLoader:
    """Per-process training loader: a seeded ``DistributedSampler`` (drop_last) cut into
    batches of every epoch by :class:`EpochBatches`; persistent workers with
    ``--prefetch-factor`` batches each, started as :func:`worker_start_method` says."""
    from ..datasets import ImageDataset

    crops = multicrop_from_args(args)
    mode = resolve_aug(getattr(args, "aug", "cpu"), device)
    augment = None
    collate = None
    if mode == "gpu":
        dataset: MultiCropDataset = DecodedMultiCropDataset(
            train_data, crops, seed=args.seed, draft=not getattr(args, "no_jpeg_draft", False))
        collate = collate_decoded
        augment = BatchAugment(crops, device, channels_last=channels_last)
    else:
        dataset = MultiCropDataset(ImageDataset(train_data), crops, seed=args.seed)
    sampler = EpochBatches(DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                              shuffle=True, seed=args.seed, drop_last=True),
                           args.batch_size)
    extra: Dict[str, Any] = {}
    if args.workers > 0:
        extra = {"persistent_workers": True,
                 "prefetch_factor": max(1, int(getattr(args, "prefetch_factor", 4))),
                 **worker_kwargs(args, device)}
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", collate_fn=collate, **extra)
    return TrainLoader(loader, dataset, sampler, mode, augment)


__all__ = ["load_data", "resolve_aug", "TrainLoader", "multicrop_from_args",
           "build_train_loader", "device_batches", "worker_start_method", "worker_kwargs",
           "loader_batches", "worker_error", "LOADER_STARTS"]
