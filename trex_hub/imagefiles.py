"""Which files are images, and how a folder of them is listed.

One home for the rules that ``trex-extract`` (:func:`collect_inputs`) and ``trex-eval --format
imagefolder`` (:func:`trex_hub.datasets.load_image_folder`) share, so both see the same files of
the same folder:

* an image is a file whose extension (any case) is in :data:`IMAGE_EXTENSIONS`;
* a folder is walked recursively, following links (a link back to a folder above is not
  followed twice), skipping hidden files and folders (names starting with ``.``: ``.git``,
  ``.ipynb_checkpoints``, macOS ``._photo.jpg`` resource forks);
* files are listed in the order of their relative POSIX paths.

A file named explicitly (an INPUT of ``trex-extract``, a line of a list) is taken as it is, hidden
or not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Iterable, List, Optional, Sequence, Tuple

from .fileio import PathLike

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm",
                    "pbm", "pnm", "jfif", "jpe", "tga", "ico")


def extension_set(extensions: Optional[Iterable[str]] = None) -> FrozenSet[str]:
    """Lower-case extensions without the dot (default :data:`IMAGE_EXTENSIONS`)."""
    exts = IMAGE_EXTENSIONS if extensions is None else extensions
    return frozenset(e.strip().lower().lstrip(".") for e in exts if e.strip())


def is_image(path: PathLike, extensions: Optional[Iterable[str]] = None) -> bool:
    """Whether the file name of ``path`` has an image extension (any case)."""
    name = os.path.basename(os.fspath(path))
    exts = extensions if isinstance(extensions, frozenset) else extension_set(extensions)
    return "." in name and name.rsplit(".", 1)[-1].lower() in exts


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_images(root: PathLike, extensions: Optional[Iterable[str]] = None
                ) -> List[Tuple[str, str]]:
    """``(relative POSIX path, full path)`` of every image below ``root``, sorted by the
    relative path. Hidden files and folders are skipped; links are followed."""
    exts = extension_set(extensions)
    root = os.fspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = os.path.realpath(dirpath)
        keep = []
        for d in sorted(dirnames):
            if is_hidden(d):
                continue
            target = os.path.realpath(os.path.join(dirpath, d))
            if os.path.commonpath([target, here]) == target:  # a link to a folder above
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if not is_hidden(name) and is_image(name, exts):
                full = os.path.join(dirpath, name)
                found.append((Path(os.path.relpath(full, root)).as_posix(), full))
    found.sort(key=lambda x: x[0])
    return found


# --------------------------------------------------------------------------------------------
# Inputs of trex-extract
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One input file: where to read it, how the manifest names it, and its label."""

    path: str
    rel: str
    label: Optional[str] = None


def _read_list(path: Path, folder_label) -> List[Entry]:
    """A text list: ``path`` or ``path<TAB>label`` per line, relative to the list's folder."""
    entries = []
    with open(path, "r", encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, lab = line.partition("\t")
            full = Path(name).expanduser()
            full = full if full.is_absolute() else path.parent / full
            entries.append(Entry(str(full), name, lab if lab else folder_label(str(full))))
    return entries


def collect_inputs(inputs: Sequence[PathLike], *, extensions: Optional[Iterable[str]] = None,
                   labels: str = "none") -> List[Entry]:
    """Expand INPUTs (image files, folders searched recursively, text file lists) into entries
    in a deterministic order.

    * folder: its images as listed by :func:`walk_images` (``rel`` is relative to the folder);
    * image file: itself (``rel`` as given);
    * any other file: a list, one ``path`` or ``path<TAB>label`` per line (blank lines and
      ``#`` comments skipped), relative paths resolved against the list's folder, order kept
      (``rel`` as written).

    ``labels="folder"`` labels each file by its parent folder's name (list labels win).
    """
    if labels not in ("none", "folder"):
        raise ValueError(f"labels must be 'none' or 'folder', not {labels!r}")
    exts = extension_set(extensions)
    entries: List[Entry] = []

    def folder_label(full: str) -> Optional[str]:
        return Path(os.path.abspath(full)).parent.name if labels == "folder" else None

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            entries += [Entry(full, rel, folder_label(full)) for rel, full in walk_images(p, exts)]
        elif p.is_file() and is_image(p, exts):
            entries.append(Entry(str(p), Path(raw).as_posix(), folder_label(str(p))))
        elif p.is_file():
            entries += _read_list(p, folder_label)
        else:
            raise FileNotFoundError(f"input '{raw}' is neither a file nor a folder")
    return entries


__all__ = ["IMAGE_EXTENSIONS", "extension_set", "is_image", "walk_images", "Entry",
           "collect_inputs"]
