"""Accuracy and the paper's log-odds aggregate."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

# A top-1 of 0 % or 100 % has infinite log-odds and would dominate any mean over datasets.
# Before the logit, p is clipped to [b, 1 - b] with b = 0.5 / n_test: a perfect score counts as
# if half a test image had been missed. Every accuracy measured on n_test images that is not
# 0 or 100 % (k / n_test, also averaged over seeds) already lies inside, so only the extremes
# move. Without a test size the bound is the fixed LOG_ODDS_EPS (as for 10,000 test images).
LOG_ODDS_EPS = 5e-5


def _checked(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``[N, C]`` scores and ``[N]`` int64 labels, or a ValueError saying what does not fit."""
    scores = np.asarray(scores)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores {scores.shape} do not match labels {labels.shape}")
    if labels.size == 0:
        raise ValueError("no samples to score")
    return scores, labels


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Percentage (0-100) of rows whose true label is among the ``k`` highest scores.

    ``k`` larger than the number of classes counts every row as correct.
    """
    scores, labels = _checked(scores, labels)
    k = min(int(k), scores.shape[1])
    if k == 1:
        hit = scores.argmax(axis=1) == labels
    else:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        hit = (top == labels[:, None]).any(axis=1)
    return float(100.0 * hit.mean())


def mean_per_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of each class's top-1 accuracy, percent.

    The published code's "m-AP" (diagonal of the confusion matrix over its row sums, averaged).
    """
    scores, labels = _checked(scores, labels)
    hit = scores.argmax(axis=1) == labels
    classes, inverse = np.unique(labels, return_inverse=True)
    per_class = np.bincount(inverse, weights=hit, minlength=len(classes)) / np.bincount(inverse)
    return float(100.0 * per_class.mean())


def log_odds_bound(n_test: Optional[int] = None) -> float:
    """The clipping bound ``b`` of :func:`log_odds`: ``0.5 / n_test``, or LOG_ODDS_EPS."""
    if n_test is None:
        return LOG_ODDS_EPS
    if int(n_test) < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    return 0.5 / int(n_test)


def log_odds(top1: float, n_test: Optional[int] = None) -> float:
    """``log(p / (1 - p))`` with ``p = top1 / 100`` (``top1`` in percent) clipped to
    ``[b, 1 - b]``, ``b = 0.5 / n_test`` (see :func:`log_odds_bound`)."""
    p = float(top1) / 100.0
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"top-1 must lie in [0, 100], got {top1}")
    b = log_odds_bound(n_test)
    p = min(max(p, b), 1.0 - b)
    return math.log(p / (1.0 - p))


def log_odds_clipped(top1: float, n_test: Optional[int] = None) -> bool:
    """Whether :func:`log_odds` moved ``top1`` to its bound."""
    p = float(top1) / 100.0
    b = log_odds_bound(n_test)
    return p < b or p > 1.0 - b


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
