"""The one safe ``torch.load`` of the package, and the errors of reading a checkpoint.

``torch_load`` runs ``torch.load(weights_only=True)`` with the allow-list of
:mod:`trex_hub.pickles` and never falls back to an unsafe load. Its errors say what the file
is: :class:`CheckpointError` for bytes that are not a usable checkpoint (a cache deletes such a
file), :class:`CheckpointReadError` for a file that could not be read at all (memory,
permissions, I/O: nothing is said of its bytes, so nothing deletes it).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import struct
import warnings
import zipfile
from typing import Any, List

import torch

from .fileio import PathLike
from .pickles import pickle_globals, refused_globals, safe_globals


class CheckpointError(ValueError):
    """A file that is not a usable t-ReX checkpoint; the message names the file and the fix.

    ``problem`` is what is wrong, ``hint`` the generic advice (``str()`` joins them); callers
    that know better what happens to the file (the download cache) use ``problem`` alone.
    """

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(f"{problem} {hint}" if hint else problem)
        self.problem, self.hint = problem, hint


class CheckpointReadError(OSError):
    """A checkpoint that could not be read for a reason outside the file (memory, permissions,
    an I/O error): the bytes were not judged, so no cache deletes the file for it."""


#: the hint of a file whose bytes are bad: right for the download cache's files only
REDOWNLOAD_HINT = "Delete it and download it again (`trex-download --verify` checks the cache)."


def _refused(path: str, names: List[str]) -> CheckpointError:
    what = f" (it asks for {', '.join(sorted(set(names)))})" if names else ""
    return CheckpointError(
        f"{path}: refused to load: the file needs Python objects that are not plain tensors"
        f"{what}. trex_hub only loads checkpoints with torch.load(weights_only=True) and never "
        "falls back to an unsafe load. If the file is yours, re-save its state dict with "
        "torch.save(model.state_dict(), ...) or convert it to safetensors.")


#: the errors of reading a file that say nothing of its bytes
_ENVIRONMENT = {errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                errno.EISDIR, errno.ETIMEDOUT, errno.ESTALE}

# what torch's allocators say when they run out (a RuntimeError, not a MemoryError)
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|out of memory|std::bad_alloc", re.I)


def _no_memory(path: str, exc: BaseException) -> CheckpointReadError:
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return CheckpointReadError(
        f"{path}: not enough memory to read this checkpoint ({first}); free some memory or "
        f"raise the process's limit (ulimit -v), then run again. The file was left as it is.")


def torch_load(path: PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` and our allow-list; clear errors for bad files."""
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4" etc.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        bad = refused_globals(str(exc)) or pickle_globals(path)
        if not bad:  # not a refused object: the bytes are simply not a pickle we can read
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({os.path.getsize(path)} bytes; it "
                "may be truncated, corrupted, or an error page saved in its place).",
                REDOWNLOAD_HINT) from None
        raise _refused(path, bad) from None
    except MemoryError as exc:
        raise _no_memory(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, IndexError, struct.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise CheckpointError(f"{path}: no such file") from None
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT:
            # the file could not be read: nothing said of its bytes (torch's zip reader raises
            # EINVAL for an archive cut short, which is the bytes' fault: judged below)
            raise CheckpointReadError(f"{path}: cannot be read ({exc.strerror or exc}); the file "
                                      "was left as it is") from None
        if isinstance(exc, RuntimeError) and _ALLOCATION_FAILED.search(str(exc)):
            raise _no_memory(path, exc) from None
        size = os.path.getsize(path) if os.path.exists(path) else 0
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({size} bytes; it may be truncated or "
            f"corrupted: {type(exc).__name__}: {first}).", REDOWNLOAD_HINT) from None


__all__ = ["CheckpointError", "CheckpointReadError", "REDOWNLOAD_HINT", "torch_load"]
