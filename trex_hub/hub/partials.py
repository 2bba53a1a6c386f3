"""Partial downloads in the cache: the shared ``<file>.incomplete`` that the next attempt
resumes (under the file's lock), and the private ones of a process that could not take the lock
(``.<file>.<host>.<pid>.<random>.incomplete``), which nothing resumes: a later download deletes
those whose process is gone (:func:`sweep_private_partials`).
"""
from __future__ import annotations

import logging
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import List

from ..fileio import PathLike

log = logging.getLogger("trex_hub.hub.cache")

PARTIAL_SUFFIX = ".incomplete"


def partial_path(path: PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


#: how long a private partial of a process that may still run elsewhere is kept
PRIVATE_PARTIAL_MAX_AGE = 86400.0
#: how long the partial of a process that seems gone must have been untouched: a live download
#: writes every chunk, and a process in another PID namespace (a container sharing the host
#: name) looks gone from here
PRIVATE_PARTIAL_IDLE = 600.0


def _host() -> str:
    """This machine's name as it goes into a private partial's name (no dots: they separate)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def private_partial_path(path: Path) -> Path:
    """A partial of this process alone (no lock: another process may download the same file at
    the same time); its name says which host and process own it, so a later download can tell
    that the owner is gone (:func:`sweep_private_partials`)."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{random.getrandbits(32):08x}"
                          f"{PARTIAL_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's, or not a pid here
        return True
    return True


def sweep_private_partials(path: Path) -> List[Path]:
    """Delete the private partials of ``path`` whose process is gone (killed mid-download:
    nothing else would ever remove them): on this host, a process that no longer runs and a
    partial untouched for :data:`PRIVATE_PARTIAL_IDLE`; anywhere (a shared folder), one
    untouched for :data:`PRIVATE_PARTIAL_MAX_AGE`. Returns what was deleted; never raises."""
    host = _host()
    own = re.compile(rf"\.{re.escape(path.name)}\.(?:(?P<host>[A-Za-z0-9-]+)\.)?(?P<pid>\d+)"
                     rf"\.[0-9a-f]{{8}}{re.escape(PARTIAL_SUFFIX)}")
    removed = []
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.")]
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = own.fullmatch(name)
        if m is None:
            continue
        p = path.parent / name
        try:
            idle = now - p.stat().st_mtime
            gone = (m.group("host") == host and idle > PRIVATE_PARTIAL_IDLE
                    and not _pid_alive(int(m.group("pid"))))
            if gone or idle > PRIVATE_PARTIAL_MAX_AGE:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    if removed:
        log.info("trex_hub: removed %d partial download(s) of %s left by processes that are "
                 "gone", len(removed), path.name)
    return removed


__all__ = ["PARTIAL_SUFFIX", "PRIVATE_PARTIAL_MAX_AGE", "PRIVATE_PARTIAL_IDLE", "partial_path",
           "private_partial_path", "sweep_private_partials"]
