"""Whether a checkpoint's tensors fit a model's by dtype, before ``load_state_dict`` casts them.

``load_state_dict`` copies any dtype into any tensor: integer or bool data (a quantised or
corrupted file) would become float weights silently, so it is refused by name. Floating point of
another width (fp16, bf16) is cast as usual. BatchNorm's ``num_batches_tracked`` counters, which
``{k: v.half() for k, v in sd.items()}`` turns into floats, are cast back to their integer type
when they hold whole numbers; one that overflowed float16 (infinite) restarts at 0, as an absent
counter does (evaluation never reads it).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

COUNTER = "num_batches_tracked"


def dtype_kind(t: torch.Tensor) -> str:
    return "bool" if t.dtype == torch.bool else "complex" if t.is_complex() else \
        "floating" if t.is_floating_point() else "integer"


def _counter(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float counter as ``like``'s integer type; ``ValueError`` when it is not a count."""
    v = value.detach().to("cpu", torch.float64)
    if bool(torch.isnan(v).any()) or not bool(torch.equal(v[torch.isfinite(v)],
                                                          v[torch.isfinite(v)].round())):
        raise ValueError("not a whole number")
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v)).to(like.dtype)


def fit_dtypes(expected: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor]
               ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``state`` with float counters cast to their integer type, and the tensors of the wrong
    kind, each as ``"key dtype (expected a ... type)"``."""
    out, problems = dict(state), []
    for k, v in expected.items():
        if k not in state or dtype_kind(state[k]) == dtype_kind(v):
            continue
        if k.endswith(COUNTER) and dtype_kind(v) == "integer" \
                and dtype_kind(state[k]) == "floating" and state[k].shape == v.shape:
            try:
                out[k] = _counter(state[k], v)
                continue
            except ValueError:
                pass
        kind = dtype_kind(v)
        problems.append(f"{k} {str(state[k].dtype).replace('torch.', '')} (expected "
                        f"{'an' if kind == 'integer' else 'a'} {kind} type)")
    return out, problems
