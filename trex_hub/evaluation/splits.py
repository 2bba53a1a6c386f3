"""The validation split of trainval: the published rule (default) or trex_hub's own.

``published`` reproduces the split of the authors' transfer code (naver/trex,
``transfer/data/utils.py::split_trainval`` after ``random.seed(seed)`` in
``classifier_training.py``), so that a seed selects the same validation images as there:

* one Python ``random.Random(seed)`` stream (the published code seeds Python's ``random`` once,
  at start-up, and every class's shuffle continues that stream);
* classes visited in ``np.unique`` order; the indices of class ``c`` (ascending, as
  ``np.where`` gives them) are shuffled in place with ``random.shuffle``;
* ``n_val = int(n_c * fraction)``, at least 1; the **last** ``n_val`` shuffled indices go to
  validation, the others to train;
* train and validation indices are returned in that order (class by class, shuffled order), as
  the published code concatenates them, so the probe sees the rows in the same order.

One published behaviour is deliberately not reproduced: there, a class with too few images for
``int(n_c * fraction) >= 1`` overwrites the fraction with ``1 / n_c`` for every *later* class.
Here every class uses ``fraction``; with no such small class the two rules agree exactly.

``trex_hub`` is the earlier rule of this project (:func:`trex_hub.datasets.per_class_split`:
``numpy.random.default_rng(seed)``, ``max(1, floor(fraction * n_c + 0.5))`` images, sorted
indices); it is kept for comparison with older results.
"""
from __future__ import annotations

import random
from typing import List, Tuple

import numpy as np

from ..datasets import per_class_split

VAL_FRACTION = 0.2
SPLITS = ("published", "trex_hub")


def published_split(labels: np.ndarray, seed: int,
                    fraction: float = VAL_FRACTION) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) by the published rule (see the module docstring)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must lie in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    rng = random.Random(seed)
    train: List[int] = []
    val: List[int] = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0].tolist()
        rng.shuffle(idx)
        n_val = max(1, int(len(idx) * fraction))
        train.extend(idx[:-n_val])
        val.extend(idx[-n_val:])
    return np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)


def validation_split(labels: np.ndarray, seed: int, fraction: float = VAL_FRACTION,
                     rule: str = "published") -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of trainval: ``fraction`` of each class (>= 1) to val.

    ``rule="published"`` (default): the authors' rule, indices in their order;
    ``rule="trex_hub"``: :func:`trex_hub.datasets.per_class_split`, sorted indices.
    """
    if rule == "published":
        return published_split(labels, seed, fraction)
    if rule == "trex_hub":
        return per_class_split(np.asarray(labels, dtype=np.int64), fraction, seed,
                               min_per_class=1)
    raise ValueError(f"validation split rule must be one of {SPLITS}, not {rule!r}")
