"""The cache's inter-process lock: one download of a file at a time, the others wait for it.

``<cache>/.locks/<file>.lock`` (a ``filelock`` lock). A process that finds the lock taken says
once that it waits, for which file and on which lock, then waits up to ``$TREX_HUB_LOCK_TIMEOUT``
(default an hour); past that, or where locks are not supported, the caller downloads without
it, into a private partial (``hub/partials.py``).
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator, Optional

from ..fileio import PathLike
from .http import env_float

LOCK_DIR = ".locks"
DEFAULT_LOCK_TIMEOUT = 3600.0  # how long to wait for another process's download of the same file

log = logging.getLogger("trex_hub.hub.cache")


def lock_path(path: PathLike) -> Path:
    p = Path(path)
    return p.parent / LOCK_DIR / (re.sub(r"[^A-Za-z0-9_-]", "_", p.name) + ".lock")


@contextlib.contextmanager
def file_lock(path: PathLike, timeout: Optional[float] = None) -> Iterator[bool]:
    """Hold the inter-process lock for cached file ``path``; yields whether it is held.

    Where locks are not supported (some network file systems) or another process holds the lock
    past ``timeout``, this yields ``False`` and the caller falls back to a private temp file: each
    process then downloads on its own and the atomic rename keeps the result correct.
    """
    import filelock  # a dependency; imported on use so that `import trex_hub` stays light

    if timeout is None:  # inf: wait as long as the other download takes
        timeout = env_float("TREX_HUB_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT, finite=False)
    lp = lock_path(path)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lp), timeout=timeout)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            if timeout <= 0:
                raise
            log.warning("trex_hub: waiting for another process downloading %s (lock %s; %s, "
                        "TREX_HUB_LOCK_TIMEOUT)", Path(path).name, lp,
                        f"up to {timeout:g} s" if timeout != float("inf") else "no time limit")
            lock.acquire()
    except filelock.Timeout:
        log.warning("waited %.0fs for the lock %s; downloading without it", timeout, lp)
        yield False
        return
    except OSError as exc:
        log.warning("file locks unavailable (%s); downloading without a lock", exc)
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


__all__ = ["DEFAULT_LOCK_TIMEOUT", "LOCK_DIR", "file_lock", "lock_path"]
