"""Where the released files come from: the official server, ``$TREX_HUB_BASE_URL``, or a mirror
set per model, and what to tell an offline user about a missing file.

The registry-aware layer above ``hub/``: the cache and the transport below it know URLs and file
names only.
"""
from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Dict, Optional

from . import registry

# Per-model mirrors set through the API (model name -> base URL); see set_mirror().
_MODEL_MIRRORS: Dict[str, str] = {}


def set_mirror(model: str, base_url: Optional[str]) -> None:
    """Download one model's files from ``base_url`` (``None`` removes the override).

    Precedence: ``base_url=`` argument > this per-model mirror > ``$TREX_HUB_BASE_URL`` > official.
    """
    name = registry.get_entry(model).name
    if base_url:
        _MODEL_MIRRORS[name] = base_url
    else:
        _MODEL_MIRRORS.pop(name, None)


def get_mirror(model: Optional[str]) -> Optional[str]:
    return _MODEL_MIRRORS.get(model) if model else None


def get_base_url(base_url: Optional[str] = None, model: Optional[str] = None) -> str:
    url = (base_url or get_mirror(model) or os.environ.get("TREX_HUB_BASE_URL")
           or registry.OFFICIAL_BASE_URL)
    return url if url.endswith("/") else url + "/"


def file_url(filename: str, base_url: Optional[str] = None, model: Optional[str] = None) -> str:
    return get_base_url(base_url, model) + urllib.parse.quote(filename)


def owner_of(filename: str) -> Optional[registry.ModelEntry]:
    """The registry entry that releases ``filename``, if any."""
    return next((e for e in registry.MODELS.values()
                 if any(f.filename == filename for f in e.files())), None)


def download_command(filename: str, path: Path) -> Optional[str]:
    """The ``trex-download`` command that puts ``filename`` at ``path`` (for offline errors), or
    ``None`` for a file no registry model releases."""
    entry = owner_of(filename)
    if entry is None:
        return None
    full = " --full" if entry.full_file and entry.full_file.filename == filename else ""
    return f"trex-download {entry.name}{full} --cache-dir {path.parent}"
