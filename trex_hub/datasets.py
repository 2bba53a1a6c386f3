"""Labelled image datasets read from local files: Fashion-MNIST idx files, ImageFolder trees and
the torchvision classes of the paper's small transfer sets.

Nothing here downloads anything. Every reader raises :class:`DatasetNotFoundError` (a
``FileNotFoundError``) naming the files it looked for when they are missing, and
:class:`DatasetFormatError` (a ``ValueError``) when a file is there but unreadable.

Fashion-MNIST::

    from trex_hub.datasets import load_fashion_mnist, FashionMNIST
    train = load_fashion_mnist("/usr/share/datasets/fashion-mnist", "train", classes="0-4")
    train.images        # uint8 [N, 28, 28]
    train.labels        # int64 [N], 0..4 (relabelled in the order of ``classes``)
    ds = FashionMNIST(split="test", classes=[5, 6, 7, 8, 9], transform=my_transform)

ImageFolder trees (``root/<class>/<image>``)::

    splits = load_image_folder("data/flowers")   # {"train": LabeledImages, "test": LabeledImages}
"""
from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .fileio import PathLike
from .imagefiles import IMAGE_EXTENSIONS, walk_images


DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "TREX_FASHION_MNIST"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


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


# ---------------------------------------------------------------------------------------------
# torch Dataset wrappers
# ---------------------------------------------------------------------------------------------
def _torch_dataset_base():
    from torch.utils.data import Dataset

    return Dataset


class ImageDataset(_torch_dataset_base()):  # type: ignore[misc]
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
        from .transforms import open_image

        img = open_image(self.data.items[index], f"{self.data.name or 'dataset'} item {index}")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.data.labels[index])


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


# ---------------------------------------------------------------------------------------------
# ImageFolder trees
# ---------------------------------------------------------------------------------------------
def _scan_tree(root: Path) -> Dict[str, List[Path]]:
    """class name -> image paths below its class folder, as :func:`walk_images` lists them
    (the files ``trex-extract`` reads from the same folder); classes in sorted order."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: no such folder")
    out: Dict[str, List[Path]] = {}
    for rel, full in walk_images(root):
        cls, below, _ = rel.partition("/")
        if below:  # a file directly in root belongs to no class
            out.setdefault(cls, []).append(Path(full))
    return dict(sorted(out.items()))


def _to_labeled(tree: Dict[str, List[Path]], classes: List[str], name: str) -> LabeledImages:
    index = {c: i for i, c in enumerate(classes)}
    paths: List[str] = []
    labels: List[int] = []
    for c, files in tree.items():
        for f in files:
            paths.append(str(f))
            labels.append(index[c])
    return LabeledImages(paths, np.asarray(labels, dtype=np.int64), list(classes), name,
                         paths=list(paths))


TRAIN_DIRS = ("train", "trainval")
TEST_DIRS = ("test", "val")


def load_image_folder(root: PathLike, *, test_fraction: float = 0.2, seed: int = 0,
                      classes: Union[None, str, Sequence[Any]] = None) -> Dict[str, LabeledImages]:
    """Read an ImageFolder-style dataset into ``{"train": ..., "test": ...}`` (paths + labels).

    Layouts:

    * ``root/train/<class>/*`` and ``root/test/<class>/*`` (``trainval`` for ``train``; ``val``
      for ``test`` when there is no ``test``; with ``train``, ``val`` and ``test`` all present,
      train and val are merged into the training side, as the paper's "trainval").
    * one tree ``root/<class>/*``: split per class with :func:`per_class_split`
      (``test_fraction`` of each class, at least one image, seeded by ``seed``).

    Class indices follow the sorted class-folder names of the training side; a test class unknown
    to training is an error. ``classes`` keeps a subset (indices into that sorted list or names).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(f"image folder {base} does not exist")
    train_dir = next((base / d for d in TRAIN_DIRS if (base / d).is_dir()), None)
    test_dir = next((base / d for d in ("test",) if (base / d).is_dir()), None)
    extra_train: Optional[Path] = None
    if test_dir is None and (base / "val").is_dir():
        test_dir = base / "val"
    elif test_dir is not None and (base / "val").is_dir() and train_dir is not None \
            and train_dir.name == "train":
        extra_train = base / "val"
    if train_dir is not None or test_dir is not None:
        if train_dir is None or test_dir is None:
            have = train_dir or test_dir
            raise DatasetNotFoundError(
                f"{base}: found {have.name}/ but not its partner; an ImageFolder dataset needs "
                f"train/ (or trainval/) and test/ (or val/), or one tree of class folders")
        train_tree = _scan_tree(train_dir)
        if extra_train is not None:
            for c, files in _scan_tree(extra_train).items():
                train_tree.setdefault(c, [])
                train_tree[c] = sorted(train_tree[c] + files, key=Path.as_posix)
            train_tree = dict(sorted(train_tree.items()))
        test_tree = _scan_tree(test_dir)
        if not train_tree:
            raise DatasetNotFoundError(f"{train_dir}: no class folder holds an image "
                                       f"({', '.join(IMAGE_EXTENSIONS)})")
        unknown = sorted(set(test_tree) - set(train_tree))
        if unknown:
            raise DatasetFormatError(f"{test_dir}: classes {unknown} have no training images "
                                     f"in {train_dir}")
        names = list(train_tree)
        train = _to_labeled(train_tree, names, f"{base.name}/train")
        test = _to_labeled(test_tree, names, f"{base.name}/test")
    else:
        tree = _scan_tree(base)
        if not tree:
            raise DatasetNotFoundError(f"{base}: no class folder holds an image "
                                       f"({', '.join(IMAGE_EXTENSIONS)}); expected "
                                       "root/<class>/<image> or root/train + root/test")
        names = list(tree)
        full = _to_labeled(tree, names, base.name)
        tr_idx, te_idx = per_class_split(full.labels, test_fraction, seed)
        train, test = full.subset(tr_idx), full.subset(te_idx)
        train.name, test.name = f"{base.name}/train", f"{base.name}/test"
    sel = parse_classes(classes, names)
    if sel is not None:
        out = {}
        for key, part in (("train", train), ("test", test)):
            keep, new = select_classes(part.labels, sel)
            sub = part.subset(keep)
            sub.labels = new
            sub.class_names = [names[c] for c in sel]
            out[key] = sub
        return out
    return {"train": train, "test": test}


class ImageFolderDataset(ImageDataset):
    """One side (``"train"`` or ``"test"``) of :func:`load_image_folder` as a torch Dataset."""

    def __init__(self, root: PathLike, split: str = "train", *,
                 transform: Optional[Callable[[Any], Any]] = None, test_fraction: float = 0.2,
                 seed: int = 0, classes: Union[None, str, Sequence[Any]] = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        parts = load_image_folder(root, test_fraction=test_fraction, seed=seed, classes=classes)
        super().__init__(parts[split], transform)


# ---------------------------------------------------------------------------------------------
# torchvision classes of the paper's small transfer sets (local files only, download=False)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchvisionSpec:
    cls: str
    train_splits: Optional[Tuple[str, ...]]  # None: one pool, split with per_class_split
    test_split: Optional[str]
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    note: str = ""


TORCHVISION_DATASETS: Dict[str, TorchvisionSpec] = {
    "aircraft": TorchvisionSpec("FGVCAircraft", ("trainval",), "test",
                                (("annotation_level", "variant"),), "FGVC-Aircraft variants"),
    "cars": TorchvisionSpec("StanfordCars", ("train",), "test", (), "needs scipy"),
    "dtd": TorchvisionSpec("DTD", ("train", "val"), "test", (("partition", 1),), "split 1"),
    "eurosat": TorchvisionSpec("EuroSAT", None, None, (), "no official split: seeded split"),
    "flowers102": TorchvisionSpec("Flowers102", ("train", "val"), "test", (), "needs scipy"),
    "pets": TorchvisionSpec("OxfordIIITPet", ("trainval",), "test",
                            (("target_types", "category"),)),
    "food101": TorchvisionSpec("Food101", ("train",), "test"),
    "sun397": TorchvisionSpec("SUN397", None, None, (), "no official split: seeded split"),
}
TORCHVISION_ALIASES = {
    "fgvc_aircraft": "aircraft", "fgvcaircraft": "aircraft", "stanford_cars": "cars",
    "stanfordcars": "cars", "cars196": "cars", "flowers": "flowers102",
    "oxford_iiit_pet": "pets", "oxfordiiitpet": "pets", "oxford_pets": "pets",
}


def torchvision_dataset_name(name: str) -> Optional[str]:
    """Canonical key of a torchvision transfer set (``None`` when ``name`` is not one)."""
    key = name.lower().replace("-", "_")
    key = TORCHVISION_ALIASES.get(key, key)
    return key if key in TORCHVISION_DATASETS else None


def _tv_paths_labels(ds: Any) -> Tuple[List[str], List[int]]:
    if hasattr(ds, "_image_files") and hasattr(ds, "_labels"):
        return [str(p) for p in ds._image_files], [int(t) for t in ds._labels]
    if hasattr(ds, "_samples"):  # StanfordCars
        return [str(p) for p, _ in ds._samples], [int(t) for _, t in ds._samples]
    if hasattr(ds, "samples"):  # ImageFolder subclasses (EuroSAT)
        return [str(p) for p, _ in ds.samples], [int(t) for _, t in ds.samples]
    raise DatasetFormatError(f"cannot list the images of {type(ds).__name__}")


def load_torchvision_dataset(name: str, root: PathLike, *, test_fraction: float = 0.2,
                             seed: int = 0) -> Dict[str, LabeledImages]:
    """One of the paper's small sets via its torchvision class, from local files only.

    Returns ``{"train": trainval, "test": test}`` as image paths + labels. The files must already
    be under ``root`` in torchvision's layout (``download=False``); otherwise
    :class:`DatasetNotFoundError` says where they were expected. Sets without an official split
    (EuroSAT, SUN397) are split per class with :func:`per_class_split` (``test_fraction``,
    ``seed``).
    """
    import torchvision.datasets as tvd

    key = torchvision_dataset_name(name)
    if key is None:
        raise ValueError(f"unknown torchvision dataset '{name}'; known: "
                         f"{', '.join(TORCHVISION_DATASETS)}")
    spec = TORCHVISION_DATASETS[key]
    cls = getattr(tvd, spec.cls)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(f"{spec.cls}: root folder {base} does not exist")

    def build(split: Optional[str]):
        kw = dict(spec.kwargs)
        if split is not None:
            kw["split"] = split
        try:
            return cls(str(base), download=False, **kw)
        except RuntimeError as exc:
            msg = str(exc)
            if "scipy" in msg.lower():
                raise DatasetError(f"{spec.cls}: {msg}") from None
            raise DatasetNotFoundError(
                f"{spec.cls} files not found under {base} (split {split or 'all'}): "
                f"{msg.split('.')[0]}. "
                f"Place the dataset there in torchvision's layout (see the torchvision.datasets."
                f"{spec.cls} documentation); trex-eval never downloads.") from None

    if spec.train_splits is None:
        ds = build(None)
        paths, labels = _tv_paths_labels(ds)
        full = LabeledImages(paths, np.asarray(labels), [str(c) for c in ds.classes], key,
                             paths=list(paths))
        tr, te = per_class_split(full.labels, test_fraction, seed)
        train, test = full.subset(tr), full.subset(te)
    else:
        paths: List[str] = []
        labels: List[int] = []
        classes: List[str] = []
        for split in spec.train_splits:
            ds = build(split)
            p, t = _tv_paths_labels(ds)
            paths += p
            labels += t
            classes = [str(c) for c in ds.classes]
        train = LabeledImages(paths, np.asarray(labels), classes, key, paths=list(paths))
        ds = build(spec.test_split)
        p, t = _tv_paths_labels(ds)
        test = LabeledImages(p, np.asarray(t), classes, key, paths=list(p))
    train.name, test.name = f"{key}/trainval", f"{key}/test"
    return {"train": train, "test": test}


__all__ = [
    "DatasetError", "DatasetNotFoundError", "DatasetFormatError", "LabeledImages",
    "parse_classes", "select_classes", "per_class_split", "balanced_subset", "read_idx",
    "write_idx", "fashion_mnist_files", "load_fashion_mnist", "ImageDataset", "FashionMNIST",
    "load_image_folder", "ImageFolderDataset", "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_ROOT", "TORCHVISION_DATASETS", "torchvision_dataset_name",
    "load_torchvision_dataset",
]
