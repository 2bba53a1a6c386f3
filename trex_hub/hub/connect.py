"""How a download connects: which proxy a URL goes through, and a connect timeout of its own.

Proxies come from the environment as curl and huggingface_hub read them: ``http_proxy`` /
``https_proxy`` (either case), else ``all_proxy`` / ``ALL_PROXY``; ``no_proxy`` / ``NO_PROXY``
bypass them, and loopback addresses are always reached directly. Opening the TCP connection has
its own, shorter timeout (:data:`DEFAULT_CONNECT_TIMEOUT`, ``$TREX_HUB_CONNECT_TIMEOUT``); the
read timeout of the caller applies once connected. A connection that cannot be opened (refused,
unreachable, no DNS answer, no answer in time) comes out as :class:`ConnectFailure`, naming the
peer it was for (the proxy when there is one): no byte was exchanged, unlike a connection lost
mid-way. Nothing here raises the package's errors: :mod:`trex_hub.hub.http` words them.
"""
from __future__ import annotations

import functools
import http.client
import os
import re
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Optional, Tuple

DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to open a connection (the proxy's, when there is one)

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class Proxy:
    """The proxy a request goes through: its URL, ``host:port`` and the variable it came from.
    Shown (``str``, ``repr``) without the URL, which may hold a user and password."""

    url: str = field(repr=False)
    hostport: str
    var: str
    has_credentials: bool

    def __str__(self) -> str:
        return f"the proxy {self.hostport} (from {self.var})"


def shown(value: str) -> str:
    """A proxy setting as it may be printed: ``scheme://host:port``, without the user and
    password (they end at the last ``@``), the path or the query."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    return scheme + sep + re.split(r"[/?#]", rest.rpartition("@")[2], maxsplit=1)[0]


def _proxy_var(scheme: str, value: str) -> str:
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(name) == value:
            return name
    return "the system proxy settings"


def _parse(value: str, scheme: str) -> Optional[Proxy]:
    """``value`` as an HTTP proxy, or ``None`` when it is of a kind this client cannot use."""
    full = value if "://" in value else "http://" + value
    try:
        parts = urllib.parse.urlsplit(full)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Proxy(full, f"{host}:{port}", _proxy_var(scheme, value), bool(parts.username))


def _bypassed(parts: urllib.parse.SplitResult) -> bool:
    host = parts.hostname or ""
    return host in _LOOPBACK or bool(urllib.request.proxy_bypass(
        parts.netloc.rpartition("@")[2] or host))


def proxy_for(url: str) -> Optional[Proxy]:
    """The proxy that a request for ``url`` goes through, or ``None`` for a direct connection."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    proxies = urllib.request.getproxies()
    value = proxies.get(parts.scheme) or proxies.get("all")
    if not value or _bypassed(parts):
        return None
    return _parse(value, parts.scheme)


def unused_proxy_note(url: str) -> str:
    """For a failed direct connection: a note when the proxy variable that applies to ``url``
    names a proxy this client cannot use (SOCKS), else ``""``."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    value = proxies.get(parts.scheme) or proxies.get("all")
    if not value or _parse(value, parts.scheme) is not None or _bypassed(parts):
        return ""
    var, value_shown = _proxy_var(parts.scheme, value), shown(value)
    if value_shown.partition("://")[0].lower() in ("", "http", "https"):  # but unreadable
        return (f" {var}={value_shown!r} was not used: it is not a proxy URL this client can "
                "read (http://host:port).")
    return (f" {var}={value_shown!r} was not used: this client goes through HTTP proxies "
            f"only (set {parts.scheme}_proxy to one).")


class ConnectFailure(OSError):
    """The TCP connection to ``host:port`` could not be opened: no byte was exchanged."""

    def __init__(self, host: str, port: int, cause: OSError, limit: float):
        self.host, self.port, self.cause = host, port, cause
        if isinstance(cause, socket.timeout):
            self.why = f"no answer within {limit:g} s"
        else:
            self.why = f"{type(cause).__name__}: {cause.strerror or cause}"
        super().__init__(f"cannot connect to {self.hostport} ({self.why})")

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class _ConnectTimeout:
    """A connection whose TCP connect has its own time limit (then the read timeout applies)."""

    def __init__(self, *args, connect_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._connect_timeout = connect_timeout
        self._create_connection = self._connect  # what HTTPConnection.connect() calls

    def _connect(self, address, timeout=None, source_address=None):
        read = timeout if isinstance(timeout, (int, float)) else socket.getdefaulttimeout()
        limit = min(self._connect_timeout, read) if read else self._connect_timeout
        try:
            sock = socket.create_connection(address, limit, source_address)
        except OSError as exc:
            raise ConnectFailure(str(address[0]), int(address[1]), exc, limit) from exc
        sock.settimeout(read)
        return sock


class _HTTPConnection(_ConnectTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ConnectTimeout, http.client.HTTPSConnection):
    pass


class _TimedOpen:
    """A urllib handler whose connections are ``connection`` with ``connect_timeout``."""

    connection: type

    def __init__(self, connect_timeout: float):
        super().__init__()
        self.connect_timeout = connect_timeout

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(  # type: ignore[misc]
            self.connection, connect_timeout=self.connect_timeout), req, **kwargs)


class _HTTPHandler(_TimedOpen, urllib.request.HTTPHandler):
    connection = _HTTPConnection


class _HTTPSHandler(_TimedOpen, urllib.request.HTTPSHandler):
    connection = _HTTPSConnection


def opener(url: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
           ) -> Tuple[urllib.request.OpenerDirector, Optional[Proxy]]:
    """An opener for ``url`` (through its proxy, if any, see :func:`proxy_for`) whose
    connections time out after ``connect_timeout`` s when opening; and that proxy."""
    proxy = proxy_for(url)
    scheme = urllib.parse.urlsplit(url).scheme
    handler = urllib.request.ProxyHandler({scheme: proxy.url} if proxy else {})
    return urllib.request.build_opener(handler, _HTTPHandler(connect_timeout),
                                       _HTTPSHandler(connect_timeout)), proxy


__all__ = ["DEFAULT_CONNECT_TIMEOUT", "ConnectFailure", "Proxy", "opener", "proxy_for", "shown",
           "unused_proxy_note"]
