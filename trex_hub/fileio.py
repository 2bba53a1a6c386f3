"""Crash-safe file writing (shared by the cache, the checkpoint writer, extraction and training),
the `PathLike` alias and the file names of the zoo's folder format.

``atomic_write`` writes to a unique temporary file in the destination's folder, flushes it to
disk, renames it over the destination and syncs the folder: a reader sees the old file or the new
one, never a half-written one, whatever kills the process.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(folder: PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - not supported everywhere
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_path(path: PathLike) -> Path:
    """A hidden, per-process temporary name next to ``path`` (ends with ``.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")


def atomic_write(path: PathLike, write: Callable[[Any], Any], mode: str = "wb") -> None:
    """Call ``write(fh)`` on a temporary file, then atomically replace ``path`` with it."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


# The zoo's folder format (``save_pretrained``, ``trex-train export``, Hugging Face Hub repos).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
