"""A threaded HTTP file server on 127.0.0.1 for tests: files from a folder, Range, fault injection.

``with FileServer(folder) as srv: srv.url`` serves ``folder`` on a free loopback port. Faults are
set on ``srv.faults`` (a :class:`Faults`) and apply to GET requests, each as many times as asked:

* ``statuses = [503, 503]``: answer those statuses first (one per request), then serve normally
  (with ``Retry-After: retry_after``);
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
import re
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


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
    retry_after: str = "0"


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
            self.send_header("Retry-After", faults.retry_after)
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
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

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


# --------------------------------------------------------------------------------------------
# A minimal Hugging Face Hub on 127.0.0.1 (what huggingface_hub's download and upload calls use)
# --------------------------------------------------------------------------------------------
class _HubRepo:
    def __init__(self) -> None:
        self.commits: Dict[str, Dict[str, bytes]] = {}  # commit sha -> {path: bytes}
        self.refs: Dict[str, str] = {}                    # branch or tag -> commit sha
        self.private = False

    def resolve(self, revision: str) -> Optional[str]:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None

    def commit(self, files: Dict[str, bytes], branch: str = "main", message: str = "") -> str:
        import hashlib

        parent = self.refs.get(branch)
        tree = dict(self.commits.get(parent, {})) if parent else {}
        tree.update(files)
        sha = hashlib.sha1(f"{parent}:{message}:{sorted(tree)}:{len(self.commits)}".encode()
                           + b"".join(tree[k] for k in sorted(tree))).hexdigest()
        self.commits[sha] = tree
        self.refs[branch] = sha
        return sha


class _HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- helpers --------------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
               head: bool = False) -> None:
        self.server.log.append((self.command, self.path, status))
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head and self.command != "HEAD":  # a HEAD reply has no body
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        import json

        self._reply(status, json.dumps(obj).encode(),
                    {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str,
               headers: Optional[Dict[str, str]] = None) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message,
                                               **(headers or {})})

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorised(self, repo: "_HubRepo") -> bool:
        if not repo.private:
            return True
        return self.headers.get("Authorization") == f"Bearer {self.server.token}"

    # -- routes ---------------------------------------------------------------------------------
    def do_HEAD(self):  # noqa: N802
        self._resolve(head=True)

    def do_GET(self):  # noqa: N802
        self._resolve(head=False)

    def _resolve(self, head: bool) -> None:
        import hashlib

        server = self.server
        server.auth.append(self.headers.get("Authorization"))
        parts = urllib.parse.urlsplit(self.path).path.lstrip("/").split("/")
        # /{org}/{repo}/resolve/{revision}/{filename...}
        if len(parts) < 5 or parts[2] != "resolve":
            self._error(404, "EntryNotFound", f"no route {self.path}")
            return
        repo_id = f"{parts[0]}/{parts[1]}"
        revision = urllib.parse.unquote(parts[3])
        filename = urllib.parse.unquote("/".join(parts[4:]))
        with server.lock:
            repo = server.repos.get(repo_id)
            if server.fail_statuses and not head:
                status = server.fail_statuses.pop(0)
                self._reply(status)
                return
        if repo is None or not self._authorised(repo):
            self._error(401 if repo is not None else 404, "RepoNotFound",
                        "Repository not found")
            return
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        tree = repo.commits[sha]
        if filename not in tree:
            self._error(404, "EntryNotFound", f"{filename} does not exist",
                        {"X-Repo-Commit": sha})
            return
        data = tree[filename]
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[6:].split("-")[0] or 0)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._reply(206, data[start:], headers)
            return
        self._reply(200, data, headers, head=head)
        if head:
            return
        server.downloads.append((repo_id, sha, filename))

    def do_POST(self):  # noqa: N802
        import base64
        import json

        server = self.server
        server.auth.append(self.headers.get("Authorization"))
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            req = json.loads(body or b"{}")
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") \
                else f"{server.user}/{req['name']}"
            with server.lock:
                if repo_id in server.repos:
                    self._json(409, {"error": "You already created this model repo",
                                     "url": f"{server.url}{repo_id}"})
                    return
                repo = server.repos[repo_id] = _HubRepo()
                repo.private = bool(req.get("private"))
                repo.commit({".gitattributes": b"*.safetensors filter=lfs\n"},
                            message="initial commit")
            self._json(200, {"url": f"{server.url}{repo_id}", "name": repo_id})
            return
        if path == "/api/validate-yaml":  # the README.md front matter, checked before upload
            import yaml

            content = json.loads(body)["content"]
            m = re.match(r"^---\n(.*?)\n---", content, re.S)
            try:
                meta = yaml.safe_load(m.group(1)) if m else None
            except yaml.YAMLError as exc:
                meta, err = None, str(exc)
            else:
                err = None if isinstance(meta, dict) else "no YAML metadata block"
            if err:
                self._json(400, {"errors": [{"message": err}]})
            else:
                self._json(200, {"warnings": []})
            return
        m = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)$", path)
        if not m:
            self._error(404, "EntryNotFound", f"no route {path}")
            return
        repo_id, action, revision = m.group(1), m.group(2), urllib.parse.unquote(m.group(3))
        repo = server.repos.get(repo_id)
        if repo is None or not self._authorised(repo):
            self._error(404, "RepoNotFound", "Repository not found")
            return
        if action == "branch":  # create_branch: from startingPoint, else from main
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            with server.lock:
                if revision in repo.refs:
                    self._error(409, "Conflict", f"Reference {revision} already exists")
                    return
                sha = repo.resolve(start)
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {start}")
                    return
                repo.refs[revision] = sha
            self._json(200, {})
            return
        if repo.resolve(revision) is None and not revision.startswith("refs/pr/"):
            # as the Hub: a commit goes onto an existing branch (create_branch makes one)
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        if action == "preupload":
            files = json.loads(body)["files"]
            self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                        "shouldIgnore": False, "oid": None} for f in files],
                             "commitOid": repo.resolve(revision)})
            return
        lines = [json.loads(x) for x in body.splitlines() if x.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                 for x in lines if x["key"] == "file"}
        with server.lock:
            sha = repo.commit(files, branch=revision, message=header.get("summary", ""))
        self._json(200, {"commitUrl": f"{server.url}{repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None})


class _HubHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class HubServer:
    """An in-memory Hugging Face Hub on a free loopback port; point ``HF_ENDPOINT`` at ``.url``.

    ``add(repo_id, {path: bytes})`` publishes a commit; uploads (``preupload`` / ``commit``) go
    onto an existing branch only, as on the Hub, and ``create_branch`` makes one. ``private=True``
    repos need ``Authorization: Bearer <token>`` (``.token``). ``.downloads`` lists the file GETs
    served, ``.auth`` the Authorization headers seen, ``.log`` every request, ``.fail_statuses``
    makes the next GETs fail with those statuses.
    """

    def __init__(self, user: str = "tester", token: str = "hf_test_token") -> None:
        self.httpd = _HubHTTPServer(("127.0.0.1", 0), _HubHandler)
        self.httpd.repos: Dict[str, _HubRepo] = {}
        self.httpd.lock = threading.Lock()
        self.httpd.log = []
        self.httpd.auth = []
        self.httpd.downloads = []
        self.httpd.fail_statuses = []
        self.httpd.user = user
        self.httpd.token = token
        self.httpd.url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    @property
    def token(self) -> str:
        return self.httpd.token

    def __getattr__(self, name: str) -> Any:
        if name in ("repos", "log", "auth", "downloads", "fail_statuses"):
            return getattr(self.httpd, name)
        raise AttributeError(name)

    def add(self, repo_id: str, files: Dict[str, bytes], *, branch: str = "main",
            private: bool = False, tag: Optional[str] = None) -> str:
        with self.httpd.lock:
            repo = self.httpd.repos.setdefault(repo_id, _HubRepo())
            repo.private = private or repo.private
            sha = repo.commit(files, branch=branch, message="add")
            if tag:
                repo.refs[tag] = sha
        return sha

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
