"""ImageFolder trees (``root/<class>/<image>``) and the torchvision classes of the paper's small
transfer sets, from local files only."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..fileio import PathLike
from ..imagefiles import IMAGE_EXTENSIONS, walk_images
from .core import (DatasetError, DatasetFormatError, DatasetNotFoundError, ImageDataset,
                   LabeledImages, parse_classes, per_class_split, select_classes)


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
    for files in ("_image_files", "_images"):  # _images: OxfordIIITPet
        if hasattr(ds, files) and hasattr(ds, "_labels"):
            return [str(p) for p in getattr(ds, files)], [int(t) for t in ds._labels]
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
