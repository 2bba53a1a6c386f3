"""Crash-safe file writing (shared by the cache, the checkpoint writer, extraction and training),
writes behind the caller's back (``WriteBehind``), a write that ran out of room told in words
(``no_room``, ``room_words``), the `PathLike` alias and the file names of the zoo's folder format.

``atomic_write`` writes to a unique temporary file in the destination's folder, flushes it to
disk, renames it over the destination and syncs the folder: a reader sees the old file or the new
one, never a half-written one, whatever kills the process.
"""
from __future__ import annotations

import errno
import os
import queue
import random
import re
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


class WriteBehind:
    """Runs write jobs in order in a thread of its own, so that the caller does not wait for
    them. One job may wait while another runs; a third waits in :meth:`submit`. The first error
    is raised in the caller, at the next :meth:`submit` or at :meth:`close`, which waits for
    every job; the jobs after a failed one are dropped."""

    def __init__(self, name: str = "write-behind") -> None:
        self._jobs: "queue.Queue[Optional[Callable[[], None]]]" = queue.Queue(maxsize=1)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def close(self, raise_error: bool = True) -> None:
        """Wait for every job submitted; then raise the first error, if ``raise_error``."""
        self._jobs.put(None)
        self._thread.join()
        if raise_error:
            self._raise()


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
    atomic_write_many([(path, write, mode)])


def atomic_write_many(files: Sequence[Tuple[PathLike, Callable[[Any], Any], str]]) -> None:
    """:func:`atomic_write` for files that belong together (features, their manifest, their
    meta): every ``(path, write, mode)`` is written to its temporary file first, and only when
    all are written (and synced) are they renamed, in the order given. A failure while writing
    (a full disk, a name that cannot be encoded) leaves every old file as it was, never a new
    file beside an old companion."""
    for path, _, _ in files:  # a rename onto a folder fails only after the others were made
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", os.fspath(path))
    tmps: List[Path] = []
    try:
        for path, write, mode in files:
            tmps.append(temp_path(path))
            with open(tmps[-1], mode) as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        for (path, _, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()
    for folder in dict.fromkeys(Path(path).parent for path, _, _ in files):
        fsync_dir(folder)


#: write errors that mean "no room" (disk, quota, file size limit): the one list, downloads included
NO_ROOM_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def short_write(exc: BaseException) -> Optional[Tuple[int, int]]:
    """``(requested, written)`` of numpy's short write (``ndarray.tofile`` / ``np.save`` into a
    real file raise ``OSError("N requested and M written")`` without an errno when the disk
    fills up), else ``None``."""
    match = _SHORT_WRITE.search(str(exc)) if isinstance(exc, OSError) and not exc.errno \
        else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def no_room(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of room: ENOSPC, EDQUOT or EFBIG (a file
    size limit), numpy's short write, or torch's zip writer failing under ``torch.save``
    (``[enforce fail at inline_container.cc...] unexpected pos ...``)."""
    if isinstance(exc, OSError):
        return exc.errno in NO_ROOM_ERRNOS or short_write(exc) is not None
    return isinstance(exc, RuntimeError) and "inline_container" in str(exc)


def size_words(n: float) -> str:
    """``n`` bytes in words: "512 B", "1.5 MiB", "2.0 TiB" (the one byte formatter of messages)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_problem(folder: PathLike) -> Optional[str]:
    """Why files cannot be written in ``folder`` (made when missing), in words, or ``None``:
    the one check of an output folder before long work (the cache, trex-train's output)."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{blocker} is a file, not a folder"
    probe = folder / f".trex-hub-probe-{os.getpid()}-{random.getrandbits(32):08x}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def free_bytes(path: PathLike) -> Optional[int]:
    """The bytes free for this user on the disk holding ``path`` (its nearest existing
    folder), or ``None`` where that cannot be read."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def room_words(path: PathLike, needed: Optional[int] = None) -> str:
    """Why a write at ``path`` ran out of room, in words: "no space left on the device (45.0 MiB
    needed, 1.2 MiB free)", or, where the disk has room, the quota or file size limit
    (``ulimit -f``) that must have stopped it."""
    free = free_bytes(path)
    need = f"about {size_words(needed)} needed, " if needed else ""
    if free is None:
        return f"no space left on the device{f' ({need[:-2]})' if need else ''}"
    if free < max(needed or 0, 1 << 24):  # less than what it needs, or next to nothing
        return f"no space left on the device ({need}{size_words(free)} free)"
    return (f"no room for it ({need}{size_words(free)} free on the disk: a disk quota or a file "
            "size limit, ulimit -f, stopped the write)")


# The zoo's folder format (``save_pretrained``, ``trex-train export``, Hugging Face Hub repos).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
