"""The in-memory extraction engine: images in, an ``[N, D]`` feature matrix out.

:func:`extract_features` is what ``model.extract(...)`` calls. Decoding runs in threads and
overlaps the forward pass (:func:`decode_batches`); the forward pass runs on the prepared fast
path of :mod:`trex_hub.inference` (BatchNorm folded, channels_last, inference mode, optional
autocast on CUDA).

Files on disk are handled elsewhere: :mod:`trex_hub.imagefiles` lists the input images,
:mod:`trex_hub.featurefile` defines the on-disk features format (and reads it back), and
:mod:`trex_hub.extract_run` (above this module) streams features of many files into such a file,
resumably and sharded across ``torchrun`` ranks (``trex-extract``).
"""
from __future__ import annotations

import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import (Any, Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch
import torch.nn.functional as F

from .inference import PRECISIONS, InferenceModel, prepare
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .transforms import Decoder, ImageLoadError, build_transform, preset_geometry

_SINGLE = (str, os.PathLike)


# --------------------------------------------------------------------------------------------
# In-memory inputs
# --------------------------------------------------------------------------------------------


def _is_single(images: Any) -> bool:
    from PIL import Image

    if isinstance(images, (*_SINGLE, Image.Image)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (1, 3, 4)
                                    and images.shape[0] > 4)
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


# --------------------------------------------------------------------------------------------
# Decode pipeline
# --------------------------------------------------------------------------------------------


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


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> float ``[..., 3, H, W]``, normalised (ImageNet mean/std)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels.movedim(-1, -3).float() / 255.0 - mean) / std


def batch_ranges(count: int, batch_size: int) -> List[range]:
    """Positions ``0..count-1`` cut into consecutive batches of ``batch_size``."""
    return [range(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def _stack(positions: List[int], arrays: List[Union[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    shapes = {tuple(a.shape) for a in arrays}
    floats = any(isinstance(a, torch.Tensor) for a in arrays)
    if floats:
        arrays = [a if isinstance(a, torch.Tensor) else _normalise(torch.from_numpy(np.array(a)))
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
        try:
            return _decode_one(decoder, fetch(pos), describe(pos)), None
        except ImageLoadError as exc:
            if strict:
                raise
            return None, str(exc)
        except Exception as exc:
            if strict or not catch_all:
                raise
            return None, f"{describe(pos)}: {type(exc).__name__}: {exc}"

    def assemble(group: Sequence[int], results) -> Batch:
        ok_pos, arrays, failures = [], [], []
        for pos, (arr, err) in zip(group, results):
            if err is None:
                ok_pos.append(pos)
                arrays.append(arr)
            else:
                failures.append((pos, err))
        data = _stack(ok_pos, arrays) if arrays else None
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


def iter_batches(items: Sequence[Any], *, batch_size: int, preprocess: Optional[str],
                 num_workers: int = 0, draft: bool = True) -> Iterator[torch.Tensor]:
    """Decode and preprocess ``items`` into normalised float batches ``[n, 3, H, W]``."""
    decoder = Decoder(preprocess, draft=draft)
    groups = batch_ranges(len(items), batch_size)
    for b in decode_batches(groups, items.__getitem__, decoder, num_workers=num_workers):
        yield _normalise(b.data) if b.data.dtype == torch.uint8 else b.data


def default_workers() -> int:
    """Decoding threads by default: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def progress_bar(total: int, enabled: bool, desc: str = "extract"):
    """A tqdm bar on stderr counting images (``None`` when not ``enabled``)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr)


def extract_features(model: torch.nn.Module, images: Any, *, batch_size: int = 32,
                     preprocess: Optional[str] = "transfer", normalize: bool = False,
                     output: str = "torch", num_workers: Optional[int] = None,
                     device: Union[str, torch.device, None] = None, precision: str = "fp32",
                     compile: bool = False, fast: bool = True, draft: bool = True,
                     progress: bool = False) -> Union[torch.Tensor, np.ndarray]:
    """Features of ``images`` from the model's active head (backbone or projector).

    Args:
        images: a path, PIL image, uint8 HxW/HxWxC numpy array, uint8 CxHxW tensor, a list or
            iterable of those, or an already-normalised float batch [N, 3, H, W].
        batch_size: images per forward pass.
        preprocess: ``"transfer"`` (default; Resize 224 bicubic + CenterCrop 224, the paper's
            protocol), ``"imagenet"`` (Resize 256 + CenterCrop 224) or ``None``.
        normalize: L2-normalise each feature vector.
        output: ``"torch"`` (float32 CPU tensor) or ``"numpy"``.
        num_workers: decoding threads; ``None`` picks one per core when there is more than one
            image, ``0`` decodes in the calling thread.
        device: where to run (default: the model's device). The model itself is not moved.
        precision: ``"fp32"`` (default), or ``"bf16"`` / ``"fp16"`` autocast (meant for CUDA;
            on CPU bf16 is only fast with AVX512-BF16/AMX).
        compile: ``torch.compile`` the prepared model (tens of seconds up front; pays off only
            on long runs).
        fast: use the prepared fast path (BatchNorm folded, channels_last). ``False`` runs the
            model as it is, in eval mode.
        draft: let JPEG decoding skip resolution the preset throws away (large photos only).
        progress: show a progress bar with images/s.

    Returns:
        ``[N, D]`` float32 features on the CPU (``D = model.out_dim``); ``[0, D]`` for no input.
        A bad image raises :class:`~trex_hub.transforms.ImageLoadError` naming it.
    """
    if output not in ("torch", "numpy"):
        raise ValueError(f"output must be 'torch' or 'numpy', not {output!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    preset_geometry(preprocess)  # validates the name
    runner = prepare(model, device, precision, compile=compile, channels_last=fast,
                     fold_bn=fast)
    batch, items = _split_inputs(images)
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
            decoder = Decoder(preprocess, draft=draft)
            groups = batch_ranges(len(items), batch_size)
            for b in decode_batches(groups, items.__getitem__, decoder, num_workers=workers):
                outs.append(runner(b.data))
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


__all__ = ["extract_features", "decode_batches", "iter_batches", "default_workers",
           "progress_bar", "Batch", "ImageLoadError", "PRECISIONS", "InferenceModel",
           "build_transform"]
