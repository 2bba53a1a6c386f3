"""The names of the original ``trex_hub.hub.download`` module, kept for existing code.

The implementation lives in :mod:`trex_hub.hub.http` (transport), :mod:`trex_hub.hub.cache`
(cache, manifest, lock, check hook) and :mod:`trex_hub.mirrors` (per-model mirrors and base URL).
:func:`fetch` here takes a file name and finds its URL as ``trex_hub.load`` does
(``base_url=`` > :func:`set_mirror` > ``$TREX_HUB_BASE_URL`` > the official server).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Optional

from ..mirrors import download_command, file_url, get_base_url, get_mirror, set_mirror
from . import cache
from .cache import (MANIFEST_SUFFIX, CheckResult, OfflineError, cached_path,
                    check_cached, file_lock, get_cache_dir, is_offline, lock_path, manifest_path,
                    partial_path, read_manifest, remove_cached, write_manifest)
from .http import (DownloadError, IntegrityError, NotFoundError, _progress_bar, sha256_of,
                   user_agent)
from .partials import PARTIAL_SUFFIX


def fetch(filename: str, *, base_url: Optional[str] = None, model: Optional[str] = None,
          **kwargs: Any) -> Path:
    """:func:`trex_hub.hub.cache.fetch` of ``filename`` from its mirror (see the module doc)."""
    return cache.fetch(filename, partial(file_url, filename, base_url, model),
                       offline_command=partial(download_command, filename), **kwargs)


def fetch_distributed(filename: str, **kwargs: Any) -> Path:
    """:func:`fetch` where, under ``torch.distributed``, local rank 0 downloads first."""
    return cache.local_rank_zero_first(fetch, filename, **kwargs)


__all__ = ["DownloadError", "IntegrityError", "NotFoundError", "OfflineError", "CheckResult",
           "MANIFEST_SUFFIX", "PARTIAL_SUFFIX", "fetch", "fetch_distributed", "cached_path",
           "check_cached", "file_lock", "get_cache_dir", "is_offline", "lock_path",
           "manifest_path", "partial_path", "read_manifest", "remove_cached", "write_manifest",
           "sha256_of", "user_agent", "set_mirror", "get_mirror", "get_base_url", "file_url",
           "_progress_bar"]
