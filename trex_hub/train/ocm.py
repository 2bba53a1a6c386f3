"""OCM (online class means) memory bank and the EMA update.

The memory is a FIFO of ``size`` raw (not normalised) projector outputs of the EMA network with
their labels and a write pointer. Its buffers are named ``features``, ``labels`` and ``ptr`` so
that a training module holding it as ``memory`` saves ``memory.{features,labels,ptr}``, the
released layout.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model import prototypes_from_memory


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

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def prototypes(self) -> torch.Tensor:
        """``[num_classes, dim]`` L2-normalised per-class sums of the current entries."""
        return prototypes_from_memory(self.features, self.labels, self.num_classes)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write a batch at the pointer. A batch that does not fit before the end of the buffer is
        truncated; the pointer wraps to 0 when it reaches the end."""
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
        start = int(self.ptr[0])
        n = min(features.shape[0], self.size - start)
        self.features[start:start + n] = features[:n].to(self.features.dtype)
        self.labels[start:start + n] = labels[:n].to(self.labels.dtype)
        end = start + n
        self.ptr[0] = 0 if end >= self.size else end

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.features.shape[1]}, num_classes={self.num_classes}"


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """``p_ema = momentum * p_ema + (1 - momentum) * p`` for every parameter (buffers untouched)."""
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError("EMA and online networks differ")
    for pe, p in zip(ema_params, params):
        pe.mul_(momentum).add_(p.detach().to(pe.dtype), alpha=1.0 - momentum)


__all__ = ["MemoryBank", "ema_update"]
