"""Which files are images, and how a folder of them is listed.

One home for the rules that ``trex-extract`` (:func:`collect_inputs`) and ``trex-eval --format
imagefolder`` (:func:`trex_hub.datasets.load_image_folder`) share, so both see the same files of
the same folder:

* an image is a file whose extension (any case) is in :data:`IMAGE_EXTENSIONS`;
* a folder is walked recursively, following links; every folder is entered once (by device and
  inode), so a link cycle (``ln -s . loop``, a link to an ancestor) ends the walk instead of
  looping, and a folder reached twice is listed once, under the first path in sorted order;
* hidden files and folders (names starting with ``.``: ``.git``, ``.ipynb_checkpoints``, macOS
  ``._photo.jpg`` resource forks) are skipped;
* a folder that cannot be read is not skipped silently: :func:`walk_images` reports it through
  ``errors`` and ``trex-extract`` lists it as a failed entry of the manifest;
* files are listed in the order of their relative POSIX paths.

A file named explicitly (an INPUT of ``trex-extract``, a line of a list) is taken as it is, hidden
or not.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

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


def walk_images(root: PathLike, extensions: Optional[Iterable[str]] = None,
                errors: Optional[List[Tuple[str, str]]] = None) -> List[Tuple[str, str]]:
    """``(relative POSIX path, full path)`` of every image below ``root``, sorted by the
    relative path. Hidden files and folders are skipped; links are followed, each folder is
    entered once (link cycles end). A folder that cannot be listed is appended to ``errors`` as
    ``(relative POSIX path, reason)`` (raised as ``OSError`` when ``errors`` is ``None``)."""
    exts = extension_set(extensions)
    root = os.fspath(root)
    found: List[Tuple[str, str]] = []
    seen: Set[Tuple[int, int]] = set()
    pending = [(root, "")]  # depth first, in sorted order
    while pending:
        folder, rel = pending.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                items = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            if errors is None:
                raise
            errors.append((rel or ".", f"folder not readable ({exc.strerror or exc})"))
            continue
        subdirs = []
        for d in items:
            if is_hidden(d.name):
                continue
            sub_rel = f"{rel}/{d.name}" if rel else d.name
            try:
                is_dir = d.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((os.path.join(folder, d.name), sub_rel))
            elif is_image(d.name, exts):
                found.append((sub_rel, os.path.join(folder, d.name)))
        pending.extend(reversed(subdirs))
    found.sort(key=lambda x: x[0])
    return found


# --------------------------------------------------------------------------------------------
# Inputs of trex-extract
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One input file: where to read it, how the manifest names it, and its label; ``error``
    is set for an input known to be unusable before decoding (a folder that cannot be read),
    which a run records as failed. ``list_file`` is the text list that named it, whose folder
    its relative path was resolved against (a run says so when the file is missing)."""

    path: str
    rel: str
    label: Optional[str] = None
    error: Optional[str] = None
    list_file: Optional[str] = None


def _read_list(path: Path, folder_label) -> List[Entry]:
    """A text list: ``path`` or ``path<TAB>label`` per line, relative to the list's folder.
    UTF-8, with or without the byte order mark that Windows editors write first."""
    entries = []
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1,
                                     "NUL byte")
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"input '{path}' is neither an image (by its extension) nor a text list "
                         f"of images: not UTF-8 text (byte {exc.start}); pass --extensions if it "
                         "is an image, or give a list with one path per line") from None
    except OSError as exc:
        raise ValueError(f"input '{path}' cannot be read ({exc.strerror or exc})") from None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, lab = line.partition("\t")
        full = Path(name).expanduser()
        full = full if full.is_absolute() else path.parent / full
        entries.append(Entry(str(full), name, lab if lab else folder_label(str(full)),
                             list_file=str(path)))
    return entries


def collect_inputs(inputs: Sequence[PathLike], *, extensions: Optional[Iterable[str]] = None,
                   labels: str = "none") -> List[Entry]:
    """Expand INPUTs (image files, folders searched recursively, text file lists) into entries
    in a deterministic order.

    * folder: its images as listed by :func:`walk_images` (``rel`` is relative to the folder;
      with several folder INPUTs, relative to their common parent folder, so ``a/0.jpg`` and
      ``b/0.jpg`` stay apart); a sub-folder that cannot be read becomes a failed entry;
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

    folders = [os.path.abspath(Path(raw).expanduser()) for raw in inputs
               if Path(raw).expanduser().is_dir()]
    base = os.path.commonpath(folders) if len(folders) > 1 else None
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            prefix = "" if base is None else Path(os.path.relpath(os.path.abspath(p), base))
            prefix = "" if prefix in ("", Path(".")) else prefix.as_posix() + "/"
            errors: List[Tuple[str, str]] = []
            found = walk_images(p, exts, errors)
            entries += [Entry(full, prefix + rel, folder_label(full)) for rel, full in found]
            entries += [Entry(os.path.join(p, rel), (prefix + rel).rstrip("/") or str(raw), None,
                              why) for rel, why in errors]
        elif p.is_file() and is_image(p, exts):
            entries.append(Entry(str(p), Path(raw).as_posix(), folder_label(str(p))))
        elif p.is_file():
            entries += _read_list(p, folder_label)
        else:
            raise FileNotFoundError(f"input '{raw}' is neither a file nor a folder")
    return entries


def failure_reason(e: Entry, why: str) -> str:
    """The manifest's error for ``e``: the decoder's message less the entry's own name, which
    the row holds already. A missing file keeps the path that was tried where it is not the
    one listed: a list's relative paths are resolved against the list's folder, and a path
    written relative to the working folder otherwise reads "no such file" for a file that
    exists."""
    prefix = f"{e.rel} ({e.path}): "
    why = why[len(prefix):] if why.startswith(prefix) else why
    if why != "no such file" or e.path == e.rel:
        return why
    if e.list_file is not None and not Path(e.rel).expanduser().is_absolute():
        return (f"{why}: {e.path} (relative paths in a list file are resolved against the list "
                "file's folder)")
    return f"{why}: {e.path}"


__all__ = ["IMAGE_EXTENSIONS", "extension_set", "is_image", "walk_images", "Entry",
           "collect_inputs", "failure_reason"]
