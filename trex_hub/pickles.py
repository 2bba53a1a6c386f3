"""What a pickle file asks for, found without running it; the allow-list of the safe load.

``torch.load(weights_only=True)`` refuses any global outside its allow-list, but it stops at the
first opcode it does not know (protocol 4's FRAME, say) before reaching any global, so its error
cannot tell a malicious pickle from a corrupt file. :func:`pickle_globals` reads the opcodes with
``pickletools`` (nothing is executed) to tell them apart. Used by :mod:`trex_hub.checkpoint`.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, List, Optional


def _numpy_globals() -> List[Any]:
    """The numpy objects that pickle an ndarray, under both numpy 1.x and 2.x names."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    allowed: List[Any] = [np.ndarray, np.dtype,
                          (reconstruct, "numpy.core.multiarray._reconstruct"),
                          (reconstruct, "numpy._core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "Float64DType"):
        allowed.append(dtypes.Float64DType)
    return allowed


def safe_globals() -> List[Any]:
    """The complete allow-list used for ``torch.load(weights_only=True)``."""
    return [argparse.Namespace, *_numpy_globals()]


def refused_globals(msg: str) -> List[str]:
    """The globals the weights-only unpickler refused, as its message names them."""
    return re.findall(r"GLOBAL ([\w.]+)", msg) or re.findall(r"global ([\w.]+)", msg)


def pickle_globals(path: str) -> Optional[List[str]]:
    """The globals a (legacy, non-zip) pickle file names, read with ``pickletools`` (nothing
    is executed), or ``None`` when the bytes are not a complete pickle. The weights-only
    unpickler stops at the first opcode it does not know (protocol 4's FRAME), before any
    global, so a malicious pickle would otherwise look like a corrupt file."""
    import pickletools

    found: List[str] = []
    strings: List[str] = []
    try:
        with open(path, "rb") as fh:
            for _ in range(4):  # the legacy format: magic, protocol, sys info, the object
                if not fh.peek(1)[:1]:
                    break
                for op, arg, _pos in pickletools.genops(fh):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle"
        return None
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = set(_get_allowed_globals()) | {
        f"{g[0].__module__}.{g[0].__qualname__}" if isinstance(g, tuple) else
        f"{g.__module__}.{g.__qualname__}" for g in safe_globals()}
    allowed |= {g[1] for g in safe_globals() if isinstance(g, tuple)}
    return sorted({n for n in found if n not in allowed}) if found else None
