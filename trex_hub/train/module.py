"""The training module: online network, EMA copy, OCM memory or learnable classifier.

Its ``state_dict()`` keys, prefixed with ``module.`` (what DistributedDataParallel adds), are the
released full-checkpoint layout::

    model.encoder.*          torchvision ResNet keys (no fc)
    model.head.layers.*      the projector (layers.0 = L2 norm, 1..L blocks, L+1 bottleneck)
    model_ema.*              the same tree for the EMA copy
    memory.{features,labels,ptr}   OCM memory            | clf.fc.weight  plain classifier

The backbone and the projector are built by :mod:`trex_hub.model`.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..model import BACKBONE_DIMS, build_backbone, build_head, cosine_logits
from .ocm import MemoryBank, ema_update

Gather = Callable[[torch.Tensor], torch.Tensor]


class Net(nn.Module):
    """Backbone (``encoder``) + optional projector (``head``) over a list of multi-crop batches."""

    def __init__(self, arch: str, projector: Optional[Dict[str, Any]]):
        super().__init__()
        self.encoder = build_backbone(arch)
        self.num_features = BACKBONE_DIMS[arch]
        self.head, self.out_dim = build_head(self.num_features, projector)

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone once per run of same-resolution crops, projector once over all of them.

        ``crops[k]`` is the batch of the k-th crop of every image; the output rows are crop-major
        (all images' crop 0, then all images' crop 1, ...).
        """
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats: List[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.encoder(torch.cat(list(crops[start:end]), dim=0)))
            start = end
        return self.head(torch.cat(feats, dim=0))


class CosineClassifier(nn.Module):
    """Learnable cosine classifier ``l2(z) @ l2(W).T / tau`` (``fc.weight`` [C, dim], no bias)."""

    def __init__(self, dim: int, num_classes: int, tau: float):
        super().__init__()
        self.tau = float(tau)
        self.fc = nn.Linear(dim, num_classes, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return cosine_logits(z.float(), self.fc.weight.float(), self.tau)


class LinearClassifier(nn.Module):
    """Plain linear classifier with bias (the supervised baseline)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z).float()


class TrainModule(nn.Module):
    """Online network + EMA copy + OCM memory (``memory_size > 0``) or classifier ``clf``.

    ``forward(crops, labels)`` returns ``(loss, logits, targets)``: cross-entropy over all crops
    with the labels repeated, equal weights. With OCM, the prototypes are computed from the memory
    first; then the EMA network's outputs on the global crops, gathered across processes by
    ``gather`` (rank order), are written into the memory.
    """

    def __init__(self, arch: str = "resnet50", projector: Optional[Dict[str, Any]] = None,
                 num_classes: int = 1000, tau: float = 0.1, memory_size: int = 8192,
                 classifier: str = "cosine", n_global: int = 1):
        super().__init__()
        self.num_classes, self.tau, self.n_global = int(num_classes), float(tau), int(n_global)
        self.model = Net(arch, projector)
        self.model_ema = copy.deepcopy(self.model)
        for p in self.model_ema.parameters():
            p.requires_grad_(False)
        dim = self.model.out_dim
        if memory_size > 0:
            if projector is None:
                raise ValueError("the OCM memory stores projector outputs: it needs a projector")
            self.memory: Optional[MemoryBank] = MemoryBank(memory_size, dim, num_classes)
            self.clf: Optional[nn.Module] = None
        else:
            self.memory = None
            if classifier == "cosine":
                self.clf = CosineClassifier(dim, num_classes, tau)
            elif classifier == "linear":
                self.clf = LinearClassifier(dim, num_classes)
            else:
                raise ValueError(f"unknown classifier '{classifier}' (cosine or linear)")

    def logits(self, z: torch.Tensor, prototypes: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.memory is not None:
            protos = self.memory.prototypes() if prototypes is None else prototypes
            return cosine_logits(z.float(), protos, self.tau)
        assert self.clf is not None
        return self.clf(z)

    def forward(self, crops: Sequence[torch.Tensor], labels: torch.Tensor,
                gather: Optional[Gather] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.model(crops)
        targets = labels.repeat(len(crops))
        protos = None
        if self.memory is not None:
            protos = self.memory.prototypes()  # before this step's update
            with torch.no_grad():
                z_ema = self.model_ema(list(crops[:self.n_global])).float()
                lab = labels.repeat(self.n_global)
                if gather is not None:
                    z_ema, lab = gather(z_ema), gather(lab)
                self.memory.update(z_ema, lab)
        logits = self.logits(z, protos)
        loss = F.cross_entropy(logits, targets)
        return loss, logits.detach(), targets

    def update_ema(self, momentum: float) -> None:
        ema_update(self.model_ema, self.model, momentum)

    def trainable_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters()
                if p.requires_grad and not n.startswith("model_ema.")]


def param_groups(module: TrainModule, weight_decay: float,
                 exclude_1d: bool = True) -> List[Dict[str, Any]]:
    """Two SGD groups: ``weight_decay`` on parameters with ndim > 1, 0 on biases and all 1-D
    parameters (BatchNorm). ``exclude_1d=False`` decays everything."""
    decay, no_decay = [], []
    for _, p in module.trainable_parameters():
        (decay if (p.ndim > 1 or not exclude_1d) else no_decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["Net", "CosineClassifier", "LinearClassifier", "TrainModule", "param_groups"]
