"""The trex_hub download cache: where files live, how they are trusted, shared and checked.

Cache location: ``cache_dir=`` argument, else ``$TREX_HUB_CACHE``, else
``$XDG_CACHE_HOME/trex_hub``, else ``~/.cache/trex_hub``. ``$TREX_HUB_OFFLINE=1`` (or
``$HF_HUB_OFFLINE=1``) never touches the network.

Cache layout (flat, one folder)::

    <cache>/trexstar.pth                    the verified file, under its released name
    <cache>/trexstar.pth.manifest.json      {"sha256", "size", "url", ...}: trust on first use
    <cache>/trexstar.pth.incomplete         a partial download, resumed by the next attempt
    <cache>/.trexstar.pth.HOST.PID.R.incomplete  one process's own partial, where the lock could
                                            not be taken (removed by the next download once
                                            that process is gone, or after a day)
    <cache>/.locks/trexstar_pth.lock        inter-process lock (one download at a time)

The cache owns its policy: the cheap check of a cached file, the manifest, the lock, the atomic
rename, and what happens when a caller's ``check`` rejects a file (a fresh one is not kept; a
cached one is deleted). Bytes come from :mod:`trex_hub.hub.http`; which URL serves a file is the
caller's business. What is verified, when, and against what: ``docs/integrity.md``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from ..fileio import PathLike, atomic_write, fsync_dir, write_problem
from .http import DownloadError, IntegrityError, download, mirror_hint, sha256_of
from .locks import DEFAULT_LOCK_TIMEOUT, LOCK_DIR, file_lock, lock_path
from .partials import partial_path, private_partial_path, sweep_private_partials

MANIFEST_SUFFIX = ".manifest.json"
__all__ = ["CacheLocationError", "CacheReadError", "CheckResult", "DEFAULT_LOCK_TIMEOUT",
           "LOCK_DIR", "MANIFEST_SUFFIX", "OfflineError", "ReadOnlyCacheError", "cached_path",
           "check_cached", "fetch", "fetch_checked", "fetch_distributed", "file_lock",
           "get_cache_dir", "is_offline", "local_rank_zero_first", "lock_path", "manifest_path",
           "partial_path", "read_manifest", "remove_cached", "way_online", "write_manifest"]

#: ``check(path)`` reads a complete file and returns what it read, or raises ``ValueError`` (or a
#: subclass) to reject it. Other exceptions pass through and leave the cache untouched.
Check = Callable[[Path], Any]

log = logging.getLogger(__name__)


class OfflineError(DownloadError):
    """Offline mode is on and the file is not in the cache."""


class ReadOnlyCacheError(DownloadError):
    """The cache cannot be written and does not hold the file asked for."""


class CacheLocationError(DownloadError):
    """No cache folder can be chosen (no home directory, and no ``TREX_HUB_CACHE``)."""


class CacheReadError(DownloadError):
    """A cached file exists but cannot be read (another user's file, without read access)."""


_READ_ONLY_NOTED: set = set()


def _note_read_only(folder: Path, exc: OSError) -> None:
    """Say once per folder that manifests cannot be recorded there (the files still load)."""
    key = str(folder)
    if key not in _READ_ONLY_NOTED:
        _READ_ONLY_NOTED.add(key)
        log.warning("trex_hub: the cache %s is not writable (%s); using its files without "
                    "recording manifests (checked against the registry only)",
                    folder, exc.strerror or exc)


def _require_writable(folder: Path, filename: str) -> None:
    """Raise :class:`ReadOnlyCacheError` unless a file can be created in ``folder``."""
    why = write_problem(folder)
    if why is not None:
        raise ReadOnlyCacheError(
            f"the cache {folder} cannot be written ({why}) and does not hold "
            f"'{filename}'; set TREX_HUB_CACHE (or --cache-dir / cache_dir=) to a writable "
            "folder, or copy the file into that cache.") from None


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    return _truthy(os.environ.get("TREX_HUB_OFFLINE")) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def get_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """``cache_dir``, else ``$TREX_HUB_CACHE``, else ``$XDG_CACHE_HOME/trex_hub`` or
    ``~/.cache/trex_hub``. An empty ``cache_dir`` (a script's unset variable) is refused: it
    would make the working directory the cache."""
    if cache_dir is not None:
        if not os.fspath(cache_dir):
            raise ValueError("the cache folder given is empty (''); name a folder, or leave it "
                             "out for the default (TREX_HUB_CACHE or ~/.cache/trex_hub)")
        return _home_based(cache_dir, "the cache folder (--cache-dir / cache_dir=)")
    if os.environ.get("TREX_HUB_CACHE"):
        return _home_based(os.environ["TREX_HUB_CACHE"], "TREX_HUB_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = _home_based(xdg, "XDG_CACHE_HOME") if xdg else _home_based("~/.cache", "")
    return root / "trex_hub"


def _home_based(folder: PathLike, setting: str) -> Path:
    """``folder`` with ``~`` expanded; without a home directory (HOME unset and a UID with no
    passwd entry: a container run under an arbitrary UID) a :class:`CacheLocationError`."""
    try:
        return Path(folder).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        why = (f"HOME is unset and UID {os.getuid()} has no passwd entry"
               if hasattr(os, "getuid") else "no HOME / USERPROFILE")
        fix = (f"{setting}={os.fspath(folder)!r} starts with ~: give an absolute path" if setting
               else "set TREX_HUB_CACHE (or --cache-dir / cache_dir=) to a folder you can write to")
        raise CacheLocationError(f"no home directory to put the cache in ({why}): {fix}") \
            from None


def cached_path(filename: str, cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Where ``filename`` is cached, or ``None`` when it is not (no network, no hashing)."""
    p = get_cache_dir(cache_dir) / filename
    return p if p.is_file() else None


# --------------------------------------------------------------------------------------------
# Manifest (trust on first use)
# --------------------------------------------------------------------------------------------
def manifest_path(path: PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def read_manifest(path: PathLike) -> Optional[Dict[str, Any]]:
    """The manifest of cached file ``path``, or ``None`` (missing or unreadable)."""
    try:
        data = json.loads(manifest_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str) \
            or not isinstance(data.get("size"), int):
        return None
    return data


def write_manifest(path: PathLike, *, sha256: str, size: int, url: Optional[str],
                   source: str = "download") -> Dict[str, Any]:
    data = {"filename": Path(path).name, "sha256": sha256, "size": size, "url": url,
            "source": source, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(manifest_path(path), lambda fh: fh.write(text), "w")
    return data


def remove_cached(path: PathLike, *, manifest: bool = False) -> None:
    """Delete a cached file (and its manifest when ``manifest=True``), ignoring missing ones."""
    targets = [Path(path)] + ([manifest_path(path)] if manifest else [])
    for p in targets:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@dataclass
class CheckResult:
    """The outcome of checking one cached file."""

    path: Path
    ok: bool
    reason: str = ""
    sha256: Optional[str] = None
    size: Optional[int] = None


def check_cached(path: PathLike, *, sha256: Optional[str] = None, size: Optional[int] = None,
                 full: bool = False) -> CheckResult:
    """Check a cached file against its manifest and the expected ``sha256``/``size``.

    ``full=False`` is the cheap check run on every use (sizes only; a file without a manifest is
    hashed once and its manifest recorded). ``full=True`` re-hashes the file (``--verify``).
    """
    p = Path(path)
    try:
        actual = p.stat().st_size
    except FileNotFoundError:
        return CheckResult(p, False, "missing")
    _require_readable(p)
    man = read_manifest(p)
    if size is not None and actual != size:
        return CheckResult(p, False, f"size {actual} bytes, the registry says {size}", size=actual)
    if man is not None and actual != man["size"]:
        return CheckResult(p, False, f"size {actual} bytes, the manifest recorded {man['size']}",
                           size=actual)
    if man is not None and sha256 and man["sha256"] != sha256:
        return CheckResult(p, False, f"manifest SHA-256 {man['sha256']} differs from the "
                           f"registry's {sha256}", size=actual)
    if man is None or full:
        digest = sha256_of(p)
        if sha256 and digest != sha256:
            return CheckResult(p, False, f"SHA-256 {digest}, the registry says {sha256}",
                               digest, actual)
        if man is not None and digest != man["sha256"]:
            return CheckResult(p, False, f"SHA-256 {digest}, the manifest recorded "
                               f"{man['sha256']} on first download", digest, actual)
        if man is None:  # a file put there by hand or by an older version: record it now
            try:
                write_manifest(p, sha256=digest, size=actual, url=None, source="adopted")
            except OSError as exc:  # a read-only cache: the file is still usable
                _note_read_only(p.parent, exc)
        return CheckResult(p, True, "", digest, actual)
    return CheckResult(p, True, "", man["sha256"], actual)


def _require_readable(path: Path) -> None:
    """Raise :class:`CacheReadError` when the cached ``path`` cannot be opened for reading
    (written under umask 077 by another user of a shared cache), naming its owner and mode."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError as exc:
        try:
            st = path.stat()
            import pwd  # POSIX only, as is the problem

            try:
                owner = f"owner {pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid})"
            except KeyError:
                owner = f"owner uid {st.st_uid}"
            facts = f"; {owner}, mode {stat.S_IMODE(st.st_mode):04o}"
        except (OSError, ImportError):
            facts = ""
        raise CacheReadError(f"the cached {path} cannot be read ({exc.strerror or exc}{facts}): "
                             "ask its owner to `chmod g+r` it (a+r for everyone), or set "
                             "TREX_HUB_CACHE to a folder of your own") from None


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------
def _reject(exc: ValueError, message: str) -> ValueError:
    """``exc`` (same type, same traceback) with ``message`` as its text."""
    exc.args = (message,)
    return exc


def _check_cached_file(path: Path, check: Optional[Check]) -> Any:
    """Run ``check`` on a cached file; a rejected file is deleted, with its manifest when the
    manifest vouches for those very bytes (then the first download itself was bad)."""
    if check is None:
        return None
    try:
        return check(path)
    except ValueError as exc:
        man = read_manifest(path)
        vouched = man is not None and sha256_of(path) == man["sha256"]
        try:
            remove_cached(path, manifest=vouched)
        except OSError as err:  # a read-only cache
            raise _reject(exc, f"{exc} [the cached file {path} cannot be deleted "
                               f"({err.strerror or err}); replace it by hand or set "
                               "TREX_HUB_CACHE to a writable folder]") from None
        raise _reject(exc, f"{exc} [the cached file {path} has been deleted; run again to "
                           "download it]")


def _check_fresh_file(tmp: Path, url: str, check: Optional[Check]) -> Any:
    """Run ``check`` on a complete download before it gets its final name; a rejected file is
    deleted and never reaches the cache."""
    if check is None:
        return None
    try:
        return check(tmp)
    except ValueError as exc:
        tmp.unlink()
        reason = str(exc).replace(f"{tmp}: ", "").replace(str(tmp), "the file")
        raise _reject(exc, f"{reason} [the file downloaded from {url} was rejected, not kept in "
                           f"the cache; {mirror_hint(url)}]")


def way_online() -> str:
    """How to leave offline mode: the variables when they set it, else the option the caller
    passed (``--offline``, ``offline=True``)."""
    if is_offline():
        return "unset TREX_HUB_OFFLINE / HF_HUB_OFFLINE"
    return "run without --offline (offline=True)"


def _offline_message(filename: str, path: Path, url: Optional[str],
                     command: Optional[Callable[[Path], Optional[str]]]) -> str:
    target = shlex.quote(str(path))
    cmd = ((command(path) if command is not None else None)
           or (f"curl -fL -o {target} {shlex.quote(url)}" if url
               else f"curl -fL -o {target} '<URL of {filename}>'"))
    return (f"offline mode is on and '{filename}' is not cached (expected at {path}). On a "
            f"connected machine run `{cmd}` and copy the file there, or {way_online()}.")


def fetch_checked(filename: str, url: Union[str, Callable[[], str]], *,
                  cache_dir: Optional[PathLike] = None,
                  sha256: Optional[str] = None, size: Optional[int] = None,
                  progress: bool = True, offline: Optional[bool] = None,
                  timeout: Optional[float] = None, retries: Optional[int] = None,
                  backoff: Optional[float] = None, lock_timeout: Optional[float] = None,
                  check: Optional[Check] = None,
                  offline_command: Optional[Callable[[Path], Optional[str]]] = None
                  ) -> Tuple[Path, Any]:
    """:func:`fetch`, also returning what ``check`` returned for the file (``None`` without).
    ``url`` may be a function that makes it, called only when the file must be downloaded: a
    base URL setting that is wrong then keeps no cached file from loading."""
    path = get_cache_dir(cache_dir) / filename
    offline = is_offline() if offline is None else offline
    deleted = ""
    if path.is_file():
        cheap = check_cached(path, sha256=sha256, size=size)
        if cheap.ok:
            return path, _check_cached_file(path, check)
        deleted = f"the cached {path} was corrupt ({cheap.reason})"
        try:
            remove_cached(path)  # keep the manifest: the new download must match it
        except OSError as exc:
            raise ReadOnlyCacheError(f"{deleted} and cannot be deleted ({exc.strerror or exc}); "
                                     "replace it by hand, or set TREX_HUB_CACHE to a writable "
                                     "folder.") from None
        deleted += " and has been deleted"
        log.warning("trex_hub: %s; downloading it again", deleted)
    if offline:
        try:
            shown: Optional[str] = url() if callable(url) else url
        except DownloadError:  # a malformed base URL: the offline error is the one to give
            shown = None
        msg = _offline_message(filename, path, shown, offline_command)
        raise OfflineError(f"{deleted}; {msg}" if deleted else msg)
    if callable(url):
        url = url()
    _require_writable(path.parent, filename)
    with file_lock(path, lock_timeout) as locked:
        if path.is_file() and check_cached(path, sha256=sha256, size=size).ok:
            return path, _check_cached_file(path, check)  # another process finished it
        man = read_manifest(path)
        expected_sha = sha256 or (man["sha256"] if man else None)
        expected_size = size if size is not None else (man["size"] if man else None)
        sweep_private_partials(path)
        # with the lock: the shared, resumable partial; without it: a private temp file
        tmp = partial_path(path) if locked else private_partial_path(path)
        resumed = tmp.is_file() and tmp.stat().st_size > 0
        while True:
            try:
                digest, got = download(url, tmp, sha256=expected_sha, size=expected_size,
                                       progress=progress, desc=filename, timeout=timeout,
                                       retries=retries, backoff=backoff, resumable=locked)
            except IntegrityError as exc:
                if man and not sha256:
                    raise IntegrityError(
                        f"{exc} Trust on first use: {manifest_path(path)} recorded SHA-256 "
                        f"{man['sha256']} ({man['size']} bytes) at the first download of "
                        f"'{filename}'. If the file legitimately changed upstream, delete that "
                        "manifest and retry.") from None
                raise
            try:
                result = _check_fresh_file(tmp, url, check)
            except ValueError:
                if resumed:  # the partial may have come from another source: once from byte 0
                    log.warning("trex_hub: %s resumed onto a partial download left by an "
                                "earlier attempt and was rejected; downloading it again from "
                                "byte 0", filename)
                    resumed = False
                    continue
                raise
            except BaseException:
                if tmp.exists() and not locked:
                    tmp.unlink()
                raise
            break
        os.replace(tmp, path)
        fsync_dir(path.parent)
        write_manifest(path, sha256=digest, size=got, url=url)
    return path, result


def fetch(filename: str, url: Union[str, Callable[[], str]], **kwargs: Any) -> Path:
    """The cached, verified path of ``filename``, downloading it from ``url`` first if needed.

    A cached file gets the cheap check (its size against the manifest and ``size``); a bad one
    is deleted (with a warning) and downloaded again. A new download is verified against
    ``sha256``/``size`` when known, else against the manifest of an earlier download (trust on
    first use); its SHA-256 and size are then recorded in ``<file>.manifest.json``.

    ``check(path)`` runs on the fresh file before it is renamed into the cache and on a cached
    file before it is returned; raising ``ValueError`` rejects the file: a fresh one is not kept,
    a cached one is deleted (with its manifest when the manifest vouches for those bytes), and
    the error says so. ``offline_command(path)`` may name the command that fetches the file on
    a connected machine, for the offline error. Keyword arguments: see :func:`fetch_checked`.
    """
    return fetch_checked(filename, url, **kwargs)[0]


def local_rank_zero_first(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a ``torch.distributed`` job: local rank 0 first, the others
    after a barrier (they then find the file in the cache).

    Outside an initialised process group this is a plain call. Locks keep it correct even when
    several nodes share one cache folder.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() <= 1:
        return fn(*args, **kwargs)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    error: Optional[BaseException] = None
    result: Any = None
    done = False
    if local_rank == 0:
        try:
            result, done = fn(*args, **kwargs), True
        except Exception as exc:  # release the others before raising
            error = exc
    dist.barrier()
    if error is not None:
        raise error
    return result if done else fn(*args, **kwargs)


def fetch_distributed(filename: str, url: str, **kwargs: Any) -> Path:
    """:func:`fetch` where, under ``torch.distributed``, local rank 0 downloads and the other
    ranks wait at a barrier, then read the cache."""
    return local_rank_zero_first(fetch, filename, url, **kwargs)
