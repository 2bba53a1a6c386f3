"""HTTP(S) transport: one URL into one local file, resumed, retried and hashed.

What this module does: ``Range`` requests to resume a partial file, retries with jittered
exponential back-off (``Retry-After`` honoured; a host that cannot be resolved or connected to
is retried once only, unless it answered earlier in the same download), a progress bar on a
terminal, and a SHA-256 of the complete file checked against the expected one. Proxies and the
connect timeout: ``hub/connect.py``; the fixes its errors name: ``hub/advice.py``. What it does
not do: choose where files live, keep manifests or locks (``hub/cache.py``), or know which files
exist (the registry, above ``hub/``).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import math
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
from pathlib import Path
from typing import Optional, Tuple

from ..fileio import PathLike, no_room
from ..version import __version__
from .advice import mirror_hint, no_space, proxy_refused, way_out
from .connect import DEFAULT_CONNECT_TIMEOUT, ConnectFailure, Proxy, opener

CHUNK = 1 << 20

#: defaults, each overridable per call and through the environment
DEFAULT_TIMEOUT = 30.0        # seconds without a byte before a connection counts as stalled
DEFAULT_RETRIES = 5           # extra attempts after the first one, for transient failures
DEFAULT_BACKOFF = 1.0         # first back-off in seconds; doubles each retry (capped, jittered)
MAX_BACKOFF = 30.0
# extra attempts when the host name does not resolve or no connection can be opened (refused,
# unreachable, no answer within the connect timeout): on a machine without network, or a compute
# node without a way out, every attempt fails alike and five back-offs would only delay the message.
# Once the server answered in a download (a restarting mirror, an overloaded proxy or CDN node),
# such failures get every retry of TREX_HUB_RETRIES.
DNS_RETRIES = 1

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and what to do."""


class NotFoundError(DownloadError):
    """The server answered 404/403/401/410: retrying will not help."""


class IntegrityError(DownloadError):
    """A file's bytes do not match the expected size or SHA-256; the bad file has been deleted."""


class ProxyError(DownloadError):
    """The proxy refused the request (407: it wants credentials; or it will not open a tunnel to
    the host): retrying will not help."""


class DiskFullError(DownloadError):
    """The partial download could not be written (no space, quota, file size limit); it is kept
    so that a rerun resumes it."""


def env_float(name: str, default: float, *, low: float = 0.0, above: bool = False,
              integer: bool = False, finite: bool = True,
              error: type = DownloadError) -> float:
    """The number in ``$name`` (``default`` when unset or empty), checked: ``>= low`` (``> low``
    with ``above``), a whole number with ``integer``, not infinite with ``finite``. A bad value
    is an ``error`` (:class:`DownloadError` unless given) naming the variable and what it takes,
    not silently the default."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    ok = not math.isnan(value) and (value > low if above else value >= low) \
        and (math.isfinite(value) or not (finite or integer)) \
        and (not integer or value == int(value))
    if not ok:
        kind = "a whole number" if integer else "a number"
        bound = f"> {low:g}" if above else f">= {low:g}"
        raise error(f"{name}={raw!r} is not valid: it takes {kind} {bound}; fix or unset "
                    "it"[:300])
    return value


def sha256_of(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def user_agent() -> str:
    return f"trex_hub/{__version__} python/{sys.version_info[0]}.{sys.version_info[1]}"


class _Transient(Exception):
    """A failure worth retrying (connection lost, timeout, 5xx, short body); ``unresolved``
    names the host whose name did not resolve and ``unreachable`` the ``host:port`` that no
    connection could be opened to (both retried :data:`DNS_RETRIES` times only); ``proxy`` is
    set when that host was the proxy's; ``answered``: the server gave an HTTP response first."""

    def __init__(self, message: str, retry_after: Optional[float] = None,
                 unresolved: Optional[str] = None, unreachable: Optional[str] = None,
                 proxy: Optional[Proxy] = None, answered: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.unresolved = unresolved
        self.unreachable = unreachable
        self.proxy = proxy
        self.answered = answered


@contextlib.contextmanager
def _answered():
    """Marks the transient failures of its block as coming after an HTTP response."""
    try:
        yield
    except _Transient as exc:
        exc.answered = True
        raise


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
    """A tqdm bar on a terminal, or ``None``: without tqdm (``torch.hub.load`` needs only torch
    and torchvision, neither of which brings it) the download runs without a bar."""
    if not progress or not (sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, leave=False, dynamic_ncols=True)


def _parse_content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


def _open(url: str, tmp: Path, offset: int, timeout: float,
          connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
    """The HTTP response for ``url`` from byte ``offset``, or the total size when the partial
    already holds every byte (an HTTP 416 naming exactly that size)."""
    headers = {"User-Agent": user_agent(), "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    proxy = None
    try:
        op, proxy = opener(url, connect_timeout)
        return op.open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        code = exc.code
        exc.close()
        if code == 416 and offset:
            m = re.match(r"bytes \*/(\d+)", exc.headers.get("Content-Range") or "")
            if m and int(m.group(1)) == offset:
                return offset  # the partial already holds every byte (verified next)
            tmp.unlink()  # our partial is no prefix the server recognises: start over
            raise _Transient("HTTP 416 for a resumed download; restarting",
                             answered=True) from None
        if code == 407:  # the proxy's answer (plain HTTP through a proxy)
            raise ProxyError(proxy_refused(url, proxy, code, exc.reason)) from None
        if code in (401, 403, 404, 410):
            raise NotFoundError(f"{url}: HTTP {code} {exc.reason}; {mirror_hint(url)}.") \
                from None
        if code >= 500 or code in (408, 429):
            raise _Transient(f"HTTP {code} {exc.reason}",
                             _retry_after(exc.headers.get("Retry-After")), answered=True) \
                from None
        raise DownloadError(f"{url}: HTTP {code} {exc.reason}; {mirror_hint(url)}.") \
            from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException,
            OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):  # retrying will not help
            raise DownloadError(f"{url}: TLS certificate verification failed ({reason}); fix "
                                "the system certificates (SSL_CERT_FILE) or use a mirror "
                                "(TREX_HUB_BASE_URL).") from None
        if isinstance(exc, ValueError) or str(reason).startswith("unknown url type"):
            raise DownloadError(f"{url}: not a URL this client can open ({reason}); "
                                f"{mirror_hint(url)}.") from None
        tunnel = re.match(r"Tunnel connection failed: (\d+) ?(.*)", str(reason))
        if tunnel:  # the proxy answered CONNECT (an https URL) with an error
            code, target = int(tunnel.group(1)), urllib.parse.urlsplit(url).netloc
            if code < 500:
                raise ProxyError(proxy_refused(url, proxy, code, tunnel.group(2))) from None
            raise _Transient(f"{proxy or 'the proxy'} cannot reach {target} (HTTP {code} "
                             f"{tunnel.group(2)})", unreachable=target) from None
        cause = reason.cause if isinstance(reason, ConnectFailure) else reason
        if isinstance(cause, socket.gaierror):  # no DNS answer: offline, or a wrong host
            host = (reason.host if isinstance(reason, ConnectFailure)
                    else urllib.parse.urlsplit(url).hostname or url)
            of = f", the host of {proxy}" if proxy is not None else ""
            raise _Transient(f"cannot resolve {host}{of} ({cause})", unresolved=host,
                             proxy=proxy) from None
        if isinstance(reason, ConnectFailure):  # refused, unreachable, no answer in time
            raise _Transient(f"cannot connect to {proxy or reason.hostport} ({reason.why})",
                             unreachable=reason.hostport, proxy=proxy) from None
        raise _Transient(f"{type(reason).__name__}: {reason}") from None


def head_size(url: str, timeout: float = 3.0) -> Optional[int]:
    """The size a server announces for ``url`` (``Content-Length`` of a HEAD request), or
    ``None`` when it does not answer within ``timeout`` or announces none. Never raises."""
    req = urllib.request.Request(url, method="HEAD", headers={
        "User-Agent": user_agent(), "Accept-Encoding": "identity"})
    try:
        with opener(url, min(timeout, DEFAULT_CONNECT_TIMEOUT))[0].open(req, timeout=timeout) \
                as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length and length.isdigit() else None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
        return None


def _attempt(url: str, tmp: Path, *, timeout: float, connect_timeout: float,
             expected_size: Optional[int], progress: bool, desc: str, resumable: bool) -> int:
    """One HTTP attempt appending to ``tmp`` (resuming from its size). Returns the total size."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    if expected_size is not None and offset > expected_size:
        offset = 0
        tmp.unlink()
    if expected_size is not None and offset == expected_size and offset > 0:
        return offset  # an earlier attempt got every byte (e.g. killed before the rename)
    resp = _open(url, tmp, offset, timeout, connect_timeout)
    if isinstance(resp, int):
        return resp
    with resp, _answered():
        length = resp.headers.get("Content-Length")
        body_len = int(length) if length and length.isdigit() else None
        if resp.status == 206:
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
                                 f"{expected_size} are expected; {mirror_hint(url)}.")
        bar = _progress_bar(progress, total, offset, desc)
        got = _stream(resp, tmp, mode, offset, bar, total, resumable)
        if body_len is not None and got < body_len:
            raise _Transient(f"connection closed after {offset + got} of {offset + body_len} "
                             "bytes")
        size = offset + got
        if total is not None and size != total:
            raise _Transient(f"received {size} of {total} bytes")
        return size


def _stream(resp, tmp: Path, mode: str, offset: int, bar, total: Optional[int] = None,
            resumable: bool = True) -> int:
    """Copy the body of ``resp`` into ``tmp`` (fsync'ed); returns the number of bytes copied.
    A full disk (or quota, or file size limit) is a :class:`DiskFullError`."""
    got = 0
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
    except OSError as exc:  # the reads' errors are _Transient: this is the disk's
        if no_room(exc):
            raise DiskFullError(no_space(tmp, total, resumable)) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    return got


def download(url: str, tmp: PathLike, *, sha256: Optional[str] = None,
             size: Optional[int] = None, progress: bool = True, desc: str = "",
             timeout: Optional[float] = None, retries: Optional[int] = None,
             backoff: Optional[float] = None, resumable: bool = True,
             connect_timeout: Optional[float] = None) -> Tuple[str, int]:
    """Bring every byte of ``url`` into the file ``tmp``; returns its ``(sha256, size)``.

    An existing ``tmp`` is resumed with HTTP Range (from scratch when the server ignores Range).
    Once complete the whole file is hashed and checked against ``sha256``/``size`` when given.
    On failure ``tmp`` is kept only when the failure is transient and ``resumable`` (the next
    call then resumes it); bad bytes and refused requests never linger. ``connect_timeout``
    (``$TREX_HUB_CONNECT_TIMEOUT``) bounds opening a connection, ``timeout`` the wait for a byte.
    """
    tmp = Path(tmp)
    if timeout is None:
        timeout = env_float("TREX_HUB_TIMEOUT", DEFAULT_TIMEOUT, above=True)
    if retries is None:
        retries = int(env_float("TREX_HUB_RETRIES", DEFAULT_RETRIES, integer=True))
    if backoff is None:
        backoff = env_float("TREX_HUB_BACKOFF", DEFAULT_BACKOFF)
    if connect_timeout is None:
        connect_timeout = env_float("TREX_HUB_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT,
                                    above=True)
    restarted = False
    attempt = 0
    reached = False  # the server answered an attempt of this download: it has a way out
    try:
        while True:
            resumed = tmp.exists() and tmp.stat().st_size > 0
            try:
                got = _attempt(url, tmp, timeout=timeout, connect_timeout=connect_timeout,
                               expected_size=size, progress=progress, desc=desc or tmp.name,
                               resumable=resumable)
            except _Transient as exc:
                reached = reached or exc.answered
                # no way out (never answered): do not insist; it answered before: a restart
                fast = (exc.unresolved or exc.unreachable) and not reached
                if attempt >= (min(retries, DNS_RETRIES) if fast else retries):
                    kept = tmp.stat().st_size if tmp.exists() else 0
                    more = (f" {kept} bytes are kept in {tmp} and the next attempt resumes from "
                            "there." if kept and resumable else "")
                    fix = way_out(url, unresolved=exc.unresolved, unreachable=exc.unreachable,
                                  proxy=exc.proxy, reached=reached)
                    raise DownloadError(
                        f"{url}: giving up after {attempt + 1} attempts ({exc}).{more} "
                        f"{fix}") from None
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
                raise IntegrityError(
                    f"{url}: downloaded {got} bytes with SHA-256 {digest}, but {sha256} was "
                    f"expected; the file was deleted. The server or mirror serves different "
                    f"bytes: {mirror_hint(url)}.")
            return digest, got
    except BaseException as exc:
        transient = isinstance(exc, (DownloadError, KeyboardInterrupt)) and not isinstance(
            exc, (IntegrityError, NotFoundError))
        if not (transient and resumable) and tmp.exists():
            tmp.unlink()
        raise
