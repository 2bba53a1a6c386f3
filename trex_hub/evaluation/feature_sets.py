"""Pre-extracted feature sets (``--format features``): the trex-extract outputs of each model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .. import datasets as dsets
from ..featurefile import OUTPUT_FORMATS
from ..fileio import PathLike
from .image_sets import _apply_limits, _select_classes
from .options import DataOptions, EvalError

_TRAIN_NAMES = ("trainval", "train")
_TEST_NAMES = ("test", "val")


def _find_split(base: Path, names: Sequence[str]) -> Optional[Path]:
    for n in names:
        for suffix in OUTPUT_FORMATS:
            if (base / f"{n}{suffix}").is_file():
                return base / f"{n}{suffix}"
    return None


def _read_feature_split(path: Path) -> Tuple[np.ndarray, List[Any]]:
    from ..featurefile import read_features

    feats, rows = read_features(path)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2:
        raise EvalError(f"{path}: features of shape {feats.shape}, expected [N, D]")
    # row i of the features belongs to the manifest row whose "index" is i; failed files have
    # no features (index None) and are left out
    rows = [r for r in rows if r.get("index") is not None and r.get("status", "ok") == "ok"]
    idx = [int(r["index"]) for r in rows]
    if any(i < 0 or i >= len(feats) for i in idx):
        raise EvalError(f"{path}: manifest indices outside the {len(feats)} feature rows")
    feats = feats[idx]
    labels = [r.get("label") for r in rows]
    missing = sum(1 for x in labels if x is None or x == "")
    if missing:
        raise EvalError(f"{path}: {missing} of {len(rows)} images have no label in the manifest; "
                        "extract an ImageFolder tree (class folders give the labels)")
    return feats, labels


def _label_order(values: Sequence[Any]) -> List[Any]:
    uniq = list(dict.fromkeys(values))
    try:
        return sorted(uniq, key=lambda v: (0, int(v)) if str(v).lstrip("-").isdigit()
                      else (1, str(v)))
    except (TypeError, ValueError):  # pragma: no cover
        return sorted(uniq, key=str)


def feature_folder(data: PathLike, model: Optional[str], several: bool) -> Path:
    """Where the trex-extract outputs of ``model`` are: ``DATA`` or ``DATA/<model>``."""
    base = Path(data).expanduser()
    if model is not None and (several or (base / model).is_dir()):
        return base / model
    return base


def feature_files(data: PathLike, model: Optional[str], several: bool) -> Tuple[Path, Path]:
    """(trainval file, test file) of ``model``; a missing one is an error naming the folder.

    Cheap (a few ``stat`` calls), so a run checks every model's files before the first search.
    """
    root = Path(data).expanduser()
    if not root.is_dir():
        raise dsets.DatasetNotFoundError(f"feature folder {root} does not exist")
    base = feature_folder(data, model, several)
    tr, te = _find_split(base, _TRAIN_NAMES), _find_split(base, _TEST_NAMES)
    if tr is None or te is None:
        raise dsets.DatasetNotFoundError(
            f"{base}: expected trex-extract outputs named train* (or trainval*) and test* "
            f"(or val*){' for model ' + model if model else ''}; found "
            f"{sorted(p.name for p in base.iterdir()) if base.is_dir() else 'no folder'}")
    return tr, te


def load_feature_sets(data: PathLike, model: Optional[str],
                      several: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                              List[str]]:
    """Trainval and test features + integer labels from trex-extract outputs.

    Layout: ``DATA/train*`` + ``DATA/test*`` (one model), or ``DATA/<model>/train*`` +
    ``DATA/<model>/test*`` (several; ``trainval`` / ``val`` are accepted too). Classes are
    numbered in the order of the sorted labels (numbers numerically); :func:`subset_features`
    applies ``--classes`` and the limits.
    """
    tr, te = feature_files(data, model, several)
    Xtr, ltr = _read_feature_split(tr)
    Xte, lte = _read_feature_split(te)
    classes = _label_order(ltr)
    index = {str(c): i for i, c in enumerate(classes)}
    unknown = sorted({str(x) for x in lte} - set(index))
    if unknown:
        raise EvalError(f"{te}: test labels {unknown[:5]} never occur in {tr}")
    ytr = np.asarray([index[str(x)] for x in ltr], dtype=np.int64)
    yte = np.asarray([index[str(x)] for x in lte], dtype=np.int64)
    return Xtr, ytr, Xte, yte, [str(c) for c in classes]


def subset_features(sets: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, List[str]],
                    opts: DataOptions) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                List[str]]:
    """``--classes``, ``--train-limit`` and ``--test-limit`` on feature arrays.

    The rows go through the very code that subsets images (:func:`_select_classes`,
    :func:`_apply_limits`), so features extracted from an ImageFolder tree keep the rows of the
    images ``--format imagefolder`` keeps, and a result named ``feats[0,1]`` was evaluated on
    classes 0 and 1. Without these options the arrays come back untouched.
    """
    Xtr, ytr, Xte, yte, classes = sets
    parts = {"train": dsets.LabeledImages(Xtr, ytr, list(classes)),
             "test": dsets.LabeledImages(Xte, yte, list(classes))}
    try:
        parts = _select_classes(parts, opts.classes)
    except ValueError as exc:
        raise EvalError(f"--classes {opts.classes}: {exc}") from None
    parts = _apply_limits(parts, opts)
    return (parts["train"].items, parts["train"].labels, parts["test"].items,
            parts["test"].labels, parts["train"].class_names)
