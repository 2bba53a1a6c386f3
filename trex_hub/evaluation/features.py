"""Frozen features of a labelled dataset, computed once per model with ``extract_features``."""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from ..extract import extract_features
from ..preprocess import PRESETS
from ..transforms import get_transform, open_image

TRANSFER_SIZE = 224


def build_resize_transform(image_size: int, model: Any = None) -> Callable[[Any], torch.Tensor]:
    """The transfer preset at another size: Resize(size, bicubic) -> CenterCrop(size) -> the
    weights' mean/std (``model``'s preprocessing when it carries one)."""
    base = PRESETS["transfer"]
    cfg = getattr(model, "preprocess_config", None) or base
    return get_transform(replace(cfg, resize=image_size, crop=image_size,
                                 interpolation=base.interpolation))


def _chunk(items: Any, start: int, stop: int) -> List[Any]:
    if isinstance(items, np.ndarray):
        return list(items[start:stop])
    return [items[i] for i in range(start, stop)]


def compute_features(model: torch.nn.Module, items: Any, *, batch_size: int = 64,
                     image_size: int = TRANSFER_SIZE, num_workers: int = 0,
                     chunk_size: Optional[int] = None,
                     log: Optional[Callable[[str], None]] = None,
                     what: str = "images", progress: bool = False) -> np.ndarray:
    """``[N, D]`` float32 pooled features (eval mode, fp32) of ``items`` (paths or uint8 arrays).

    ``image_size=224`` is the paper's preprocessing (the ``"transfer"`` preset: Resize 224 bicubic
    -> CenterCrop 224 -> ImageNet mean/std). Another size applies the same recipe at that size.
    Items are processed in chunks so that only one chunk of decoded images is held in memory.
    ``progress`` shows a bar with an ETA on stderr, advanced chunk by chunk.
    """
    from .progress import progress_bar

    n = len(items)
    chunk = chunk_size or max(4 * batch_size, 256)
    tf = None if image_size == TRANSFER_SIZE else build_resize_transform(image_size, model)
    outs: List[np.ndarray] = []
    t0 = time.time()
    last = t0
    bar = progress_bar(n, f"features {what}", "img", progress)
    try:
        for s in range(0, n, chunk):
            part = _chunk(items, s, min(n, s + chunk))
            if tf is None:
                feats = extract_features(model, part, batch_size=batch_size,
                                         preprocess="transfer", normalize=False, output="numpy",
                                         num_workers=num_workers, draft=False)
            else:
                batch = torch.stack([tf(open_image(x, f"{what} item {s + i}"))
                                     for i, x in enumerate(part)])
                feats = extract_features(model, batch, batch_size=batch_size, preprocess=None,
                                         normalize=False, output="numpy")
            outs.append(np.asarray(feats, dtype=np.float32))
            if bar is not None:
                bar.update(len(part))
            done = min(n, s + chunk)
            now = time.time()
            if log is not None and (now - last > 10 or done == n):
                rate = done / max(now - t0, 1e-9)
                log(f"  features of {what}: {done}/{n} ({rate:.1f} img/s)")
                last = now
    finally:
        if bar is not None:
            bar.close()
    if not outs:
        dim = int(getattr(model, "out_dim", 0) or 0)
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(outs)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
