"""A threaded HTTP file server on 127.0.0.1 for tests: files from a folder, Range, fault injection.

``with FileServer(folder) as srv: srv.url`` serves ``folder`` on a free loopback port. Faults are
set on ``srv.faults`` (a :class:`Faults`) and apply to GET requests, each as many times as asked:

* ``statuses = [503, 503]``: answer those statuses first (one per request), then serve normally;
* ``drop_after = n`` (``drop_times``): send ``n`` body bytes, then reset the connection;
* ``truncate_after = n`` (``truncate_times``): announce the full ``Content-Length`` but send only
  ``n`` bytes and close cleanly (the header lies);
* ``stall_after = n`` (``stall_seconds``, ``stall_times``): send ``n`` bytes, then go silent;
* ``corrupt = True``: flip one byte of every file served (wrong bytes, right length);
* ``replace = {name: bytes}``: serve other bytes for a file;
* ``throttle = s``: sleep ``s`` seconds after every ``chunk`` bytes (to catch a download mid-way).

``honour_range=False`` makes the server ignore ``Range`` headers (always 200 with the whole file).
``srv.requests`` lists the requested paths; ``srv.log`` has ``(method, path, range, status)`` and
``srv.headers`` the request headers, one dict per logged request. It also answers proxy requests
(absolute URLs), so it can stand in for an HTTP proxy.
"""
from __future__ import annotations

import http.server
import os
import socket
import struct
import threading
import urllib.parse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple


@dataclass
class Faults:
    statuses: List[int] = field(default_factory=list)
    drop_after: Optional[int] = None
    drop_times: int = 1
    truncate_after: Optional[int] = None
    truncate_times: int = 1
    stall_after: Optional[int] = None
    stall_seconds: float = 5.0
    stall_times: int = 1
    corrupt: bool = False
    replace: Dict[str, bytes] = field(default_factory=dict)
    throttle: float = 0.0
    chunk: int = 64 * 1024


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def _take(self, attr: str) -> Optional[int]:
        """The fault threshold ``attr`` if it still has uses left (and use one up)."""
        faults: Faults = self.server.faults
        with self.server.lock:
            value = getattr(faults, attr)
            times_attr = attr.split("_")[0] + "_times"
            if value is None or getattr(faults, times_attr) <= 0:
                return None
            setattr(faults, times_attr, getattr(faults, times_attr) - 1)
            return value

    def _record(self, status: int) -> None:
        self.server.log.append((self.command, self.path, self.headers.get("Range"), status))
        self.server.headers.append(dict(self.headers))

    def do_HEAD(self):  # noqa: N802
        self._serve(head=True)

    def do_GET(self):  # noqa: N802
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        server = self.server
        if not head:
            server.requests.append(self.path)
        faults: Faults = server.faults
        with server.lock:
            status = faults.statuses.pop(0) if (faults.statuses and not head) else None
        if status is not None:
            self._record(status)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        # a proxy request carries the absolute URL: serve its path
        name = urllib.parse.urlsplit(self.path).path.lstrip("/")
        path = Path(server.root) / name
        if not name or not path.is_file():
            self._record(404)
            self.send_error(404, "not found")
            return
        data = faults.replace.get(name, None)
        if data is None:
            data = path.read_bytes()
        if faults.corrupt and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and server.honour_range:
            start = int(rng[6:].split("-")[0] or 0)
            if start >= len(data):
                self._record(416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._record(206)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self._record(200)
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if head:
            return
        drop = self._take("drop_after")
        trunc = self._take("truncate_after")
        stall = self._take("stall_after")
        self._send_body(body, drop, trunc, stall)

    def _write(self, data: bytes) -> None:
        faults: Faults = self.server.faults
        for i in range(0, len(data), faults.chunk):
            self.wfile.write(data[i:i + faults.chunk])
            if faults.throttle:
                self.wfile.flush()
                time.sleep(faults.throttle)

    def _send_body(self, body: bytes, drop: Optional[int], trunc: Optional[int],
                   stall: Optional[int]) -> None:
        limit = min(x for x in (drop, trunc, len(body)) if x is not None)
        try:
            if stall is not None and stall < limit:
                self._write(body[:stall])
                self.wfile.flush()
                time.sleep(self.server.faults.stall_seconds)
                self._write(body[stall:limit])
            else:
                self._write(body[:limit])
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if limit < len(body):
            self.close_connection = True
            if drop is not None and limit == drop:
                time.sleep(0.1)  # let the client read what was sent before the reset
                # abortive close: RST instead of FIN, as when a link goes down
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)  # clean FIN, fewer bytes than announced
            self.connection.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    root: str
    honour_range: bool
    faults: Faults
    lock: threading.Lock
    requests: List[str]
    log: List[Tuple[str, str, Optional[str], int]]
    headers: List[Dict[str, str]]


class FileServer:
    """``with FileServer(folder) as srv: srv.url`` serves ``folder`` on a free loopback port."""

    def __init__(self, root: os.PathLike, honour_range: bool = True,
                 faults: Optional[Faults] = None):
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.root = str(root)
        self.httpd.honour_range = honour_range
        self.httpd.faults = faults or Faults()
        self.httpd.lock = threading.Lock()
        self.httpd.requests = []
        self.httpd.log = []
        self.httpd.headers = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    @property
    def requests(self) -> List[str]:
        return self.httpd.requests

    @property
    def log(self) -> List[Tuple[str, str, Optional[str], int]]:
        return self.httpd.log

    @property
    def headers(self) -> List[Dict[str, str]]:
        return self.httpd.headers

    @property
    def faults(self) -> Faults:
        return self.httpd.faults

    @property
    def honour_range(self) -> bool:
        return self.httpd.honour_range

    @honour_range.setter
    def honour_range(self, value: bool) -> None:
        self.httpd.honour_range = value

    def gets(self, name: str) -> List[Tuple[str, str, Optional[str], int]]:
        """The GET requests for file ``name``."""
        return [e for e in self.log
                if e[0] == "GET" and urllib.parse.urlsplit(e[1]).path.lstrip("/") == name]

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
