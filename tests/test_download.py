"""Downloads under faults, all against servers on 127.0.0.1 started by the tests.

Byte-level behaviour (resume, retries, integrity, locks) uses small random blobs; loading
behaviour uses files in the released layouts (``released_files``, tests/factories.py). Tests that
need several processes start them from one forkserver that has imported torch once, so each extra
process costs a fork, not an import.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import trex_hub
from http_server import FileServer
from trex_hub import registry
from trex_hub.checkpoint import CheckpointError
from trex_hub.hub import download as dl

FAST = dict(backoff=0.01, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    rng = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (600_000,), generator=rng, dtype=torch.uint8).numpy().tobytes()
    (root / "blob.bin").write_bytes(data)
    (root / "big.bin").write_bytes(data * 4)  # 2.4 MB, for throttled downloads
    return root


@pytest.fixture
def server(blobs):
    with FileServer(blobs) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def served(blobs, name="blob.bin") -> bytes:
    return (blobs / name).read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path):
    """Files other than final files and manifests (partials, temp files)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and (p.name.endswith(dl.PARTIAL_SUFFIX) or p.name.startswith(".")))


# --------------------------------------------------------------------------------------------
# Plain downloads, cache and manifest
# --------------------------------------------------------------------------------------------
def test_download_records_a_manifest_and_is_served_from_the_cache(server, blobs, cache):
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert path == cache / "blob.bin" and path.read_bytes() == served(blobs)
    man = json.loads((cache / "blob.bin.manifest.json").read_text())
    assert man["sha256"] == sha(served(blobs)) and man["size"] == len(served(blobs))
    assert man["url"] == server.url + "blob.bin" and man["source"] == "download"
    assert dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST) == path
    assert len(server.gets("blob.bin")) == 1
    assert leftovers(cache) == []
    ua = server.headers[0]["User-Agent"]
    assert ua.startswith(f"trex_hub/{trex_hub.__version__}")


def test_a_dropped_connection_resumes_with_range(server, blobs, cache):
    server.faults.drop_after = 200_000
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    gets = server.gets("blob.bin")
    assert [g[3] for g in gets] == [200, 206]
    assert gets[1][2] == "bytes=200000-"
    assert path.read_bytes() == served(blobs)
    assert dl.read_manifest(path)["sha256"] == sha(served(blobs))  # verified as a whole


def test_a_server_ignoring_range_gets_a_full_download(blobs, cache):
    with FileServer(blobs, honour_range=False) as srv:
        srv.faults.drop_after = 200_000
        path = dl.fetch("blob.bin", base_url=srv.url, cache_dir=cache, **FAST)
        gets = srv.gets("blob.bin")
    assert [g[3] for g in gets] == [200, 200] and gets[1][2] == "bytes=200000-"
    assert path.read_bytes() == served(blobs)


def test_a_truncated_body_under_a_full_content_length_is_resumed(server, blobs, cache):
    server.faults.truncate_after = 123_457
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert [g[2] for g in server.gets("blob.bin")] == [None, "bytes=123457-"]
    assert path.read_bytes() == served(blobs)


def test_503_twice_then_success_backs_off_and_retries(server, blobs, cache):
    server.faults.statuses = [503, 503]
    t0 = time.monotonic()
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, backoff=0.1,
                    progress=False)
    assert [g[3] for g in server.gets("blob.bin")] == [503, 503, 200]
    assert time.monotonic() - t0 >= 0.1 * 0.75 + 0.2 * 0.75  # exponential back-off
    assert path.read_bytes() == served(blobs)


def test_retry_after_is_honoured(server, blobs, cache):
    server.faults.statuses = [429]
    server.faults.retry_after = "0.4"
    t0 = time.monotonic()
    dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert time.monotonic() - t0 >= 0.4
    assert [g[3] for g in server.gets("blob.bin")] == [429, 200]


def test_a_host_that_does_not_resolve_fails_fast_and_says_offline(cache, monkeypatch):
    """No DNS answer (a machine without network): one retry, not five back-offs, then a message
    naming the host and the offline way out. The resolver is the one thing replaced here: a
    real failed lookup would need an outside DNS server (and the host is a reserved .invalid
    name, so nothing could leave this machine even without the replacement)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    asked = []
    real = socket.getaddrinfo

    def no_dns(host, *args, **kw):
        if host == "weights.invalid":
            asked.append(host)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url="http://weights.invalid/", cache_dir=cache, backoff=0.5,
                 progress=False, retries=5)
    assert time.monotonic() - t0 < 5 and len(asked) == 2
    msg = str(err.value)
    assert "giving up after 2 attempts" in msg and "cannot resolve weights.invalid" in msg
    assert "offline" in msg and "TREX_HUB_OFFLINE=1" in msg
    assert leftovers(cache) == []


def test_a_complete_partial_is_verified_and_renamed_without_downloading_again(server, blobs,
                                                                               cache):
    cache.mkdir()
    (cache / "blob.bin.incomplete").write_bytes(served(blobs))  # killed just before the rename
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert [g[3] for g in server.gets("blob.bin")] == [416]
    assert path.read_bytes() == served(blobs) and leftovers(cache) == []


def test_ctrl_c_keeps_a_resumable_partial(server, blobs, cache, monkeypatch):
    import http.client

    real, calls = http.client.HTTPResponse.read1, []

    def interrupted(self, n=-1):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, min(n, 50_000) if len(calls) < 3 else n)

    monkeypatch.setattr(http.client.HTTPResponse, "read1", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    partial = cache / "blob.bin.incomplete"
    kept = partial.stat().st_size
    assert 0 < kept <= 100_000 and not (cache / "blob.bin").exists()
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert [g[2] for g in server.gets("blob.bin")] == [None, f"bytes={kept}-"]
    assert path.read_bytes() == served(blobs)


def test_persistent_5xx_gives_up_with_a_clear_error(server, cache):
    server.faults.statuses = [502] * 10
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, retries=2, **FAST)
    msg = str(err.value)
    assert "giving up after 3 attempts" in msg and "HTTP 502" in msg
    assert "TREX_HUB_BASE_URL" in msg and "\n" not in msg
    assert len(server.gets("blob.bin")) == 3
    assert not (cache / "blob.bin").exists()


def test_404_fails_at_once_naming_the_url_and_the_mirror_setting(server, cache, monkeypatch):
    monkeypatch.setenv("TREX_HUB_BASE_URL", server.url)
    with pytest.raises(dl.NotFoundError) as err:
        dl.fetch("missing.pth", cache_dir=cache, **FAST)
    msg = str(err.value)
    assert server.url + "missing.pth" in msg and "HTTP 404" in msg
    assert f"TREX_HUB_BASE_URL (now '{server.url}')" in msg
    assert len(server.requests) == 1  # no retry
    assert not cache.exists() or leftovers(cache) == []


def test_a_stalled_server_times_out_and_resumes(server, blobs, cache):
    server.faults.stall_after = 50_000
    server.faults.stall_seconds = 3.0
    t0 = time.monotonic()
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, timeout=0.4, **FAST)
    assert time.monotonic() - t0 < 2.5
    assert [g[2] for g in server.gets("blob.bin")] == [None, "bytes=50000-"]
    assert path.read_bytes() == served(blobs)


# --------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------
def test_wrong_bytes_fail_the_published_hash_and_are_not_kept(server, blobs, cache):
    server.faults.corrupt = True
    with pytest.raises(dl.IntegrityError) as err:
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache,
                 sha256=sha(served(blobs)), **FAST)
    assert sha(served(blobs)) in str(err.value) and "deleted" in str(err.value)
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == []


def test_a_resumed_download_with_a_stale_partial_is_redone_from_scratch(server, blobs, cache):
    cache.mkdir()
    (cache / "blob.bin.incomplete").write_bytes(b"x" * 1000)  # not a prefix of the real file
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache,
                    sha256=sha(served(blobs)), **FAST)
    assert path.read_bytes() == served(blobs)
    assert [g[2] for g in server.gets("blob.bin")] == ["bytes=1000-", None]


def test_trust_on_first_use_catches_a_mirror_that_changed_its_bytes(server, blobs, cache):
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    path.unlink()  # e.g. the user cleaned the file but not the manifest
    server.faults.corrupt = True
    with pytest.raises(dl.IntegrityError) as err:
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    msg = str(err.value)
    assert "Trust on first use" in msg and "blob.bin.manifest.json" in msg
    assert not path.exists() and leftovers(cache) == []
    server.faults.corrupt = False
    assert dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST).read_bytes() \
        == served(blobs)


def test_a_registry_size_that_the_server_contradicts_is_refused(server, blobs, cache):
    with pytest.raises(dl.IntegrityError, match="announces 600000 bytes but 5 are expected"):
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, size=5, **FAST)
    assert not (cache / "blob.bin").exists()


def test_every_cached_load_checks_the_size_and_replaces_a_bad_file(server, blobs, cache,
                                                                   caplog):
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    with open(path, "ab") as fh:
        fh.write(b"junk")
    with caplog.at_level("WARNING", logger="trex_hub"):
        again = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    notes = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]  # one line, no source location
    assert re.search("corrupt .*size 600004 bytes, the manifest recorded 600000.*deleted",
                     notes[0])
    assert again.read_bytes() == served(blobs) and len(server.gets("blob.bin")) == 2


def test_a_file_placed_by_hand_is_hashed_once_and_adopted(blobs, cache):
    cache.mkdir()
    shutil.copy(blobs / "blob.bin", cache / "blob.bin")
    path = dl.fetch("blob.bin", base_url="http://127.0.0.1:9/", cache_dir=cache, **FAST)
    man = dl.read_manifest(path)
    assert man["source"] == "adopted" and man["sha256"] == sha(served(blobs))


def test_full_check_rehashes(server, blobs, cache):
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert dl.check_cached(path, full=True).ok
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    assert dl.check_cached(path).ok  # the cheap check only sees sizes
    res = dl.check_cached(path, full=True)
    assert not res.ok and "manifest recorded" in res.reason


# --------------------------------------------------------------------------------------------
# Offline, mirrors, proxies, progress
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("var", ["TREX_HUB_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_never_touches_the_network(server, cache, monkeypatch, var):
    monkeypatch.setenv("TREX_HUB_BASE_URL", server.url)
    monkeypatch.setenv(var, "1")
    with pytest.raises(dl.OfflineError) as err:
        dl.fetch("trexstar.pth", cache_dir=cache, **FAST)
    msg = str(err.value)
    assert f"expected at {cache / 'trexstar.pth'}" in msg
    assert f"`trex-download trex_star --cache-dir {cache}`" in msg and "\n" not in msg
    monkeypatch.delenv(var)
    dl.fetch("blob.bin", cache_dir=cache, **FAST)
    n = len(server.requests)
    monkeypatch.setenv(var, "1")
    assert dl.fetch("blob.bin", cache_dir=cache, **FAST).is_file()  # warm cache: fine
    assert len(server.requests) == n


def test_load_offline_with_cold_and_warm_cache(released_files, monkeypatch):
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        monkeypatch.setenv("TREX_HUB_OFFLINE", "1")
        with pytest.raises(dl.OfflineError, match="trex-download trex_star_repro --full"):
            trex_hub.load("trex_star_repro", projector=True, progress=False)
        monkeypatch.delenv("TREX_HUB_OFFLINE")
        trex_hub.load("trex_star", progress=False)
        n = len(srv.requests)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert trex_hub.load("trex_star").arch == "resnet50"
        assert len(srv.requests) == n


def test_per_model_mirror_and_argument_precedence(released_files, tmp_path, monkeypatch):
    monkeypatch.setenv("TREX_HUB_BASE_URL", "http://127.0.0.1:9/dead/")
    with FileServer(released_files) as a, FileServer(released_files) as b:
        dl.set_mirror("t-ReX*", a.url)
        try:
            trex_hub.load("trex_star", progress=False)
            assert len(a.gets("trexstar.pth")) == 1
            trex_hub.load("trex_star", progress=False, base_url=b.url,
                          cache_dir=tmp_path / "other")
            assert len(b.gets("trexstar.pth")) == 1 and len(a.gets("trexstar.pth")) == 1
        finally:
            dl.set_mirror("trex_star", None)
    assert dl.get_base_url(model="trex_star") == "http://127.0.0.1:9/dead/"


def test_the_readme_mirror_line_works_after_a_bare_import(released_files, tmp_path):
    """README: ``import trex_hub`` then ``trex_hub.hub.download.set_mirror(...)``, as written
    (in a fresh interpreter: nothing else has imported ``trex_hub.hub.download`` yet)."""
    code = ("import sys, trex_hub\n"
            "trex_hub.hub.download.set_mirror('trex_star', sys.argv[1])\n"
            "m = trex_hub.load('trex_star', progress=False)\n"
            "print(type(m).__name__, sorted(n for n in dir(trex_hub.hub) if n == 'hf'))\n")
    env = dict(os.environ, TREX_HUB_CACHE=str(tmp_path), TREX_HUB_BASE_URL="http://127.0.0.1:9/",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with FileServer(released_files) as srv:
        done = subprocess.run([sys.executable, "-c", code, srv.url], env=env, text=True,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert len(srv.gets("trexstar.pth")) == 1
    assert done.stdout.split() == ["TReX", "['hf']"]
    names: dict = {}
    exec("from trex_hub.hub import *", names)  # the modules, not the package's helpers
    assert sorted(n for n in names if not n.startswith("__")) == \
        ["cache", "download", "hf", "http", "partials"]


def test_proxies_come_from_the_environment(server, blobs, cache, monkeypatch):
    for var in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", server.url)  # our loopback server acts as the proxy
    monkeypatch.setenv("HTTP_PROXY", server.url)
    path = dl.fetch("blob.bin", base_url="http://trex-mirror.invalid/", cache_dir=cache, **FAST)
    assert path.read_bytes() == served(blobs)
    assert server.log[0][1] == "http://trex-mirror.invalid/blob.bin"  # absolute-form = proxied
    # loopback addresses never go through a proxy
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9/")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9/")
    assert dl.fetch("big.bin", base_url=server.url, cache_dir=cache, **FAST).is_file()


def test_progress_bar_only_on_a_tty_and_when_asked(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert dl._progress_bar(True, 10, 0, "x") is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert dl._progress_bar(False, 10, 0, "x") is None
    bar = dl._progress_bar(True, 10, 4, "x")
    assert bar is not None and bar.n == 4 and bar.total == 10
    bar.close()


def test_without_tqdm_a_terminal_download_runs_without_a_bar(server, blobs, cache,
                                                              monkeypatch):
    """hubconf.py declares torch and torchvision only, and neither depends on tqdm."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert dl._progress_bar(True, 10, 0, "x") is None
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, backoff=0.01)
    assert path.read_bytes() == served(blobs)


@pytest.mark.parametrize("url, problem", [
    ("127.0.0.1:8000/mirror/", "no scheme"), ("mirror/", "no scheme"),
    ("htp://127.0.0.1/x/", "the scheme 'htp' is not http, https or file"),
    ("http://127.0.0.1:notaport/", "Port could not be cast"), ("http://[::1/", "Invalid IPv6"),
    ("http:///path/", "no host")])
def test_a_malformed_base_url_is_refused_before_any_request(server, cache, monkeypatch, url,
                                                            problem):
    """Checked once, naming the setting it came from, instead of six attempts blamed on the
    network (32 s)."""
    t0 = time.perf_counter()
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url=url, cache_dir=cache, **FAST)
    msg = str(err.value)
    assert msg.startswith(f"the base URL (--base-url / base_url=) {url!r} is not a base URL")
    assert problem in msg and "http://host[:port]/path/" in msg
    monkeypatch.setenv("TREX_HUB_BASE_URL", url)
    with pytest.raises(dl.DownloadError, match=f"^TREX_HUB_BASE_URL {re.escape(repr(url))} "):
        trex_hub.fetch("trex_star", cache_dir=cache, progress=False)
    with pytest.raises(dl.DownloadError, match=re.escape("set_mirror('trex_star', ...) ")):
        dl.set_mirror("trex_star", url)
    assert dl.get_mirror("trex_star") is None
    assert time.perf_counter() - t0 < 5 and server.requests == []
    assert not cache.exists() or leftovers(cache) == []


@pytest.mark.parametrize("var, value, takes", [
    ("TREX_HUB_TIMEOUT", "-1", "a number > 0"), ("TREX_HUB_TIMEOUT", "0", "a number > 0"),
    ("TREX_HUB_TIMEOUT", "nan", "a number > 0"), ("TREX_HUB_TIMEOUT", "abc", "a number > 0"),
    ("TREX_HUB_TIMEOUT", "inf", "a number > 0"), ("TREX_HUB_RETRIES", "abc", "a whole number"),
    ("TREX_HUB_RETRIES", "2.5", "a whole number >= 0"), ("TREX_HUB_RETRIES", "-1", "whole"),
    ("TREX_HUB_BACKOFF", "-0.5", "a number >= 0"), ("TREX_HUB_LOCK_TIMEOUT", "-1", ">= 0")])
def test_a_bad_download_setting_is_named_not_ignored(server, cache, monkeypatch, var, value,
                                                     takes):
    monkeypatch.setenv(var, value)
    with pytest.raises(dl.DownloadError) as err:
        dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{var}={value!r} is not valid: it takes ") and takes in msg, msg
    assert "fix or unset it" in msg and server.requests == []


@pytest.mark.parametrize("var, value", [("TREX_HUB_TIMEOUT", " "), ("TREX_HUB_RETRIES", "0"),
                                        ("TREX_HUB_LOCK_TIMEOUT", "inf")])
def test_good_download_settings_still_work(server, blobs, cache, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    assert dl.fetch("blob.bin", base_url=server.url, cache_dir=cache,
                    **FAST).read_bytes() == served(blobs)


def test_an_empty_cache_dir_is_refused_not_the_working_directory(server, tmp_path, monkeypatch,
                                                                 capsys):
    from trex_hub.cli import download as dl_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="the cache folder given is empty"):
        dl.fetch("blob.bin", base_url=server.url, cache_dir="", **FAST)
    assert dl_cli.main(["trex_star", "--cache-dir", ""]) == 2
    assert "argument --cache-dir: must not be empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and server.requests == []


def test_a_malformed_base_url_keeps_no_cached_file_from_loading(released_files, tmp_path,
                                                                 monkeypatch):
    """The base URL is made, and checked, only when a file must be downloaded: a wrong setting
    (one a shell profile left, say) does not stop an offline machine loading what it holds."""
    cache_dir = tmp_path / "cache"
    with FileServer(released_files) as srv:
        trex_hub.fetch("trex_star", cache_dir=cache_dir, base_url=srv.url, progress=False)
    monkeypatch.setenv("TREX_HUB_BASE_URL", "mirror.local/trex/")
    for offline in ("0", "1"):
        monkeypatch.setenv("TREX_HUB_OFFLINE", offline)
        assert trex_hub.load("trex_star", cache_dir=cache_dir).arch == "resnet50"
    monkeypatch.setenv("TREX_HUB_OFFLINE", "1")  # not cached, offline: the offline error
    with pytest.raises(dl.OfflineError, match="offline mode is on and 'trex.pth' is not cached"):
        trex_hub.fetch("trex", cache_dir=cache_dir)
    monkeypatch.setenv("TREX_HUB_OFFLINE", "0")  # not cached, online: the setting is named
    with pytest.raises(dl.DownloadError, match="^TREX_HUB_BASE_URL 'mirror.local/trex/' is not"):
        trex_hub.fetch("trex", cache_dir=cache_dir)


def test_a_404_names_the_setting_that_chose_the_server(server, cache, monkeypatch):
    monkeypatch.setenv("TREX_HUB_BASE_URL", "http://127.0.0.1:9/elsewhere/")
    with pytest.raises(dl.NotFoundError) as err:  # base_url= wins over the variable
        dl.fetch("missing.pth", base_url=server.url, cache_dir=cache, **FAST)
    msg = str(err.value)
    assert "--base-url / base_url= or set_mirror() where given" in msg
    assert "(now '" not in msg and "official server" not in msg
    monkeypatch.delenv("TREX_HUB_BASE_URL")
    with pytest.raises(dl.NotFoundError, match=r"\(unset: the official server\)"):
        dl.fetch("missing.pth", base_url=server.url, cache_dir=cache, **FAST)


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------
def test_threads_share_one_download(blobs, cache):
    with FileServer(blobs) as srv:
        srv.faults.throttle = 0.01
        results, errors = [], []

        def worker():
            try:
                results.append(dl.fetch("big.bin", base_url=srv.url, cache_dir=cache, **FAST))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors and len(results) == 4 and len(srv.gets("big.bin")) == 1
    assert results[0].read_bytes() == served(blobs, "big.bin")


def test_lock_timeout_falls_back_to_a_private_download(server, blobs, cache):
    import filelock

    held = filelock.FileLock(str(dl.lock_path(cache / "blob.bin")))
    dl.lock_path(cache / "blob.bin").parent.mkdir(parents=True)
    with held:
        path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, lock_timeout=0.2,
                        **FAST)
    assert path.read_bytes() == served(blobs) and leftovers(cache) == []


def test_no_lock_support_still_gives_a_correct_file(server, blobs, cache, monkeypatch):
    import filelock

    def broken(*a, **k):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(filelock, "FileLock", broken)
    server.faults.truncate_after = 1000  # a private temp file is retried from the start
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert path.read_bytes() == served(blobs) and leftovers(cache) == []


def test_private_partials_of_killed_processes_are_swept(server, blobs, cache, monkeypatch):
    """Without a lock each process downloads into a partial of its own; one killed mid-download
    (a pre-empted job) left it behind for ever. The next download removes those whose process
    is gone: on this host by its pid, on another (a shared folder) after a day."""
    import subprocess

    import filelock

    from trex_hub.hub import partials as hc

    def broken(*a, **k):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(filelock, "FileLock", broken)
    cache.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = hc.private_partial_path(cache / "blob.bin").name.split(".")[3]
    names = {  # name -> kept?
        f".blob.bin.{host}.{dead}.0badc0de.incomplete": False,       # here, process gone
        f".blob.bin.{host}.{dead}.0badc0df.incomplete": True,  # gone from here, written just now
        f".blob.bin.{host}.{os.getpid()}.0badc0de.incomplete": True,  # here, still running
        f".blob.bin.other-node.{dead}.0badc0de.incomplete": True,    # elsewhere, recent
        f".blob.bin.other-node.{dead}.00000001.incomplete": False,   # elsewhere, a day old
        f".blob.bin.{dead}.00000002.incomplete": True,               # older naming, recent
        f".blob.bin.{dead}.00000003.incomplete": False,              # older naming, a day old
        f".big.bin.{host}.{dead}.0badc0de.incomplete": True,         # another file's
    }
    for name in names:
        (cache / name).write_bytes(b"x" * 100)
    old = time.time() - hc.PRIVATE_PARTIAL_MAX_AGE - 60
    for name in (n for n in names if n.endswith(("00000001.incomplete", "00000003.incomplete"))):
        os.utime(cache / name, (old, old))
    idle = time.time() - hc.PRIVATE_PARTIAL_IDLE - 60  # (another PID namespace: still alive)
    for name in (n for n in names if ".0badc0de." in n):
        os.utime(cache / name, (idle, idle))
    path = dl.fetch("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert path.read_bytes() == served(blobs)
    left = {p.name for p in cache.iterdir() if p.name.endswith(".incomplete")}
    assert left == {n for n, kept in names.items() if kept}


# --------------------------------------------------------------------------------------------
# load(): files that are not the expected checkpoint are rejected
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fake_mirror(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    root.mkdir()
    with FileServer(root) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        yield root, srv


def test_a_downloaded_non_checkpoint_is_rejected_and_not_kept(fake_mirror, tmp_path):
    root, srv = fake_mirror
    (root / "trex.pth").write_bytes(b"<html>Service temporarily moved</html>")
    with pytest.raises(CheckpointError) as err:
        trex_hub.load("trex", progress=False)
    msg = str(err.value)
    assert "rejected, not kept" in msg and srv.url + "trex.pth" in msg
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir() if p.is_file()) == []


def test_a_checkpoint_of_the_wrong_architecture_or_layout_is_rejected(fake_mirror, tmp_path):
    import factories as fx

    root, srv = fake_mirror
    fx.write_backbone_file(root / "trexstar.pth", arch="resnet18")
    with pytest.raises(CheckpointError, match="holds a resnet18, but 'trex_star' is a resnet50"):
        trex_hub.load("trex_star", progress=False)
    fx.write_full_checkpoint(root / "trexstar_2.pth", num_layers=1, arch="resnet18",
                             memory_size=64, hidden=32, out=16)
    with pytest.raises(CheckpointError, match="rejected"):
        trex_hub.load("trex_star_repro", progress=False)
    assert not any(p.is_file() for p in (tmp_path / "cache").iterdir())


def test_an_unloadable_cached_file_is_deleted_and_downloaded_again(released_files, tmp_path,
                                                                  monkeypatch):
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        trex_hub.load("trex", progress=False)
        cached = tmp_path / "cache" / "trex.pth"
        size = cached.stat().st_size
        cached.write_bytes(b"\0" * size)  # same size: passes the cheap check, cannot be read
        with pytest.raises(CheckpointError, match="has been deleted; run again"):
            trex_hub.load("trex", progress=False)
        assert not cached.exists() and dl.manifest_path(cached).exists()  # manifest kept
        model = trex_hub.load("trex", progress=False)  # verified against the manifest
        assert len(srv.gets("trex.pth")) == 2 and model.arch == "resnet50"
        assert dl.sha256_of(cached) == dl.sha256_of(released_files / "trex.pth")


def test_load_verifies_against_the_first_download(released_files, tmp_path, monkeypatch):
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        trex_hub.load("trex_star", progress=False)
        (tmp_path / "cache" / "trexstar.pth").unlink()
        srv.faults.corrupt = True
        with pytest.raises(dl.IntegrityError, match="Trust on first use"):
            trex_hub.load("trex_star", progress=False)
        assert not (tmp_path / "cache" / "trexstar.pth").exists()


def test_registry_hashes_are_checked_when_published(released_files, monkeypatch):
    entry = registry.MODELS["trex"]
    bad = dataclasses.replace(entry.backbone_file, sha256="0" * 64)
    monkeypatch.setitem(registry.MODELS, "trex", dataclasses.replace(entry, backbone_file=bad))
    with FileServer(released_files) as srv:
        monkeypatch.setenv("TREX_HUB_BASE_URL", srv.url)
        with pytest.raises(dl.IntegrityError, match="0{64} was expected"):
            trex_hub.load("trex", progress=False)


# --------------------------------------------------------------------------------------------
# Several processes (forked from one forkserver that imported torch once)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def procs():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "trex_hub", "filelock"])
    return ctx


def _load_and_digest(name, cache_dir, base_url, barrier, queue):
    torch.set_num_threads(1)
    barrier.wait(60)
    try:
        model = trex_hub.load(name, cache_dir=cache_dir, base_url=base_url, progress=False)
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        queue.put(("ok", h.hexdigest()))
    except Exception as exc:  # pragma: no cover - reported by the test
        queue.put(("error", repr(exc)))


def test_eight_processes_loading_at_once_share_one_download(released_files, procs, tmp_path):
    cache = tmp_path / "shared_cache"
    with FileServer(released_files) as srv:
        srv.faults.chunk = 1 << 20
        srv.faults.throttle = 0.005  # ~0.5 s: everyone asks while the download runs
        barrier, queue = procs.Barrier(8), procs.Queue()
        ps = [procs.Process(target=_load_and_digest,
                            args=("trex", str(cache), srv.url, barrier, queue))
              for _ in range(8)]
        for p in ps:
            p.start()
        results = [queue.get(timeout=120) for _ in ps]
        for p in ps:
            p.join(30)
        assert len(srv.gets("trex.pth")) == 1
    assert all(r[0] == "ok" for r in results), results
    assert len({r[1] for r in results}) == 1
    ref = trex_hub.load(released_files / "trex.pth")
    h = hashlib.sha256()
    for k, v in sorted(ref.state_dict().items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    assert results[0][1] == h.hexdigest()
    assert leftovers(cache) == []


def _load_forever(cache_dir, base_url):
    torch.set_num_threads(1)
    trex_hub.load("trex", cache_dir=cache_dir, base_url=base_url, progress=False)


def test_sigkill_mid_download_then_load_resumes(released_files, procs, tmp_path):
    cache = tmp_path / "cache"
    total = (released_files / "trex.pth").stat().st_size
    partial = cache / "trex.pth.incomplete"
    with FileServer(released_files) as srv:
        srv.faults.chunk = 1 << 20
        srv.faults.throttle = 0.1  # ~10 s in all: plenty of time to catch it mid-way
        p = procs.Process(target=_load_forever, args=(str(cache), srv.url))
        p.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size > total // 4:
                break
            time.sleep(0.02)
        p.kill()  # SIGKILL: no clean-up code runs
        p.join(10)
        assert p.exitcode == -9
        kept = partial.stat().st_size
        assert 0 < kept < total and not (cache / "trex.pth").exists()
        srv.faults.throttle = 0.0
        model = trex_hub.load("trex", base_url=srv.url, progress=False)
        ranges = [g[2] for g in srv.gets("trex.pth")]
    assert ranges[0] is None and ranges[1] is not None
    assert int(ranges[1][len("bytes="):-1]) >= kept - (1 << 20)  # resumed, not restarted
    assert (cache / "trex.pth").read_bytes() == (released_files / "trex.pth").read_bytes()
    assert dl.read_manifest(cache / "trex.pth")["sha256"] == dl.sha256_of(
        released_files / "trex.pth")
    assert model.arch == "resnet50" and not partial.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, port, cache_dir, base_url, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    calls = []
    real = dl.fetch

    def spy(*a, **k):
        calls.append(time.monotonic())
        out = real(*a, **k)
        calls.append(time.monotonic())
        return out

    dl.fetch = spy
    try:
        path = dl.fetch_distributed("big.bin", cache_dir=cache_dir, base_url=base_url,
                                    progress=False)
        queue.put((rank, str(path), calls))
    finally:
        dist.destroy_process_group()


def test_ddp_helper_rank0_downloads_others_wait_at_a_barrier(blobs, procs, tmp_path):
    with FileServer(blobs) as srv:
        srv.faults.throttle = 0.01
        queue, port = procs.Queue(), _free_port()
        ps = [procs.Process(target=_ddp_rank, args=(r, port, str(tmp_path / "c"), srv.url, queue))
              for r in range(2)]
        for p in ps:
            p.start()
        out = dict((r, (path, calls)) for r, path, calls in (queue.get(timeout=60)
                                                              for _ in ps))
        for p in ps:
            p.join(30)
        assert len(srv.gets("big.bin")) == 1
    assert out[0][0] == out[1][0]
    rank0_done, rank1_start = out[0][1][1], out[1][1][0]
    assert rank1_start >= rank0_done  # rank 1 only looked after rank 0 had finished


def test_fetch_distributed_without_a_process_group_is_fetch(server, blobs, cache):
    path = dl.fetch_distributed("blob.bin", base_url=server.url, cache_dir=cache, **FAST)
    assert path.read_bytes() == served(blobs)



# --------------------------------------------------------------------------------------------
# The cache's check hook (hub/cache.py), with a plain callable
# --------------------------------------------------------------------------------------------
def test_check_hook_runs_on_fresh_and_cached_files(server, blobs, cache):
    from trex_hub.hub import cache as hc

    url = server.url + "blob.bin"
    seen = []

    def size_of(path):
        seen.append(path)
        return path.stat().st_size

    path, value = hc.fetch_checked("blob.bin", url, cache_dir=cache, check=size_of, **FAST)
    assert value == len(served(blobs)) and seen[0].name.endswith(".incomplete")  # before rename
    path, value = hc.fetch_checked("blob.bin", url, cache_dir=cache, check=size_of, **FAST)
    assert seen[1] == path and value == len(served(blobs)) and len(server.gets("blob.bin")) == 1

    def refuse(path):
        raise ValueError(f"{path}: not what I wanted")

    # a cached file rejected: deleted; its manifest vouches for those bytes, so it goes too
    with pytest.raises(ValueError, match="not what I wanted.*cached file .* has been deleted"):
        hc.fetch("blob.bin", url, cache_dir=cache, check=refuse, **FAST)
    assert not path.exists() and not dl.manifest_path(path).exists()
    # a fresh file rejected: not kept, the temp file name hidden from the message
    with pytest.raises(ValueError) as err:
        hc.fetch("blob.bin", url, cache_dir=cache, check=refuse, **FAST)
    assert str(err.value).startswith("not what I wanted [") and "incomplete" not in str(err.value)
    assert f"downloaded from {url} was rejected, not kept" in str(err.value)
    assert not path.exists() and leftovers(cache) == []


def test_a_cached_file_corrupted_on_disk_keeps_its_manifest_when_rejected(server, blobs, cache):
    from trex_hub.hub import cache as hc

    url = server.url + "blob.bin"
    path = hc.fetch("blob.bin", url, cache_dir=cache, **FAST)
    path.write_bytes(b"\0" * path.stat().st_size)  # same size: passes the cheap check

    def refuse_zeros(p):
        if p.read_bytes()[:4] == b"\0\0\0\0":
            raise ValueError("zeros")

    with pytest.raises(ValueError, match="has been deleted"):
        hc.fetch("blob.bin", url, cache_dir=cache, check=refuse_zeros, **FAST)
    assert not path.exists() and dl.manifest_path(path).exists()  # the reference stays
    assert hc.fetch("blob.bin", url, cache_dir=cache, check=refuse_zeros, **FAST).read_bytes() \
        == served(blobs)
