"""OCM (online class means) memory bank and the EMA update.

The memory is a FIFO of ``size`` raw (not normalised) projector outputs of the EMA network with
their labels and a write pointer. Its buffers are named ``features``, ``labels`` and ``ptr`` so
that a training module holding it as ``memory`` saves ``memory.{features,labels,ptr}``, the
released layout.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn


class MemoryBank(nn.Module):
    """FIFO memory of ``size`` x ``dim`` features with int64 labels.

    Initialised with ``randn`` features and labels drawn uniformly from ``range(num_classes)``
    (from the global torch RNG, or ``generator``).
    """

    def __init__(self, size: int, dim: int, num_classes: int,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if size <= 0:
            raise ValueError("memory size must be > 0 (0 means: no memory, plain classifier)")
        self.num_classes = int(num_classes)
        self.register_buffer("features", torch.randn(size, dim, generator=generator))
        self.register_buffer("labels", torch.randint(0, num_classes, (size,), generator=generator,
                                                     dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self._ptr_host: Optional[int] = None  # mirror of ``ptr``: updates never read the device

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._ptr_host = None  # the pointer may have changed: read it once at the next update
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def prototypes(self) -> torch.Tensor:
        """``[num_classes, dim]`` L2-normalised per-class sums of the current entries (zero row
        for a class without entry): :func:`trex_hub.model.prototypes_from_memory` without its
        label range check, which reads the device every step (the memory only ever holds
        training labels, checked when the data was loaded)."""
        sums = torch.zeros(self.num_classes, self.features.shape[1], dtype=torch.float32,
                           device=self.features.device)
        sums.index_add_(0, self.labels, self.features.float())
        return F.normalize(sums, dim=-1)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write a batch at the pointer. A batch that does not fit before the end of the buffer is
        truncated; the pointer wraps to 0 when it reaches the end."""
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
        if self._ptr_host is None:
            self._ptr_host = int(self.ptr[0])
        start = self._ptr_host
        n = min(features.shape[0], self.size - start)
        self.features[start:start + n] = features[:n].to(self.features.dtype)
        self.labels[start:start + n] = labels[:n].to(self.labels.dtype)
        end = start + n
        self._ptr_host = 0 if end >= self.size else end
        self.ptr.fill_(self._ptr_host)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.features.shape[1]}, num_classes={self.num_classes}"


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """``p_ema = momentum * p_ema + (1 - momentum) * p`` for every parameter (buffers untouched).

    Two multi-tensor calls (one kernel launch per chunk of parameters on CUDA); the arithmetic
    per element is the one of ``mul_`` then ``add_(alpha=)``."""
    ema_params: List[torch.Tensor] = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise ValueError("EMA and online networks differ")
    params = [p if p.dtype == pe.dtype else p.to(pe.dtype) for pe, p in zip(ema_params, params)]
    torch._foreach_mul_(ema_params, momentum)
    torch._foreach_add_(ema_params, params, alpha=1.0 - momentum)


__all__ = ["MemoryBank", "ema_update"]
