"""What ``trex-eval run`` is asked (the data and feature options) and the errors that stop it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from .features import TRANSFER_SIZE


class EvalError(RuntimeError):
    """A run that cannot go on; the message says why."""


class EvalUsageError(EvalError):
    """The arguments ask for something impossible (clashing names, an --out that is a file...);
    ``trex-eval`` exits 2 on it, as on any usage error. Raised before any feature is computed
    (with ``--format features``, a checkpoint may have been loaded to compare its weights)."""


@dataclass
class DataOptions:
    format: str
    data: Optional[str]
    classes: Optional[str] = None
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    subset_seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    name: Optional[str] = None

    def describe(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class FeatureOptions:
    batch_size: int = 64
    image_size: int = TRANSFER_SIZE
    num_workers: int = 0
    device: str = "cpu"
    cache: Optional[str] = None  # folder of cached features (reused when everything matches)
