"""Per-iteration learning-rate schedule: linear warm-up from 0, then cosine decay to ``min_lr``."""
from __future__ import annotations

import math

import numpy as np


def peak_lr(base_lr: float, global_batch: int, ref_batch: int = 256) -> float:
    """Linear scaling rule: ``base_lr * global_batch / ref_batch`` (``ref_batch <= 0``: no scaling)."""
    if ref_batch <= 0:
        return float(base_lr)
    return float(base_lr) * global_batch / ref_batch


def lr_schedule(peak: float, min_lr: float, epochs: int, iters_per_epoch: int,
                warmup_epochs: float = 10.0) -> np.ndarray:
    """``float64[epochs * iters_per_epoch]``, the lr of every iteration.

    Iterations ``0..W-1`` (``W = round(warmup_epochs * iters_per_epoch)``) rise linearly,
    ``lr[i] = peak * i / W``; from ``i = W`` (``lr = peak``) a half cosine brings the rate to
    exactly ``min_lr`` at the last iteration.
    """
    total = int(epochs) * int(iters_per_epoch)
    if total <= 0:
        raise ValueError("the schedule needs epochs > 0 and at least one iteration per epoch")
    warm = min(int(round(warmup_epochs * iters_per_epoch)), total)
    sched = np.empty(total, dtype=np.float64)
    if warm:
        sched[:warm] = peak * np.arange(warm, dtype=np.float64) / warm
    n = total - warm
    if n == 1:
        sched[warm] = peak if warm == 0 else min_lr
    elif n > 1:
        t = np.arange(n, dtype=np.float64) / (n - 1)
        sched[warm:] = min_lr + 0.5 * (peak - min_lr) * (1.0 + np.cos(math.pi * t))
    return sched


__all__ = ["peak_lr", "lr_schedule"]
