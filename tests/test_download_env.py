"""Downloads in hostile environments (review H): no way out, proxies, no home, full disks,
other users' caches, several processes on one cache.

Everything is served from 127.0.0.1. Host names that are not loopback (``weights.invalid``) are
never looked up: ``no_outside_dns`` makes every such lookup fail at once, as on a machine without
network, so that a test that goes wrong cannot reach outside.
"""
from __future__ import annotations

import errno
import logging
import os
import pwd
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from http_server import FileServer
from trex_hub.hub import download as dl
from trex_hub.hub import http as hub_http

FAST = dict(backoff=0.01, progress=False)
BLOB = bytes(range(256)) * 2400  # 614,400 bytes


@pytest.fixture(autouse=True)
def no_outside_dns(monkeypatch):
    """Only loopback names resolve; the environment's proxies and settings are cleared."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY", "no_proxy", "NO_PROXY", "TREX_HUB_TIMEOUT", "TREX_HUB_RETRIES",
                "TREX_HUB_BACKOFF", "TREX_HUB_CONNECT_TIMEOUT", "TREX_HUB_LOCK_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    real = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    (root / "blob.bin").write_bytes(BLOB)
    return root


@pytest.fixture
def server(blobs):
    with FileServer(blobs) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def read_head(conn: socket.socket) -> str:
    """What a client sent on ``conn`` up to the end of its request head (2 s at most)."""
    conn.settimeout(2)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def blackhole():
    """A loopback address that drops connection attempts, as a firewall does: a listener whose
    accept queue (``listen(0)``) is full, so that the kernel ignores further SYNs."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    for s in fillers + [lst]:
        s.close()


class ProxyStub:
    """A loopback proxy that answers every request (``CONNECT`` or an absolute-URL ``GET``) with
    ``status``, and records the request heads."""

    def __init__(self, status: int = 407, reason: str = "Proxy Authentication Required"):
        self.status, self.reason, self.heads = status, reason, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                self.heads.append(read_head(conn).split("\r\n\r\n")[0])
                conn.sendall(f"HTTP/1.1 {self.status} {self.reason}\r\nProxy-Authenticate: "
                             "Basic realm=\"corp\"\r\nContent-Length: 0\r\nConnection: close"
                             "\r\n\r\n".encode())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def proxy407():
    stub = ProxyStub()
    yield stub
    stub.close()


# --------------------------------------------------------------------------------------------
# 1. No way out: refused, dropped, unreachable
# --------------------------------------------------------------------------------------------
def test_a_refused_connection_fails_fast_with_the_offline_way_out(cache):
    url = f"http://127.0.0.1:{closed_port()}/"
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url=url, cache_dir=cache, retries=5, backoff=0.5,
                 progress=False)
    msg = str(err.value)
    assert time.monotonic() - t0 < 3, "five back-offs for a server that is not there"
    assert "giving up after 2 attempts" in msg and "ConnectionRefusedError" in msg, msg
    assert "trex-download" in msg and "TREX_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_a_dropped_connection_fails_within_the_connect_timeout(cache, blackhole, monkeypatch):
    """A firewall that drops SYNs: the connect has its own short timeout, not the 30 s stall
    timeout, and the attempt is not repeated five times."""
    monkeypatch.setenv("TREX_HUB_TIMEOUT", "2")
    monkeypatch.setenv("TREX_HUB_CONNECT_TIMEOUT", "0.5")
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url=blackhole, cache_dir=cache, retries=5, backoff=0.1,
                 progress=False)
    msg = str(err.value)
    assert time.monotonic() - t0 < 3
    assert "giving up after 2 attempts" in msg and "no answer within 0.5 s" in msg, msg
    assert "trex-download" in msg and "TREX_HUB_OFFLINE=1" in msg


def test_the_connect_timeout_is_bounded_by_the_stall_timeout(cache, blackhole, monkeypatch):
    monkeypatch.setenv("TREX_HUB_TIMEOUT", "0.3")  # the connect timeout (10 s) is no longer
    with pytest.raises(dl.DownloadError, match=r"no answer within 0\.3 s"):
        dl.fetch("blob.bin", base_url=blackhole, cache_dir=cache, retries=0, **FAST)


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_a_bad_connect_timeout_is_named(server, cache, monkeypatch, value):
    monkeypatch.setenv("TREX_HUB_CONNECT_TIMEOUT", value)
    with pytest.raises(dl.DownloadError, match=f"^TREX_HUB_CONNECT_TIMEOUT={value!r} is not "
                                               "valid: it takes a number > 0"):
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert server.requests == []


def test_a_slow_body_still_resumes_after_stalls_with_all_retries(server, cache, monkeypatch):
    """The short connect timeout does not apply to the body, and a body that stalls is retried
    TREX_HUB_RETRIES times (resuming), not given up on like a host that cannot be reached."""
    monkeypatch.setenv("TREX_HUB_CONNECT_TIMEOUT", "0.1")
    server.faults.throttle, server.faults.chunk = 0.15, 200_000  # each chunk after 0.15 s
    server.faults.stall_after, server.faults.stall_seconds = 100_000, 1.0
    server.faults.stall_times = 3
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, timeout=0.5, retries=5,
                    **FAST)
    assert path.read_bytes() == BLOB
    ranges = [g[2] for g in server.gets("blob.bin")]
    assert len(ranges) == 4 and ranges[0] is None and all(r for r in ranges[1:]), ranges


@pytest.mark.parametrize("fault", ["refused", "502"])
def test_a_failing_mirror_setting_is_not_told_to_use_a_mirror(server, cache, monkeypatch,
                                                              fault):
    url = f"http://127.0.0.1:{closed_port()}/" if fault == "refused" else server.url
    server.faults.statuses = [502] * 5
    monkeypatch.setenv("TREX_HUB_BASE_URL", url)
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", cache_dir=cache, retries=1, **FAST)
    msg = str(err.value)
    assert "use a mirror" not in msg and f"the mirror in TREX_HUB_BASE_URL ('{url}')" in msg, msg
    assert ("TREX_HUB_OFFLINE=1" in msg) == (fault == "refused")


class Restarting:
    """A loopback server that answers the first request with ``first`` (a partial body or an
    error status) and goes away: connections to its port are refused for ``down`` seconds (for
    ever with ``None``), then it serves ``data`` again on the same port, with ``Range``."""

    def __init__(self, data: bytes, first: bytes, down: Optional[float]):
        self.data, self.first, self.down, self.ranges = data, first, down, []
        self.lst = self._listen(0)
        self.url = f"http://127.0.0.1:{self.lst.getsockname()[1]}/"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", port))
        lst.listen(8)
        lst.settimeout(0.05)
        return lst

    def _head(self, conn: socket.socket) -> str:
        head = read_head(conn)
        self.ranges.append(next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                                 if line.lower().startswith("range:")), None))
        return head

    def _accept(self) -> Optional[socket.socket]:
        while not self.stop.is_set():
            try:
                return self.lst.accept()[0]
            except OSError:
                continue
        return None

    def _run(self) -> None:
        conn = self._accept()
        if conn is None:
            return
        port = self.lst.getsockname()[1]
        with conn:
            self._head(conn)
            self.lst.close()  # from now on: connection refused
            conn.sendall(self.first)
        if self.down is None or self.stop.wait(self.down):
            return
        self.lst = self._listen(port)
        while True:
            conn = self._accept()
            if conn is None:
                return
            with conn:
                rng = self._head(conn)
                start = int(rng.split("bytes=")[1].split("-")[0]) if "bytes=" in rng else 0
                body = self.data[start:]
                status = (f"206 Partial Content\r\nContent-Range: bytes {start}-"
                          f"{len(self.data) - 1}/{len(self.data)}" if start else "200 OK")
                conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
                             "Connection: close\r\n\r\n".encode() + body)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.lst.close()


DATA = BLOB[:200_000]
PARTIAL = (b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\nConnection: close\r\n\r\n"
           + DATA[:50_000])
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("first", [PARTIAL, UNAVAILABLE], ids=["50000-bytes", "503"])
def test_a_server_that_answered_and_restarts_gets_every_retry(tmp_path, first):
    """Review I #4: a server that answered this download (bytes, or an HTTP error) and then
    refuses connections for a while (a restarting mirror, an overloaded proxy or CDN node) is
    retried with the back-off of TREX_HUB_RETRIES, not given up on after one retry."""
    srv = Restarting(DATA, first, down=1.2)
    try:
        t0 = time.monotonic()
        digest, size = hub_http.download(f"{srv.url}f.bin", tmp_path / "f.bin.incomplete",
                                         retries=5, backoff=0.25, progress=False)
    finally:
        srv.close()
    assert size == 200_000 and (tmp_path / "f.bin.incomplete").read_bytes() == DATA
    assert srv.ranges[-1] == ("bytes=50000-" if first is PARTIAL else None), srv.ranges
    assert time.monotonic() - t0 < 8


def test_a_server_that_answered_then_went_away_is_not_called_offline(tmp_path, caplog):
    """Once the server answered, its later refusals use every retry, and the final message
    says it answered before: not "this machine cannot reach it ... TREX_HUB_OFFLINE=1"."""
    srv = Restarting(DATA, PARTIAL, down=None)
    try:
        with caplog.at_level(logging.WARNING, logger=hub_http.__name__), \
                pytest.raises(dl.DownloadError) as err:
            hub_http.download(f"{srv.url}f.bin", tmp_path / "f.bin.incomplete", retries=3,
                              backoff=0.01, progress=False)
    finally:
        srv.close()
    msg = str(err.value)
    assert "giving up after 4 attempts" in msg and "ConnectionRefusedError" in msg, msg
    assert "answered earlier in this download" in msg and "run again later" in msg
    assert "offline" not in msg.lower() and "cannot reach" not in msg, msg
    assert "50000 bytes are kept" in msg and "\n" not in msg
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 3


# --------------------------------------------------------------------------------------------
# 2. Proxies
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("var", ["ALL_PROXY", "all_proxy"])
def test_all_proxy_is_honoured(server, cache, monkeypatch, var):
    """As curl and huggingface_hub (the other downloader in the same process) do."""
    monkeypatch.setenv(var, server.url)
    path = dl.fetch("blob.bin", base_url="http://weights.invalid/", cache_dir=cache, **FAST)
    assert path.read_bytes() == BLOB
    assert server.log[0][1] == "http://weights.invalid/blob.bin"  # absolute form: proxied


def test_no_proxy_still_bypasses_all_proxy(server, cache, monkeypatch):
    monkeypatch.setenv("ALL_PROXY", server.url)
    monkeypatch.setenv("NO_PROXY", "example.org,.invalid")
    with pytest.raises(dl.DownloadError, match="cannot resolve weights.invalid"):
        dl.fetch("blob.bin", base_url="http://weights.invalid/", cache_dir=cache, **FAST)
    assert server.log == []


def test_a_socks_all_proxy_is_said_to_be_unused(cache, monkeypatch):
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url="http://weights.invalid/", cache_dir=cache, **FAST)
    assert "ALL_PROXY='socks5://127.0.0.1:1080' was not used" in str(err.value)


@pytest.mark.parametrize("value", ["socks5h://alice:S3cretPW@127.0.0.1:1080",
                                   "socks5://alice:S3c/ret@PW@127.0.0.1:1080/",
                                   "http://alice:S3cretPW@127.0.0.1:notaport"])
def test_an_unused_proxy_is_shown_without_its_credentials(cache, monkeypatch, value):
    """Review I #5: the note on a proxy this client does not use shows the variable and
    scheme://host:port only, never the user and password in its URL."""
    monkeypatch.setenv("all_proxy", value)
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url="http://weights.invalid/", cache_dir=cache, **FAST)
    msg = str(err.value)
    assert "all_proxy='" in msg and "127.0.0.1:" in msg and "was not used" in msg, msg
    assert "S3c" not in msg and "alice" not in msg and "PW" not in msg, msg


def test_a_proxy_with_credentials_is_never_shown_with_them(monkeypatch):
    from trex_hub.hub import connect

    monkeypatch.setenv("https_proxy", "http://alice:S3cretPW@127.0.0.1:3128")
    proxy = connect.proxy_for("https://weights.invalid/f.bin")
    assert proxy is not None and proxy.has_credentials
    for text in (str(proxy), repr(proxy), f"{proxy!r}"):
        assert "127.0.0.1:3128" in text and "S3cretPW" not in text and "alice" not in text


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_proxy_asking_for_credentials_fails_at_once(proxy407, cache, monkeypatch, scheme):
    """https: the CONNECT tunnel fails with 407; http: the proxy answers the GET with 407.
    Either way one request, and the fix names the proxy, its variable and the credentials."""
    var = f"{scheme}_proxy"
    monkeypatch.setenv(var, f"http://{proxy407.hostport}")
    monkeypatch.setenv("TREX_HUB_RETRIES", "5")
    with pytest.raises(hub_http.ProxyError) as err:
        dl.fetch("blob.bin", base_url=f"{scheme}://weights.invalid/", cache_dir=cache,
                 **FAST)
    msg = str(err.value)
    assert len(proxy407.heads) == 1, proxy407.heads
    first = proxy407.heads[0].split("\r\n")[0]
    assert first == ("CONNECT weights.invalid:443 HTTP/1.0" if scheme == "https"
                     else "GET http://weights.invalid/blob.bin HTTP/1.1")
    assert f"the proxy {proxy407.hostport} (from {var}) asks for credentials" in msg, msg
    assert f"{var}=http://USER:PASSWORD@{proxy407.hostport}" in msg and "\n" not in msg
    assert isinstance(err.value, dl.DownloadError)  # what the CLIs map to one line


def test_rejected_proxy_credentials_are_not_shown(proxy407, cache, monkeypatch):
    monkeypatch.setenv("https_proxy", f"http://alice:s3cret@{proxy407.hostport}")
    with pytest.raises(hub_http.ProxyError) as err:
        dl.fetch("blob.bin", base_url="https://weights.invalid/", cache_dir=cache, **FAST)
    msg = str(err.value)
    assert "rejects the credentials in https_proxy" in msg and "s3cret" not in msg
    assert "Proxy-Authorization: Basic " in proxy407.heads[0]  # they were sent


def test_a_proxy_refusing_the_host_is_permanent(cache, monkeypatch):
    stub = ProxyStub(403, "Forbidden")
    try:
        monkeypatch.setenv("https_proxy", f"http://{stub.hostport}")
        with pytest.raises(hub_http.ProxyError, match="refused to connect to weights.invalid"):
            dl.fetch("blob.bin", base_url="https://weights.invalid/", cache_dir=cache,
                     retries=5, **FAST)
        assert len(stub.heads) == 1
    finally:
        stub.close()


def test_a_proxy_that_is_down_is_named(cache, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url="http://weights.invalid/", cache_dir=cache, retries=5,
                 **FAST)
    msg = str(err.value)
    assert "giving up after 2 attempts" in msg
    assert f"cannot connect to the proxy 127.0.0.1:{port} (from http_proxy)" in msg, msg
    assert "TREX_HUB_OFFLINE=1" in msg


def test_a_proxy_that_does_not_resolve_is_named_not_the_target(cache, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:3128")
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url="http://weights.invalid/", cache_dir=cache, **FAST)
    msg = str(err.value)
    assert "cannot resolve proxy.invalid, the host of the proxy proxy.invalid:3128 (from " \
           "http_proxy)" in msg, msg
    assert "cannot resolve weights.invalid" not in msg


# --------------------------------------------------------------------------------------------
# 3. No home directory
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_home(monkeypatch):
    """HOME unset and a UID without passwd entry (docker run --user 12345, OpenShift)."""
    for var in ("HOME", "TREX_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)

    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown)


@pytest.mark.parametrize("argv", [["trex_star"], ["--list", "--offline"]])
def test_no_home_directory_is_one_line_naming_trex_hub_cache(no_home, capsys, argv):
    from trex_hub.cli import download as dl_cli

    assert dl_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "TREX_HUB_CACHE" in err and "no home directory" in err, err
    assert "unexpected" not in err and len(err.strip().splitlines()) == 1


def test_no_home_directory_in_the_api(no_home, monkeypatch):
    with pytest.raises(dl.DownloadError, match=r"HOME is unset and UID \d+ has no passwd entry\): "
                                               "set TREX_HUB_CACHE"):
        dl.get_cache_dir()
    monkeypatch.setenv("TREX_HUB_CACHE", "~/models")
    with pytest.raises(dl.DownloadError, match="TREX_HUB_CACHE='~/models' starts with ~"):
        dl.get_cache_dir()
    monkeypatch.setenv("TREX_HUB_CACHE", "/srv/models")
    assert dl.get_cache_dir() == Path("/srv/models")


# --------------------------------------------------------------------------------------------
# 5. Full disk
# --------------------------------------------------------------------------------------------
FSIZE_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
from trex_hub.hub import download as dl
try:
    dl.fetch("blob.bin", base_url=sys.argv[1], cache_dir=sys.argv[2], backoff=0.01,
             progress=False)
except dl.DownloadError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


def test_a_file_size_limit_is_one_error_and_the_partial_resumes(server, cache, tmp_path):
    """``ulimit -f`` (EFBIG; Python ignores SIGXFSZ), as a full disk (ENOSPC) behaves: the
    message names the partial and the fix, and the bytes fetched are kept for the rerun."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    run = subprocess.run([sys.executable, "-c", FSIZE_CHILD, server.url, str(cache)],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    partial = cache / "blob.bin.incomplete"
    assert run.returncode == 3, run.stderr[-2000:]
    msg = run.stdout.strip()
    # worded as extraction and training word it (fileio.room_words): the disk has room here
    assert msg.startswith(f"DiskFullError cannot write {partial}: no room for it (about "), msg
    assert "TREX_HUB_CACHE" in msg and "run again to resume from the 200000 bytes kept" in msg
    assert "ulimit -f" in msg and "KiB needed, " in msg and " free on the disk" in msg
    assert partial.stat().st_size == 200_000
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert path.read_bytes() == BLOB
    assert [g[2] for g in server.gets("blob.bin")][-1] == "bytes=200000-"


def test_no_space_left_names_what_is_needed_and_free(server, cache, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, block):
            if self.n + len(block) > 300_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.n += len(block)
            return self.fh.write(block)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def opening(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return Full(fh) if str(file).endswith(".incomplete") else fh

    monkeypatch.setattr(hub_http, "open", opening, raising=False)
    server.faults.chunk = 100_000
    with pytest.raises(hub_http.DiskFullError) as err:
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    msg = str(err.value)
    partial = cache / "blob.bin.incomplete"
    assert f"cannot write {partial}: " in msg and "KiB needed, " in msg, msg
    assert " free" in msg and "TREX_HUB_CACHE" in msg and "\n" not in msg
    assert partial.is_file()  # kept: the rerun resumes


def test_one_byte_formatter_and_one_no_room_errno_list():
    """Review I #6: downloads word sizes and "no room" with fileio's helpers, as extraction and
    training do."""
    from trex_hub import fileio
    from trex_hub.hub import advice

    assert not hasattr(advice, "human") and not hasattr(advice, "NO_SPACE")
    assert [fileio.size_words(n) for n in (512, 1536, 3 << 40)] == ["512 B", "1.5 KiB",
                                                                     "3.0 TiB"]
    assert fileio.no_room(OSError(errno.EFBIG, "File too large"))
    assert not fileio.no_room(OSError(errno.EACCES, "Permission denied"))


# --------------------------------------------------------------------------------------------
# 10. Another user's cached file without read access
# --------------------------------------------------------------------------------------------
def test_an_unreadable_cached_file_is_one_error_naming_it(server, cache, monkeypatch):
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    real = os.open

    def denied(file, flags, *args, **kwargs):  # as for a 0600 file of another user
        if os.fspath(file) == str(path) and not flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    for full in (False, True):  # every load, and trex-download --verify
        with pytest.raises(dl.DownloadError) as err:
            if full:
                dl.check_cached(path, full=True)
            else:
                dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
        msg = str(err.value)
        assert msg.startswith(f"the cached {path} cannot be read (Permission denied; owner "), msg
        assert "chmod g+r" in msg and "TREX_HUB_CACHE" in msg and "\n" not in msg
    assert path.is_file() and len(server.requests) == 1  # neither deleted nor downloaded again


def as_nobody(fn) -> str:
    """``fn()`` in a forked child running as uid/gid 65534 (no extra groups): what it raised, as
    ``"<type> <message>"``, or ``"ok"``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                fn()
                out = "ok"
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                out = f"{type(exc).__name__} {exc}"
            os.write(write, out.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to become another user (as non-root, chmod 000 works)")
def test_another_users_0600_cached_file_for_real(server):
    """The same with real permissions: the file is root's, mode 0600, read by uid 65534."""
    with tempfile.TemporaryDirectory(prefix="trex-h10-") as shared:
        os.chmod(shared, 0o755)
        cache = Path(shared) / "cache"
        path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
        os.chmod(cache, 0o755)
        os.chmod(path, 0o600)
        out = as_nobody(lambda: dl.fetch("blob.bin", base_url=server.url, cache_dir=cache,
                                         **FAST))
    assert out.startswith(f"CacheReadError the cached {path} cannot be read (Permission "
                          "denied; owner root (uid 0), mode 0600): ask its owner"), out
    assert len(server.requests) == 1


# --------------------------------------------------------------------------------------------
# 12. Commands to paste, waiting for another process
# --------------------------------------------------------------------------------------------
def test_printed_commands_are_shell_quoted(server, tmp_path):
    odd = tmp_path / "my cache" / "ünï 😀 $HOME"
    cmd = dl.download_command("trexstar.pth", odd / "trexstar.pth")
    assert shlex.split(cmd) == ["trex-download", "trex_star", "--cache-dir", str(odd)]
    with pytest.raises(dl.OfflineError) as err:
        dl.fetch("blob.bin", base_url=server.url + "a b/", cache_dir=odd, offline=True, **FAST)
    msg = str(err.value)
    curl = msg[msg.index("`") + 1:msg.rindex("`")]
    assert shlex.split(curl) == ["curl", "-fL", "-o", str(odd / "blob.bin"),
                                 server.url + "a b/blob.bin"], curl
    with pytest.raises(dl.OfflineError) as err:
        dl.fetch("trexstar.pth", base_url=server.url, cache_dir=odd, offline=True, **FAST)
    msg = str(err.value)
    assert shlex.split(msg[msg.index("`") + 1:msg.rindex("`")])[-1] == str(odd)


def test_a_process_waiting_for_another_download_says_so_once(server, cache, caplog):
    import filelock

    lock = dl.lock_path(cache / "blob.bin")
    lock.parent.mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="trex_hub"), filelock.FileLock(str(lock)):
        path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, lock_timeout=0.5,
                        **FAST)
    assert path.read_bytes() == BLOB
    waits = [r.getMessage() for r in caplog.records if "waiting for another process" in
             r.getMessage()]
    assert waits == [f"trex_hub: waiting for another process downloading blob.bin (lock {lock}; "
                     "up to 0.5 s, TREX_HUB_LOCK_TIMEOUT)"], caplog.text


def test_no_waiting_line_when_the_lock_is_free(server, cache, caplog):
    with caplog.at_level(logging.INFO, logger="trex_hub"):
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert "waiting for another process" not in caplog.text
