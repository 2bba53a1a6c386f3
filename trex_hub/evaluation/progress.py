"""Progress bars with an ETA for ``trex-eval run`` (tqdm, on stderr), or nothing."""
from __future__ import annotations

import sys
from typing import Any, Optional


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Optional[Any]:
    """A tqdm bar on stderr when ``enabled`` (and tqdm is importable), else None."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of trex_hub
        return None
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr, leave=False)


def wants_progress(requested: bool, stream: Any = None) -> bool:
    """Bars only when asked for and stderr (or ``stream``) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(requested and callable(isatty) and isatty())
