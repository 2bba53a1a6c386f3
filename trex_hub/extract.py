"""Feature extraction: turn images into features with a :class:`~trex_hub.model.TReX`.

``extract_features`` is what ``model.extract(...)`` calls.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import ImageLoadError, build_transform, open_image, preset_geometry

_SINGLE = (str, os.PathLike)


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
    """(float batch, None) for an already-normalised batch, else (None, list of items)."""
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


def _describe(index: int) -> str:
    return f"item {index}"


def _prepare(item: Any, index: int, transform, draft: Optional[int]) -> torch.Tensor:
    if isinstance(item, torch.Tensor) and item.is_floating_point():
        if item.ndim != 3:
            raise ImageLoadError(f"{_describe(index)}: a float tensor item must be a normalised "
                                 f"[3, H, W] image; got {tuple(item.shape)}")
        return item.float()
    return transform(open_image(item, _describe(index), draft_size=draft))


def iter_batches(items: Sequence[Any], *, batch_size: int, preprocess: Optional[str],
                 num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Decode and preprocess ``items`` into stacked batches (threads when ``num_workers > 0``)."""
    transform = build_transform(preprocess)
    geo = preset_geometry(preprocess)
    draft = geo[0] if geo else None
    starts = range(0, len(items), batch_size)

    def load(start: int) -> torch.Tensor:
        chunk = [_prepare(items[i], i, transform, draft)
                 for i in range(start, min(start + batch_size, len(items)))]
        shapes = {tuple(t.shape) for t in chunk}
        if len(shapes) > 1:
            raise ImageLoadError(f"items {start}..{start + len(chunk) - 1} have different sizes "
                                 f"{sorted(shapes)}; use a preprocess preset to resize them")
        return torch.stack(chunk)

    if num_workers <= 0:
        for s in starts:
            yield load(s)
        return
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        pending = []
        for s in starts:
            pending.append(pool.submit(load, s))
            if len(pending) > num_workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


@torch.inference_mode()
def _forward(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(batch.to(device, non_blocking=True)).float()


def extract_features(model: torch.nn.Module, images: Any, *, batch_size: int = 32,
                     preprocess: Optional[str] = "transfer", normalize: bool = False,
                     output: str = "torch", num_workers: int = 0) -> Union[torch.Tensor, np.ndarray]:
    """Features of ``images`` from the model's active head (backbone or projector).

    Args:
        images: a path, PIL image, uint8 HxW/HxWxC numpy array, uint8 CxHxW tensor, a list or
            iterable of those, or an already-normalised float batch [N, 3, H, W].
        batch_size: images per forward pass.
        preprocess: ``"transfer"`` (default; Resize 224 bicubic + CenterCrop 224, the paper's
            protocol), ``"imagenet"`` (Resize 256 + CenterCrop 224) or ``None``.
        normalize: L2-normalise each feature vector.
        output: ``"torch"`` (float32 CPU tensor) or ``"numpy"``.
        num_workers: decoding threads (0 decodes in the calling thread).

    Returns:
        ``[N, D]`` float32 features on the CPU (``D = model.out_dim``); ``[0, D]`` for no input.
    """
    if output not in ("torch", "numpy"):
        raise ValueError(f"output must be 'torch' or 'numpy', not {output!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batch, items = _split_inputs(images)
        outs: List[torch.Tensor] = []
        if batch is not None:
            for s in range(0, batch.shape[0], batch_size):
                outs.append(_forward(model, batch[s:s + batch_size], device).cpu())
        else:
            for b in iter_batches(items, batch_size=batch_size, preprocess=preprocess,
                                  num_workers=num_workers):
                outs.append(_forward(model, b, device).cpu())
    finally:
        model.train(was_training)
    dim = getattr(model, "out_dim", None) or 0
    feats = torch.cat(outs) if outs else torch.empty(0, dim)
    if normalize and feats.numel():
        feats = F.normalize(feats, dim=-1)
    return feats.numpy() if output == "numpy" else feats


__all__ = ["extract_features", "iter_batches", "ImageLoadError"]
