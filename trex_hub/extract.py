"""The in-memory extraction engine: images in, an ``[N, D]`` feature matrix out.

:func:`extract_features` is what ``model.extract(...)`` calls. Decoding overlaps the forward
pass, by one of four paths that :func:`open_batches` picks: threads
(:mod:`trex_hub.decoding`, the reference), worker processes writing shared-memory batches
(:mod:`trex_hub.decode_procs`, many files on many cores), batched ``decode_jpeg`` on the device
(:mod:`trex_hub.tensor_decode`, nvJPEG on a GPU), or the last two at once
(:mod:`trex_hub.decode_hybrid`). The forward pass runs on the prepared fast
path of :mod:`trex_hub.inference` (BatchNorm folded, channels_last, inference mode, precision),
one batch ahead of the copy of its features back to the host (:func:`run_batches`).

Files on disk are handled elsewhere: :mod:`trex_hub.imagefiles` lists the input images,
:mod:`trex_hub.featurefile` defines the on-disk features format (and reads it back), and
:mod:`trex_hub.extract_run` (above this module) streams features of many files into such a file,
resumably and sharded across ``torchrun`` ranks (``trex-extract``).
"""
from __future__ import annotations

import os
import sys
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch
import torch.nn.functional as F

from . import preprocess as pp
from .decode_hybrid import hybrid_batches
from .decode_procs import process_batches
from .decoding import Batch, batch_ranges, decode_batches, default_workers, normalise
from .choices import DECODES, PRECISIONS, WORKER_MODES
from .inference import InferenceModel, Pending, normalisation, prepare
from .tensor_decode import tensor_batches
from .transforms import Decoder, ImageLoadError, build_transform, resolve_preprocess

# "auto" decodes in processes from this many files and this many workers on
PROCESS_MIN_FILES, PROCESS_MIN_WORKERS = 512, 4
# decode="auto" on CUDA below this many CPU decode workers: both decoders at once ("hybrid")
# where worker processes would decode (PROCESS_MIN_*), else nvJPEG; from it on, the exact PIL
# path. On an H200 with 16 cores (2026-11-27, one round, docs/benchmarks.md) hybrid gave 4,045
# images/s in fp16 and 2,312 in fp32, nvJPEG 3,235 and 2,182, 15 PIL processes 2,403 and
# 2,575; on an H100 nvJPEG gave 3,110-3,827 and 16 PIL processes 2,097-2,394, about 140 each:
# the CPU path alone would need some 25 workers to keep up, so from 32 on (a machine with that
# many cores; not measured) it is taken for its exactness (nvJPEG is 2e-3 to 5e-3 relative
# from it on photos).
GPU_DECODE_BELOW_WORKERS = 32

_SINGLE = (str, os.PathLike)


# --------------------------------------------------------------------------------------------
# In-memory inputs
# --------------------------------------------------------------------------------------------


def _is_single(images: Any) -> bool:
    """Whether ``images`` is one image. A numpy array is: HxW, or HxWxC with C = 1, 3 or 4
    however short (a 4x64 RGB strip is not 4 rows). A 3xHxW or 4xHxW array counts as one too,
    so that :func:`_check_array` refuses it (torch's channels-first layout, or 3 grayscale
    images? it cannot tell). Any other 3-D array is a stack of N grayscale HxW images."""
    from PIL import Image

    if isinstance(images, (*_SINGLE, Image.Image)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and (images.shape[2] in (1, 3, 4)
                                                          or images.shape[0] in (3, 4)))
    if isinstance(images, torch.Tensor):
        return images.ndim == 3
    return False


def _split_inputs(images: Any) -> Tuple[Optional[torch.Tensor], List[Any]]:
    """(float batch, []) for an already-normalised batch, else (None, list of items)."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim == 4:
            return images, []
        if images.ndim == 3:
            return images.unsqueeze(0), []
        raise ImageLoadError(f"a float tensor input must be a normalised [N, 3, H, W] batch or a "
                             f"[3, H, W] image; got shape {tuple(images.shape)}")
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return None, list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return None, list(images)
    if _is_single(images):
        return None, [images]
    if isinstance(images, (bytes, dict)) or not isinstance(images, Iterable):
        raise ImageLoadError(f"unsupported input type {type(images).__name__}; pass an image or "
                             "a list of images")
    return None, list(images)


def _check_array(arr: np.ndarray, what: str) -> None:
    """Refuse, before any work, a 3-D image whose last axis cannot be colour channels: a
    channels-first CxHxW array (torch's layout) was taken for C grayscale images, without an
    error."""
    if arr.ndim != 3 or arr.shape[2] in (1, 3, 4):
        return
    raise ImageLoadError(f"{what}: array of shape {arr.shape} is not an HxW or HxWxC image "
                         f"(C = 1, 3 or 4); if it is channels-first (CxHxW), pass "
                         f"arr.transpose(1, 2, 0); for {arr.shape[0]} grayscale images, "
                         "list(arr)")


def _check_arrays(items: Sequence[Any]) -> None:
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            _check_array(item, f"item {i}")


# --------------------------------------------------------------------------------------------
# Decode pipeline
# --------------------------------------------------------------------------------------------


def iter_batches(items: Sequence[Any], *, batch_size: int, preprocess: Optional[str],
                 num_workers: int = 0, draft: bool = True,
                 mean: Sequence[float] = pp.IMAGENET_MEAN,
                 std: Sequence[float] = pp.IMAGENET_STD) -> Iterator[torch.Tensor]:
    """Decode and preprocess ``items`` into float batches ``[n, 3, H, W]`` normalised with
    ``mean`` / ``std`` (ImageNet's by default; a model's own: ``inference.normalisation``)."""
    decoder = Decoder(preprocess, draft=draft, mean=mean, std=std)
    groups = batch_ranges(len(items), batch_size)
    for b in decode_batches(groups, items.__getitem__, decoder, num_workers=num_workers):
        yield normalise(b.data, mean, std) if b.data.dtype == torch.uint8 else b.data


def choose_decoding(decode: str, workers_mode: str, device: torch.device,
                    preprocess: Optional[str], paths: bool, count: int, workers: int) -> str:
    """``"threads"``, ``"processes"``, ``"tensor"`` or ``"hybrid"`` for a run (see
    :func:`open_batches`)."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, not {decode!r}")
    if workers_mode not in WORKER_MODES:
        raise ValueError(f"workers_mode must be one of {WORKER_MODES}, not {workers_mode!r}")
    if decode in ("gpu", "hybrid") and preprocess is None:
        raise ValueError(f"decode={decode!r} resizes to a preset; pass preprocess='transfer' or "
                         "'imagenet', or decode='cpu'")
    if decode == "auto" and device.type == "cuda" and preprocess is not None and paths \
            and workers_mode in ("auto", "processes") and count >= PROCESS_MIN_FILES \
            and PROCESS_MIN_WORKERS <= workers < GPU_DECODE_BELOW_WORKERS:
        decode = "hybrid"
    if decode == "hybrid":
        if not paths:
            raise ValueError("decode='hybrid' decodes files in worker processes too: pass paths, "
                             "or use decode='gpu' for in-memory images")
        return "hybrid"
    if decode == "gpu" or (decode == "auto" and device.type == "cuda" and preprocess is not None
                           and paths and workers < GPU_DECODE_BELOW_WORKERS):
        return "tensor"
    if workers_mode == "processes" and preprocess is None:
        raise ValueError("workers_mode='processes' needs a preprocess preset (fixed image "
                         "size); pass preprocess='transfer' or workers_mode='threads'")
    if workers_mode == "processes" and not paths:
        raise ValueError("workers_mode='processes' decodes files: pass paths, or use "
                         "workers_mode='threads' for in-memory images")
    if workers_mode == "processes" or (
            workers_mode == "auto" and paths and preprocess is not None and workers > 0
            and count >= PROCESS_MIN_FILES and workers >= PROCESS_MIN_WORKERS):
        return "processes" if workers > 0 else "threads"
    return "threads"


def open_batches(groups: Sequence[Sequence[int]], fetch: Callable[[int], Any], decoder: Decoder,
                 *, kind: str, device: torch.device, num_workers: int, strict: bool = True,
                 describe: Callable[[int], str] = "item {}".format,
                 catch_all: bool = False,
                 stats: Optional[Dict[str, Any]] = None) -> Iterator[Batch]:
    """The batches of ``groups`` by the decoding path ``kind`` (:func:`choose_decoding`): in
    order, but ``"hybrid"``'s as they are finished (``run_batches(..., groups)`` puts the
    features back in order). ``stats`` (a dict) gets ``"kind"``, and for ``"hybrid"`` the
    batches each lane took (``"lanes"``) once the batches end."""
    kw = dict(strict=strict, describe=describe, catch_all=catch_all)
    if stats is not None:
        stats["kind"] = kind
    if kind == "hybrid":
        return hybrid_batches(groups, fetch, decoder, decoder.config, device=device,
                              num_workers=max(1, num_workers), stats=stats, **kw)
    if kind == "tensor":
        cfg = decoder.config
        return tensor_batches(groups, fetch, decoder, cfg, device=device,
                              num_workers=max(1, num_workers), **kw)
    if kind == "processes":
        return process_batches(groups, fetch, decoder, num_workers=num_workers,
                               crop=decoder.config.crop, **kw)
    return decode_batches(groups, fetch, decoder, num_workers=num_workers, **kw)


def _launched_ahead(runner: InferenceModel, batches: Iterable[Batch]
                    ) -> Iterator[Tuple[Batch, Optional[torch.Tensor]]]:
    held: Optional[Tuple[Batch, Optional[Pending]]] = None
    for b in batches:
        launched = runner.launch(b.data) if b.data is not None else None
        if held is not None:
            yield held[0], held[1].result() if held[1] is not None else None
        held = (b, launched)
    if held is not None:
        yield held[0], held[1].result() if held[1] is not None else None


def _first_position(b: Batch) -> int:
    """The first position of a batch's group (each item is either decoded or failed)."""
    return min(b.positions[:1] + [pos for pos, _ in b.failures[:1]])


def in_group_order(pairs: Iterable[Tuple[Batch, Any]], groups: Sequence[Sequence[int]]
                   ) -> Iterator[Tuple[Batch, Any]]:
    """``(batch, features)`` pairs in the order of ``groups``, whatever order they come in (a
    pair that comes early is held until its turn); a pass-through for pairs already in
    order."""
    firsts = [g[0] for g in groups if len(g)]
    held: Dict[int, Tuple[Batch, Any]] = {}
    k = 0
    for pair in pairs:
        held[_first_position(pair[0])] = pair
        while k < len(firsts) and firsts[k] in held:
            yield held.pop(firsts[k])
            k += 1
    if held:
        raise RuntimeError(f"batches of no group of this run: {sorted(held)[:3]}")


def run_batches(runner: InferenceModel, batches: Iterable[Batch],
                groups: Optional[Sequence[Sequence[int]]] = None
                ) -> Iterator[Tuple[Batch, Optional[torch.Tensor]]]:
    """``(batch, features)``: batch ``k + 1`` is decoded and launched before the features of
    batch ``k`` are waited for (on CUDA they come back asynchronously). In the order of
    ``groups`` when given (the hybrid path yields batches as they are finished: the features
    are put back in order, not the pixels), else in the order the batches come."""
    pairs = _launched_ahead(runner, batches)
    return pairs if groups is None else in_group_order(pairs, groups)


def progress_bar(total: int, enabled: bool, desc: str = "extract"):
    """A tqdm bar on stderr counting images (``None`` when not ``enabled``)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr)


def extract_features(model: torch.nn.Module, images: Any, *, batch_size: int = 32,
                     preprocess: Any = "transfer", normalize: bool = False,
                     output: str = "torch", num_workers: Optional[int] = None,
                     device: Union[str, torch.device, None] = None, precision: str = "fp32",
                     compile: bool = False, fast: bool = True, draft: bool = True,
                     progress: bool = False, decode: str = "auto",
                     workers_mode: str = "auto") -> Union[torch.Tensor, np.ndarray]:
    """Features of ``images`` from the model's active head (backbone or projector).

    Args:
        images: a path, PIL image, uint8 HxW/HxWxC numpy array (several: a list, an NxHxWxC
            array, or an NxHxW one of grayscale images; a 3xHxW or 4xHxW array is refused as
            ambiguous), uint8 CxHxW tensor, a list or iterable of those, or an
            already-normalised float batch [N, 3, H, W].
        batch_size: images per forward pass.
        preprocess: ``"transfer"`` (default; Resize 224 bicubic + CenterCrop 224, the paper's
            protocol), ``"imagenet"`` (Resize 256 + CenterCrop 224), ``"model"`` (the model's
            own preprocessing config, as ``get_transform(model)``; the transfer preset for
            every released model), a ``PreprocessConfig``, or ``None``. The preset sets the
            geometry; pixels are normalised with the mean / std of the model's own config
            (ImageNet's for every released model).
        normalize: L2-normalise each feature vector.
        output: ``"torch"`` (float32 CPU tensor) or ``"numpy"``.
        num_workers: decoding workers; ``None`` picks one per core this process may use when
            there is more than one image (under ``torchrun``, its share of the machine's cores:
            :func:`~trex_hub.decoding.default_workers`), ``0`` decodes in the calling thread.
        device: where to run (default: the model's device). The model itself is not moved.
        precision: ``"fp32"`` (default; full fp32, TF32 off on CUDA inside the call), ``"tf32"``
            (TF32 matmul / convolutions on Ampere+ GPUs), or ``"bf16"`` / ``"fp16"`` autocast
            (meant for CUDA; on CPU bf16 is only fast with AVX512-BF16/AMX).
        compile: ``torch.compile`` the prepared model (tens of seconds up front; pays off only
            on long runs).
        fast: use the prepared fast path (BatchNorm folded, channels_last). ``False`` runs the
            model as it is, in eval mode.
        draft: let JPEG decoding skip resolution the preset throws away (large photos only).
        progress: show a progress bar with images/s.
        decode: ``"cpu"`` (PIL, the exact reference), ``"gpu"`` (JPEG files decoded in batches
            by ``decode_jpeg`` on the run's device, nvJPEG on CUDA; other files fall back to
            PIL), ``"hybrid"`` (files only: both at once, each batch to whichever is free; which
            path decodes a file then depends on timing) or ``"auto"`` (for files on CUDA with
            a preset and fewer than 32 decode workers: ``"hybrid"`` from 512 files and 4
            workers, else ``"gpu"``; otherwise ``"cpu"``).
        workers_mode: CPU decoding in ``"threads"``, worker ``"processes"`` (files only, into
            shared memory), or ``"auto"`` (processes for many files and workers).

    Returns:
        ``[N, D]`` float32 features on the CPU (``D = model.out_dim``); ``[0, D]`` for no input.
        A bad image raises :class:`~trex_hub.transforms.ImageLoadError` naming it.
    """
    if output not in ("torch", "numpy"):
        raise ValueError(f"output must be 'torch' or 'numpy', not {output!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    preprocess = resolve_preprocess(preprocess, model)  # "model": the model's own geometry
    batch, items = _split_inputs(images)
    _check_arrays(items)  # before the model is prepared
    runner = prepare(model, device, precision, compile=compile, channels_last=fast,
                     fold_bn=fast)
    runner.expect_batch(min(batch_size, batch.shape[0] if batch is not None else len(items)))
    outs: List[torch.Tensor] = []
    total = batch.shape[0] if batch is not None else len(items)
    bar = progress_bar(total, progress)
    try:
        if batch is not None:
            for s in range(0, batch.shape[0], batch_size):
                outs.append(runner(batch[s:s + batch_size]))
                if bar is not None:
                    bar.update(outs[-1].shape[0])
        elif items:
            workers = num_workers if num_workers is not None else (
                default_workers() if len(items) > 1 else 0)
            paths = all(isinstance(i, _SINGLE) for i in items)
            kind = choose_decoding(decode, workers_mode, runner.device, preprocess, paths,
                                   len(items), workers)
            mean, std = normalisation(model)
            decoder = Decoder(preprocess, draft=draft, mean=mean, std=std)
            groups = batch_ranges(len(items), batch_size)
            batches = open_batches(groups, items.__getitem__, decoder, kind=kind,
                                   device=runner.device, num_workers=workers)
            for b, feats in run_batches(runner, batches, groups):
                outs.append(feats)
                if bar is not None:
                    bar.update(len(b.positions))
    finally:
        if bar is not None:
            bar.close()
    dim = getattr(model, "out_dim", None) or 0
    feats = torch.cat(outs) if outs else torch.empty(0, dim)
    if normalize and feats.numel():
        feats = F.normalize(feats, dim=-1)
    return feats.numpy() if output == "numpy" else feats


__all__ = ["extract_features", "decode_batches", "open_batches", "choose_decoding",
           "run_batches", "in_group_order", "iter_batches", "default_workers", "batch_ranges",
           "progress_bar", "Batch", "ImageLoadError", "PRECISIONS", "DECODES", "WORKER_MODES",
           "InferenceModel", "build_transform"]
