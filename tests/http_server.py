"""A threaded HTTP file server on 127.0.0.1 for tests (files from a folder, Range supported)."""
from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path
from typing import List


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802
        server = self.server
        server.requests.append(self.path)
        name = self.path.lstrip("/").split("?")[0]
        path = Path(server.root) / name
        if not name or not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and server.honour_range:
            start = int(rng[6:].split("-")[0] or 0)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)


class FileServer:
    """``with FileServer(folder) as srv: srv.url`` serves ``folder`` on a free loopback port."""

    def __init__(self, root: os.PathLike, honour_range: bool = True):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.root = str(root)
        self.httpd.honour_range = honour_range
        self.httpd.requests: List[str] = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    @property
    def requests(self) -> List[str]:
        return self.httpd.requests

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
