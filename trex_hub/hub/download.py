"""HTTP downloads into the trex_hub cache.

Cache location: ``cache_dir=`` argument, else ``$TREX_HUB_CACHE``, else
``$XDG_CACHE_HOME/trex_hub``, else ``~/.cache/trex_hub``. Base URL: ``base_url=`` argument,
else ``$TREX_HUB_BASE_URL``, else the official one. ``$TREX_HUB_OFFLINE=1`` (or
``$HF_HUB_OFFLINE=1``) never touches the network.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Union

from ..registry import OFFICIAL_BASE_URL

PathLike = Union[str, "os.PathLike[str]"]
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched; the message names the URL and what to do."""


class OfflineError(DownloadError):
    """Offline mode is on and the file is not in the cache."""


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    return _truthy(os.environ.get("TREX_HUB_OFFLINE")) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def get_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("TREX_HUB_CACHE"):
        return Path(os.environ["TREX_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "trex_hub"


def get_base_url(base_url: Optional[str] = None) -> str:
    url = base_url or os.environ.get("TREX_HUB_BASE_URL") or OFFICIAL_BASE_URL
    return url if url.endswith("/") else url + "/"


def file_url(filename: str, base_url: Optional[str] = None) -> str:
    return get_base_url(base_url) + filename


def sha256_of(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download_url(url: str, dest: PathLike, *, sha256: Optional[str] = None,
                 progress: bool = True, timeout: float = 60.0) -> Path:
    """Stream ``url`` to ``dest`` through a temporary file; rename only once complete and verified."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".incomplete")
    req = urllib.request.Request(url, headers={"User-Agent": "trex_hub"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = resp.headers.get("Content-Length")
            h = hashlib.sha256()
            got = 0
            for block in iter(lambda: resp.read(CHUNK), b""):
                out.write(block)
                h.update(block)
                got += len(block)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and got != int(total):
            raise DownloadError(f"{url}: received {got} of {total} bytes")
        if sha256 and h.hexdigest() != sha256:
            raise DownloadError(f"{url}: SHA-256 {h.hexdigest()} does not match the expected "
                                f"{sha256}")
        os.replace(tmp, dest)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}. Check the file name and "
                            "TREX_HUB_BASE_URL (the mirror setting).") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: {exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def fetch(filename: str, *, base_url: Optional[str] = None, cache_dir: Optional[PathLike] = None,
          sha256: Optional[str] = None, progress: bool = True,
          offline: Optional[bool] = None) -> Path:
    """The cached path of ``filename``, downloading it from the base URL first if needed."""
    path = get_cache_dir(cache_dir) / filename
    if path.is_file():
        return path
    if is_offline() if offline is None else offline:
        raise OfflineError(
            f"offline mode is on and '{filename}' is not cached (expected at {path}). "
            f"Fetch it on a connected machine with `trex-download` and copy it there, or unset "
            "TREX_HUB_OFFLINE.")
    return download_url(file_url(filename, base_url), path, sha256=sha256, progress=progress)
