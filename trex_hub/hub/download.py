"""HTTP downloads into the trex_hub cache, verified, resumable, atomic and shared safely.

Cache location: ``cache_dir=`` argument, else ``$TREX_HUB_CACHE``, else
``$XDG_CACHE_HOME/trex_hub``, else ``~/.cache/trex_hub``. Base URL: ``base_url=`` argument, else a
per-model mirror set with :func:`set_mirror`, else ``$TREX_HUB_BASE_URL``, else the official one.
``$TREX_HUB_OFFLINE=1`` (or ``$HF_HUB_OFFLINE=1``) never touches the network.

Cache layout (flat, one folder)::

    <cache>/trexstar.pth                    the verified file, under its released name
    <cache>/trexstar.pth.manifest.json      {"sha256", "size", "url", ...}: trust on first use
    <cache>/trexstar.pth.incomplete         a partial download, resumed by the next attempt
    <cache>/.locks/trexstar_pth.lock        inter-process lock (one download at a time)

What is verified, when, and against what is described in ``docs/integrity.md``.
Nothing in this module knows about torch modules.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from ..fileio import atomic_write, fsync_dir
from ..registry import OFFICIAL_BASE_URL
from ..fileio import PathLike

CHUNK = 1 << 20

MANIFEST_SUFFIX = ".manifest.json"
PARTIAL_SUFFIX = ".incomplete"
LOCK_DIR = ".locks"

#: defaults, each overridable per call and through the environment
DEFAULT_TIMEOUT = 30.0        # seconds without a byte before a connection counts as stalled
DEFAULT_RETRIES = 5           # extra attempts after the first one, for transient failures
DEFAULT_BACKOFF = 1.0         # first back-off in seconds; doubles each retry (capped, jittered)
MAX_BACKOFF = 30.0
DEFAULT_LOCK_TIMEOUT = 3600.0  # how long to wait for another process's download of the same file

log = logging.getLogger(__name__)

# Per-model mirrors set through the API (model name -> base URL); see set_mirror().
_MODEL_MIRRORS: Dict[str, str] = {}


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and what to do."""


class NotFoundError(DownloadError):
    """The server answered 404/403/401/410: retrying will not help."""


class IntegrityError(DownloadError):
    """A file's bytes do not match the expected size or SHA-256; the bad file has been deleted."""


class OfflineError(DownloadError):
    """Offline mode is on and the file is not in the cache."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    return _truthy(os.environ.get("TREX_HUB_OFFLINE")) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def get_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TREX_HUB_CACHE"):
        return Path(os.environ["TREX_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "trex_hub"


def set_mirror(model: str, base_url: Optional[str]) -> None:
    """Download one model's files from ``base_url`` (``None`` removes the override).

    Precedence: ``base_url=`` argument > this per-model mirror > ``$TREX_HUB_BASE_URL`` > official.
    """
    from ..registry import get_entry

    name = get_entry(model).name
    if base_url:
        _MODEL_MIRRORS[name] = base_url
    else:
        _MODEL_MIRRORS.pop(name, None)


def get_mirror(model: Optional[str]) -> Optional[str]:
    return _MODEL_MIRRORS.get(model) if model else None


def get_base_url(base_url: Optional[str] = None, model: Optional[str] = None) -> str:
    url = base_url or get_mirror(model) or os.environ.get("TREX_HUB_BASE_URL") or OFFICIAL_BASE_URL
    return url if url.endswith("/") else url + "/"


def file_url(filename: str, base_url: Optional[str] = None, model: Optional[str] = None) -> str:
    return get_base_url(base_url, model) + urllib.parse.quote(filename)


def _mirror_hint() -> str:
    current = os.environ.get("TREX_HUB_BASE_URL")
    now = f" (now {current!r})" if current else " (unset: the official server is used)"
    return f"check the file name and the mirror setting TREX_HUB_BASE_URL{now}"


def sha256_of(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def user_agent() -> str:
    from .. import __version__

    return f"trex_hub/{__version__} python/{sys.version_info[0]}.{sys.version_info[1]}"


# --------------------------------------------------------------------------------------------
# Manifest (trust on first use)
# --------------------------------------------------------------------------------------------
def manifest_path(path: PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def partial_path(path: PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + PARTIAL_SUFFIX)


def read_manifest(path: PathLike) -> Optional[Dict[str, Any]]:
    """The manifest of cached file ``path``, or ``None`` (missing or unreadable)."""
    mp = manifest_path(path)
    try:
        data = json.loads(mp.read_text())
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
    """Check a cached file against its manifest and the registry's ``sha256``/``size``.

    ``full=False`` is the cheap check run on every load (sizes only; a file without a manifest is
    hashed once and its manifest recorded). ``full=True`` re-hashes the file (``--verify``).
    """
    p = Path(path)
    try:
        actual = p.stat().st_size
    except FileNotFoundError:
        return CheckResult(p, False, "missing")
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
            write_manifest(p, sha256=digest, size=actual, url=None, source="adopted")
        return CheckResult(p, True, "", digest, actual)
    return CheckResult(p, True, "", man["sha256"], actual)


# --------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------
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
    timeout = _env_float("TREX_HUB_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT) if timeout is None \
        else timeout
    try:
        import filelock
    except ImportError:  # pragma: no cover - a dependency
        yield False
        return
    lp = lock_path(path)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lp), timeout=timeout)
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


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _opener(url: str) -> urllib.request.OpenerDirector:
    """Proxies come from the environment (``https_proxy``, ``no_proxy``...), except for loopback."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in _LOOPBACK:
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()  # ProxyHandler() reads the environment


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, 5xx, short body)."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds form only)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _backoff(attempt: int, base: float) -> float:
    delay = min(MAX_BACKOFF, base * (2 ** attempt))
    return delay * (0.75 + 0.5 * random.random())


def _progress_bar(progress: bool, total: Optional[int], initial: int, desc: str):
    if not progress or not (sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - a dependency
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, leave=False, dynamic_ncols=True)


def _parse_content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


def _attempt(url: str, tmp: Path, *, timeout: float, expected_size: Optional[int],
             progress: bool, desc: str) -> int:
    """One HTTP attempt appending to ``tmp`` (resuming from its size). Returns the total size."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    if expected_size is not None and offset > expected_size:
        offset = 0
        tmp.unlink()
    if expected_size is not None and offset == expected_size and offset > 0:
        return offset  # an earlier attempt got every byte (e.g. killed before the rename)
    headers = {"User-Agent": user_agent(), "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = _opener(url).open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        code = exc.code
        exc.close()
        if code == 416 and offset:
            m = re.match(r"bytes \*/(\d+)", exc.headers.get("Content-Range") or "")
            if m and int(m.group(1)) == offset:
                return offset  # the partial already holds every byte (verified next)
            tmp.unlink()  # our partial is no prefix the server recognises: start over
            raise _Transient("HTTP 416 for a resumed download; restarting") from None
        if code in (401, 403, 404, 410):
            raise NotFoundError(f"{url}: HTTP {code} {exc.reason}; {_mirror_hint()}.") from None
        if code >= 500 or code in (408, 429):
            raise _Transient(f"HTTP {code} {exc.reason}",
                             _retry_after(exc.headers.get("Retry-After"))) from None
        raise DownloadError(f"{url}: HTTP {code} {exc.reason}; {_mirror_hint()}.") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException,
            OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):  # retrying will not help
            raise DownloadError(f"{url}: TLS certificate verification failed ({reason}); fix "
                                "the system certificates (SSL_CERT_FILE) or use a mirror "
                                "(TREX_HUB_BASE_URL).") from None
        raise _Transient(f"{type(reason).__name__}: {reason}") from None
    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        body_len = int(length) if length and length.isdigit() else None
        if status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                tmp.unlink()
                raise _Transient(f"server resumed at byte {start}, not {offset}; restarting")
            mode = "ab"
        else:
            if offset:
                log.info("%s ignored the Range request; downloading from the start", url)
            offset, total, mode = 0, body_len, "wb"
        if total is None and body_len is not None:
            total = offset + body_len
        if expected_size is not None and total is not None and total != expected_size:
            raise IntegrityError(f"{url}: the server announces {total} bytes but "
                                 f"{expected_size} are expected; {_mirror_hint()}.")
        got = 0
        bar = _progress_bar(progress, total, offset, desc)
        try:
            with open(tmp, mode) as out:
                while True:
                    try:
                        block = resp.read1(CHUNK)  # what has arrived: a reset loses nothing
                    except (socket.timeout, ConnectionError, http.client.HTTPException,
                            OSError) as exc:
                        raise _Transient(f"connection lost after {offset + got} bytes "
                                         f"({type(exc).__name__}: {exc})") from None
                    if not block:
                        break
                    out.write(block)
                    got += len(block)
                    if bar is not None:
                        bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        finally:
            if bar is not None:
                bar.close()
        if body_len is not None and got < body_len:
            raise _Transient(f"connection closed after {offset + got} of {offset + body_len} "
                             "bytes")
        size = offset + got
        if total is not None and size != total:
            raise _Transient(f"received {size} of {total} bytes")
        return size


def download_url(url: str, dest: PathLike, *, sha256: Optional[str] = None,
                 size: Optional[int] = None, progress: bool = True,
                 timeout: Optional[float] = None, retries: Optional[int] = None,
                 backoff: Optional[float] = None, private_tmp: bool = False,
                 validate: Optional[Callable[[Path], Any]] = None) -> Tuple[Path, str, int]:
    """Download ``url`` to ``dest``; returns ``(dest, sha256, size)``.

    Bytes go to ``dest.incomplete`` (or a private temp file with ``private_tmp=True``), resumed
    with HTTP Range after a lost connection (from scratch when the server ignores Range). Once
    complete the whole file is hashed, checked against ``sha256``/``size`` when given, passed to
    ``validate`` (which raises to reject it), fsync'ed and renamed to ``dest``. A rejected file is
    deleted; a transient failure keeps the partial for the next call to resume.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    timeout = _env_float("TREX_HUB_TIMEOUT", DEFAULT_TIMEOUT) if timeout is None else timeout
    retries = int(_env_float("TREX_HUB_RETRIES", DEFAULT_RETRIES)) if retries is None else retries
    backoff = _env_float("TREX_HUB_BACKOFF", DEFAULT_BACKOFF) if backoff is None else backoff
    if private_tmp:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{random.getrandbits(32):08x}"
                             f"{PARTIAL_SUFFIX}")
    else:
        tmp = partial_path(dest)
    restarted = False
    attempt = 0
    try:
        while True:
            resumed = tmp.exists() and tmp.stat().st_size > 0
            try:
                got = _attempt(url, tmp, timeout=timeout, expected_size=size, progress=progress,
                               desc=dest.name)
            except _Transient as exc:
                if attempt >= retries:
                    kept = tmp.stat().st_size if tmp.exists() else 0
                    more = (f" {kept} bytes are kept in {tmp} and the next attempt resumes from "
                            "there." if kept and not private_tmp else "")
                    raise DownloadError(
                        f"{url}: giving up after {attempt + 1} attempts ({exc}).{more} Check the "
                        f"network or use a mirror (TREX_HUB_BASE_URL).") from None
                delay = _backoff(attempt, backoff)
                if exc.retry_after is not None:  # the server said how long to wait
                    delay = min(MAX_BACKOFF, max(delay, exc.retry_after))
                log.warning("%s: %s; retrying in %.1fs", url, exc, delay)
                attempt += 1
                time.sleep(delay)
                continue
            digest = sha256_of(tmp)
            if sha256 and digest != sha256:
                if resumed and not restarted:
                    # the old partial may hold different bytes: verify a clean download once
                    log.warning("%s: SHA-256 mismatch after resuming; downloading again", url)
                    tmp.unlink()
                    restarted = True
                    continue
                tmp.unlink()
                raise IntegrityError(
                    f"{url}: downloaded {got} bytes with SHA-256 {digest}, but {sha256} was "
                    f"expected; the file was deleted. The server or mirror serves different "
                    f"bytes: {_mirror_hint()}.")
            if validate is not None:
                validate(tmp)  # raises to reject; the finally clause deletes tmp
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
            return dest, digest, got
    except BaseException as exc:
        # Keep a partial only for a transient failure (resumable). Anything else (bad bytes,
        # rejected content, a private temp file) must not linger.
        transient = isinstance(exc, (DownloadError, KeyboardInterrupt)) and not isinstance(
            exc, (IntegrityError, NotFoundError)) and not private_tmp
        if not transient and tmp.exists():
            tmp.unlink()
        raise


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------
def _offline_message(filename: str, path: Path, url: str) -> str:
    from ..registry import MODELS

    model = next((e.name for e in MODELS.values()
                  if any(f.filename == filename for f in e.files())), None)
    if model is not None:
        full = " --full" if MODELS[model].full_file and MODELS[model].full_file.filename == \
            filename else ""
        cmd = f"trex-download {model}{full} --cache-dir {path.parent}"
    else:
        cmd = f"curl -fL -o {path} {url}"
    return (f"offline mode is on and '{filename}' is not cached (expected at {path}). On a "
            f"connected machine run `{cmd}` and copy the file there, or unset TREX_HUB_OFFLINE "
            "/ HF_HUB_OFFLINE.")


def fetch(filename: str, *, base_url: Optional[str] = None, cache_dir: Optional[PathLike] = None,
          sha256: Optional[str] = None, size: Optional[int] = None, progress: bool = True,
          offline: Optional[bool] = None, model: Optional[str] = None,
          timeout: Optional[float] = None, retries: Optional[int] = None,
          backoff: Optional[float] = None, lock_timeout: Optional[float] = None,
          validate: Optional[Callable[[Path], Any]] = None) -> Path:
    """The cached, verified path of ``filename``, downloading it first if needed.

    A cached file gets the cheap check (its size against the manifest and the registry); a bad
    one is deleted (with a warning) and downloaded again. A new download is verified against
    ``sha256``/``size`` when known, else against the manifest of an earlier download (trust on
    first use); its SHA-256 and size are then recorded in ``<file>.manifest.json``. ``validate``
    gets the complete temporary file and raises to reject it (it is then not kept).
    """
    path = get_cache_dir(cache_dir) / filename
    url = file_url(filename, base_url, model)
    offline = is_offline() if offline is None else offline
    deleted = ""
    if path.is_file():
        check = check_cached(path, sha256=sha256, size=size)
        if check.ok:
            return path
        remove_cached(path)  # keep the manifest: the new download must match it
        deleted = f"the cached {path} was corrupt ({check.reason}) and has been deleted"
        warnings.warn(f"trex_hub: {deleted}; downloading it again", RuntimeWarning, stacklevel=2)
    if offline:
        msg = _offline_message(filename, path, url)
        raise OfflineError(f"{deleted}; {msg}" if deleted else msg)
    with file_lock(path, lock_timeout) as locked:
        if path.is_file() and check_cached(path, sha256=sha256, size=size).ok:
            return path  # another process finished it while we waited
        man = read_manifest(path)
        expected_sha = sha256 or (man["sha256"] if man else None)
        expected_size = size if size is not None else (man["size"] if man else None)
        try:
            _, digest, got = download_url(url, path, sha256=expected_sha, size=expected_size,
                                          progress=progress, timeout=timeout, retries=retries,
                                          backoff=backoff, private_tmp=not locked,
                                          validate=validate)
        except IntegrityError as exc:
            if man and not sha256:
                raise IntegrityError(
                    f"{exc} Trust on first use: {manifest_path(path)} recorded SHA-256 "
                    f"{man['sha256']} ({man['size']} bytes) at the first download of "
                    f"'{filename}'. If the file legitimately changed upstream, delete that "
                    "manifest and retry.") from None
            raise
        write_manifest(path, sha256=digest, size=got, url=url)
    return path


def fetch_distributed(filename: str, **kwargs: Any) -> Path:
    """:func:`fetch` for a ``torch.distributed`` job: local rank 0 downloads, the others wait.

    Outside an initialised process group this is plain :func:`fetch`. Inside one, the process with
    local rank 0 (``$LOCAL_RANK``, else the global rank) downloads while the others wait at a
    barrier, then everyone reads the cache. Locks keep it correct even when several nodes share
    one cache folder.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() <= 1:
        return fetch(filename, **kwargs)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    error: Optional[BaseException] = None
    path: Optional[Path] = None
    if local_rank == 0:
        try:
            path = fetch(filename, **kwargs)
        except Exception as exc:  # release the others before raising
            error = exc
    dist.barrier()
    if error is not None:
        raise error
    if path is None:
        path = fetch(filename, **kwargs)
    return path


def cached_path(filename: str, cache_dir: Optional[PathLike] = None) -> Optional[Path]:
    """Where ``filename`` is cached, or ``None`` when it is not (no network, no hashing)."""
    p = get_cache_dir(cache_dir) / filename
    return p if p.is_file() else None
