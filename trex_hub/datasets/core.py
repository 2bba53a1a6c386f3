"""Dataset containers and the errors of the readers: :class:`LabeledImages`, class selection,
the seeded per-class split and balanced subsets, and the torch ``Dataset`` wrapper."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Dataset

from ..transforms import open_image


class DatasetError(Exception):
    """Base class of the errors raised by the dataset readers."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset files are not where we looked; the message lists the paths tried."""


class DatasetFormatError(DatasetError, ValueError):
    """A dataset file exists but its content is not what the format says."""


# ---------------------------------------------------------------------------------------------
# containers and small utilities
# ---------------------------------------------------------------------------------------------
@dataclass
class LabeledImages:
    """Images with integer labels.

    ``items`` is either a uint8 array ``[N, H, W]`` / ``[N, H, W, C]`` or a list of image paths;
    ``labels`` is int64 ``[N]`` with values in ``range(len(class_names))``.
    """

    items: Any
    labels: np.ndarray
    class_names: List[str]
    name: str = ""
    paths: Optional[List[str]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> Any:
        return self.items

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int]) -> "LabeledImages":
        idx = np.asarray(indices, dtype=np.int64)
        if isinstance(self.items, np.ndarray):
            items: Any = self.items[idx]
        else:
            items = [self.items[i] for i in idx]
        paths = [self.paths[i] for i in idx] if self.paths is not None else None
        return LabeledImages(items, self.labels[idx], list(self.class_names), self.name, paths)


def parse_classes(spec: Union[None, str, int, Sequence[Any]],
                  class_names: Optional[Sequence[str]] = None) -> Optional[List[int]]:
    """A class selection -> a list of class indices (order kept, duplicates refused).

    Accepts ``None`` (all classes), ``"0-4"``, ``"5,6,7"``, ``"0-2,7"``, an int, or a sequence of
    ints / digit strings / class names (names need ``class_names``).
    """
    if spec is None:
        return None
    out: List[int] = []
    if isinstance(spec, (int, np.integer)):
        out = [int(spec)]
    elif isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError(f"class range '{part}' is empty (write low-high)")
                out.extend(range(lo, hi + 1))
            else:
                out.extend(parse_classes([part], class_names) or [])
    else:
        for c in spec:
            if isinstance(c, (int, np.integer)):
                out.append(int(c))
            elif isinstance(c, str) and re.fullmatch(r"\d+", c.strip()):
                out.append(int(c))
            elif isinstance(c, str) and c.strip() and "-" in c and re.fullmatch(
                    r"\d+\s*-\s*\d+", c.strip()):
                out.extend(parse_classes(c, class_names) or [])
            elif isinstance(c, str) and class_names is not None and c in class_names:
                out.append(list(class_names).index(c))
            else:
                known = f"; known names: {', '.join(class_names)}" if class_names else ""
                raise ValueError(f"cannot read class '{c}' (use indices like 0-4 or 5,6,7"
                                 f"{known})")
    if not out:
        raise ValueError(f"class selection {spec!r} selects nothing")
    if len(set(out)) != len(out):
        raise ValueError(f"class selection {spec!r} repeats a class")
    if class_names is not None:
        bad = [c for c in out if c < 0 or c >= len(class_names)]
        if bad:
            raise ValueError(f"classes {bad} out of range: the dataset has {len(class_names)} "
                             f"classes (0-{len(class_names) - 1})")
    return out


def select_classes(labels: np.ndarray, classes: Optional[Sequence[int]],
                   relabel: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(indices of the samples whose label is in ``classes``, their new labels).

    With ``relabel`` the labels become ``0..len(classes)-1`` in the order of ``classes``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if classes is None:
        return np.arange(len(labels)), labels.copy()
    lut = np.full(max(int(labels.max(initial=0)), max(classes)) + 1, -1, dtype=np.int64)
    for new, old in enumerate(classes):
        lut[old] = new if relabel else old
    mapped = lut[labels]
    keep = np.nonzero(mapped >= 0)[0]
    return keep, mapped[keep]


def per_class_split(labels: np.ndarray, fraction: float, seed: int,
                    min_per_class: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: (kept indices, held-out indices), both sorted.

    Each class ``c`` with ``n_c`` samples gives ``max(min_per_class, floor(fraction * n_c + 0.5))``
    samples to the held-out part, capped at ``n_c - 1`` when ``n_c >= 2`` so that every class
    keeps at least one sample on the other side. Classes are visited in increasing order and each
    draws its permutation from one ``numpy.random.default_rng(seed)`` stream, so the split
    depends only on the labels, ``fraction`` and ``seed``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held: List[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        n = len(idx)
        k = max(int(min_per_class), int(np.floor(fraction * n + 0.5)))
        if n >= 2:
            k = min(k, n - 1)
        k = min(k, n)
        if k:
            held.append(idx[rng.permutation(n)[:k]])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.nonzero(mask)[0], held_idx


def balanced_subset(labels: np.ndarray, total: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded class-balanced subset of ``total`` samples.

    Each class gets ``total // C`` samples (the first ``total % C`` classes one more); a class
    with fewer samples gives all it has. ``total`` larger than the dataset returns everything.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if total <= 0:
        raise ValueError("total must be > 0")
    if total >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    base, extra = divmod(int(total), len(classes))
    chosen = []
    for i, c in enumerate(classes):
        idx = np.nonzero(labels == c)[0]
        want = base + (1 if i < extra else 0)
        chosen.append(idx[rng.permutation(len(idx))[:want]])
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------------------------------
# torch Dataset wrappers
# ---------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """A torch ``Dataset`` over :class:`LabeledImages`: ``(transform(RGB PIL image), label)``.

    Without a transform the item is the RGB PIL image itself.
    """

    def __init__(self, data: LabeledImages, transform: Optional[Callable[[Any], Any]] = None):
        self.data = data
        self.transform = transform
        self.classes = list(data.class_names)
        self.targets = data.labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = open_image(self.data.items[index], f"{self.data.name or 'dataset'} item {index}")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.data.labels[index])
