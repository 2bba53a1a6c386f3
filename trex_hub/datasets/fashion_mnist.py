"""Fashion-MNIST (and any MNIST-style idx file) from local files."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..fileio import PathLike
from .core import (DatasetFormatError, DatasetNotFoundError, ImageDataset, LabeledImages,
                   balanced_subset, parse_classes, select_classes)

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "TREX_FASHION_MNIST"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


# ---------------------------------------------------------------------------------------------
# idx files (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an idx file (plain or ``.gz``) into a numpy array of its declared shape.

    Format: two zero bytes, a type code, the number of dimensions, then one big-endian uint32
    per dimension, then the data in row-major order.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: no such idx file") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetFormatError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path}: not an idx file (bad magic number "
                                 f"{raw[:4].hex() or 'empty file'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        raise DatasetFormatError(f"{path}: idx header declares shape {shape} ({expected} bytes) "
                                 f"but the file holds {len(raw)} bytes (truncated or corrupt)")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an idx file (gzip-compressed when the name ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"idx cannot store dtype {array.dtype}")
    code = codes[native]
    big = array.astype(_IDX_DTYPES[code], copy=False)
    payload = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
               + big.tobytes())
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


_FMNIST_PREFIX = {"train": "train", "test": "t10k"}


def _fashion_mnist_dirs(root: Optional[PathLike]) -> List[Path]:
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_ROOT
    base = Path(root).expanduser()
    # the Debian package layout, torchvision's layout, and a raw/ sub-folder
    return [base, base / "raw", base / "FashionMNIST" / "raw", base / "fashion-mnist"]


def fashion_mnist_files(root: Optional[PathLike], split: str) -> Tuple[Path, Path]:
    """(images file, labels file) of a Fashion-MNIST split, plain or ``.gz``."""
    if split not in _FMNIST_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prefix = _FMNIST_PREFIX[split]
    tried: List[str] = []
    for d in _fashion_mnist_dirs(root):
        found = []
        for kind, nd in (("images", 3), ("labels", 1)):
            hit = None
            for sep in ("-", "."):
                for ext in ("", ".gz"):
                    p = d / f"{prefix}-{kind}{sep}idx{nd}-ubyte{ext}"
                    if p.is_file():
                        hit = p
                        break
                if hit:
                    break
            found.append(hit)
        if all(found):
            return found[0], found[1]
        tried.append(str(d / f"{prefix}-{{images-idx3,labels-idx1}}-ubyte[.gz]"))
    hint = ("install them with `apt-get install dataset-fashion-mnist` (they go to "
            f"{DEFAULT_FASHION_MNIST_ROOT}) or pass the folder holding the idx files")
    raise DatasetNotFoundError(f"Fashion-MNIST '{split}' files not found; looked for "
                               f"{'; '.join(tried)}. {hint}")


def load_fashion_mnist(root: Optional[PathLike] = None, split: str = "train", *,
                       classes: Union[None, str, Sequence[Any]] = None, relabel: bool = True,
                       limit: Optional[int] = None, seed: int = 0) -> LabeledImages:
    """Fashion-MNIST as uint8 images ``[N, 28, 28]`` and int64 labels.

    Args:
        root: folder with the idx files (default ``$TREX_FASHION_MNIST`` or
            ``/usr/share/datasets/fashion-mnist``, where Debian's ``dataset-fashion-mnist``
            installs them). torchvision's ``FashionMNIST/raw`` layout is found too.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        classes: keep only these classes (``"0-4"``, ``[5, 6, 7, 8, 9]``, names...).
        relabel: map the kept classes to ``0..k-1`` in the order given (else keep original ids).
        limit: keep a seeded class-balanced subset of this many images (see
            :func:`balanced_subset`), taken after the class selection.
        seed: seed of that subset.
    """
    img_path, lab_path = fashion_mnist_files(root, split)
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetFormatError(f"{img_path}: expected uint8 images [N, H, W], got "
                                 f"{images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetFormatError(f"{lab_path}: {labels.shape} labels for {len(images)} images")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise DatasetFormatError(f"{lab_path}: labels outside 0..9")
    names = list(FASHION_MNIST_CLASSES)
    sel = parse_classes(classes, names)
    keep, new_labels = select_classes(labels, sel, relabel=relabel)
    if sel is not None and relabel:
        names = [FASHION_MNIST_CLASSES[c] for c in sel]
    images = images[keep]
    if limit is not None:
        sub = balanced_subset(new_labels, int(limit), seed)
        images, new_labels = images[sub], new_labels[sub]
    return LabeledImages(np.ascontiguousarray(images), new_labels, names,
                         name=f"fashion-mnist/{split}")


class FashionMNIST(ImageDataset):
    """Fashion-MNIST from local idx files as a torch ``Dataset`` of (RGB image, label).

    Arguments as in :func:`load_fashion_mnist`; ``.images`` / ``.targets`` hold the arrays.
    """

    def __init__(self, root: Optional[PathLike] = None, split: str = "train", *,
                 classes: Union[None, str, Sequence[Any]] = None, relabel: bool = True,
                 limit: Optional[int] = None, seed: int = 0,
                 transform: Optional[Callable[[Any], Any]] = None):
        super().__init__(load_fashion_mnist(root, split, classes=classes, relabel=relabel,
                                            limit=limit, seed=seed), transform)

    @property
    def images(self) -> np.ndarray:
        return self.data.items
