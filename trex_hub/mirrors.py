"""Where the released files come from: the official server, ``$TREX_HUB_BASE_URL``, or a mirror
set per model, and what to tell an offline user about a missing file.

The registry-aware layer above ``hub/``: the cache and the transport below it know URLs and file
names only.
"""
from __future__ import annotations

import os
import shlex
import urllib.parse
from pathlib import Path
from typing import Dict, Optional

from . import registry
from .hub.http import DownloadError

# Per-model mirrors set through the API (model name -> base URL); see set_mirror().
_MODEL_MIRRORS: Dict[str, str] = {}


def set_mirror(model: str, base_url: Optional[str]) -> None:
    """Download one model's files from ``base_url`` (``None`` removes the override).

    Precedence: ``base_url=`` argument > this per-model mirror > ``$TREX_HUB_BASE_URL`` > official.
    """
    name = registry.get_entry(model).name
    if base_url:
        _MODEL_MIRRORS[name] = check_base_url(base_url, f"set_mirror({model!r}, ...)")
    else:
        _MODEL_MIRRORS.pop(name, None)


def get_mirror(model: Optional[str]) -> Optional[str]:
    return _MODEL_MIRRORS.get(model) if model else None


def check_base_url(url: str, source: str) -> str:
    """``url`` if it can be a base URL (http or https with a host, or file), else a
    :class:`DownloadError` naming ``source`` (the setting it came from) and the form expected:
    checked once, before any request, instead of retried as a network fault."""
    problem = None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https", "file"):
            problem = ("no scheme" if not parts.scheme else f"the scheme '{parts.scheme}' is not "
                       "http, https or file")
        elif parts.scheme != "file" and not parts.hostname:
            problem = "no host"
    if problem is not None:
        raise DownloadError(f"{source} {url!r} is not a base URL ({problem}); use the form "
                            "http://host[:port]/path/ (or https://, file:///path/)"[:400])
    return url


def get_base_url(base_url: Optional[str] = None, model: Optional[str] = None) -> str:
    """The base URL of ``model``'s files: ``base_url`` > its mirror (:func:`set_mirror`) >
    ``$TREX_HUB_BASE_URL`` > the official server; checked by :func:`check_base_url`."""
    env, mirror = os.environ.get("TREX_HUB_BASE_URL"), get_mirror(model)
    if base_url:
        url = check_base_url(base_url, "the base URL (--base-url / base_url=)")
    elif mirror:  # checked by set_mirror
        url = mirror
    elif env:
        url = check_base_url(env, "TREX_HUB_BASE_URL")
    else:
        url = registry.OFFICIAL_BASE_URL
    return url if url.endswith("/") else url + "/"


def file_url(filename: str, base_url: Optional[str] = None, model: Optional[str] = None) -> str:
    return get_base_url(base_url, model) + urllib.parse.quote(filename)


def owner_of(filename: str) -> Optional[registry.ModelEntry]:
    """The registry entry that releases ``filename``, if any."""
    return next((e for e in registry.MODELS.values()
                 if any(f.filename == filename for f in e.files())), None)


def download_command(filename: str, path: Path) -> Optional[str]:
    """The ``trex-download`` command that puts ``filename`` at ``path`` (for offline errors), or
    ``None`` for a file no registry model releases; shell-quoted, to be pasted as printed."""
    entry = owner_of(filename)
    if entry is None:
        return None
    full = " --full" if entry.full_file and entry.full_file.filename == filename else ""
    folder = shlex.quote(str(path.parent))
    return f"trex-download {shlex.quote(entry.name)}{full} --cache-dir {folder}"
