"""Accuracy and the paper's log-odds aggregate (TREX_SPEC section 4)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

# A top-1 of exactly 0 % or 100 % has infinite log-odds; such a p is clipped to
# [LOG_ODDS_EPS, 1 - LOG_ODDS_EPS] (only then; every other p is used as is).
LOG_ODDS_EPS = 1e-6


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Percentage (0-100) of rows whose true label is among the ``k`` highest scores.

    ``k`` larger than the number of classes counts every row as correct.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {scores.shape} do not match labels {labels.shape}")
    if labels.size == 0:
        raise ValueError("no samples to score")
    k = min(int(k), scores.shape[1])
    if k == 1:
        hit = scores.argmax(axis=1) == labels
    else:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        hit = (top == labels[:, None]).any(axis=1)
    return float(100.0 * hit.mean())


def log_odds(top1: float) -> float:
    """``log(p / (1 - p))`` with ``p = top1 / 100`` (``top1`` in percent)."""
    p = float(top1) / 100.0
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"top-1 must lie in [0, 100], got {top1}")
    p = min(max(p, LOG_ODDS_EPS), 1.0 - LOG_ODDS_EPS)
    return math.log(p / (1.0 - p))


def mean_log_odds(top1s: Iterable[float]) -> float:
    """Mean over datasets of :func:`log_odds` of each dataset's top-1 (percent)."""
    vals = [log_odds(t) for t in top1s]
    if not vals:
        raise ValueError("no datasets to average")
    return float(sum(vals) / len(vals))


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample standard deviation with ddof=1; 0.0 for a single value)."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
