"""Generate checkpoints in the exact released layouts (TREX_SPEC.md section 3), for tests.

Written independently of ``trex_hub.checkpoint`` on purpose: the tests must catch a reader that
drifts from the real layouts.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional

import numpy as np
import torch
import torchvision
from torch import nn


def torchvision_backbone(arch: str = "resnet50", seed: int = 0) -> nn.Module:
    """A torchvision ResNet with random (but non-trivial) weights and BN statistics, fc=Identity."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                # non-default statistics and affine parameters, so eval mode is really tested
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.num_batches_tracked.fill_(1234)
    return net.eval()


def backbone_state_dict(arch: str = "resnet50", seed: int = 0) -> Dict[str, torch.Tensor]:
    return torchvision_backbone(arch, seed).state_dict()


def write_backbone_file(path, arch: str = "resnet50", seed: int = 0) -> Dict[str, torch.Tensor]:
    """A released backbone-only file (``trex.pth`` layout): torchvision keys minus ``fc.*``."""
    sd = backbone_state_dict(arch, seed)
    assert not any(k.startswith("fc.") for k in sd)
    torch.save(sd, path)
    return sd


def head_state_dict(num_layers: int, in_dim: int = 2048, hidden: int = 2048, out: int = 256,
                    seed: int = 0) -> Dict[str, torch.Tensor]:
    """Released head keys (``layers.0`` is the parameter-free L2 norm)."""
    g = torch.Generator().manual_seed(seed + 7)
    sd: Dict[str, torch.Tensor] = {}
    dim = in_dim
    for i in range(1, num_layers + 1):
        sd[f"layers.{i}.fc.weight"] = torch.randn(hidden, dim, generator=g) * 0.02
        sd[f"layers.{i}.fc.bias"] = torch.randn(hidden, generator=g) * 0.01
        sd[f"layers.{i}.bn.weight"] = torch.rand(hidden, generator=g) * 0.5 + 0.75
        sd[f"layers.{i}.bn.bias"] = torch.randn(hidden, generator=g) * 0.1
        sd[f"layers.{i}.bn.running_mean"] = torch.randn(hidden, generator=g) * 0.01
        sd[f"layers.{i}.bn.running_var"] = torch.rand(hidden, generator=g) * 0.01 + 0.005
        sd[f"layers.{i}.bn.num_batches_tracked"] = torch.tensor(500)
        dim = hidden
    sd[f"layers.{num_layers + 1}.weight"] = torch.randn(out, dim, generator=g) * 0.02
    return sd


def write_full_checkpoint(path, num_layers: int, arch: str = "resnet50", seed: int = 0,
                          num_classes: int = 1000, memory_size: int = 8192, ocm: bool = True,
                          hidden: int = 2048, out: int = 256, labels: Optional[torch.Tensor] = None,
                          optimizer_state: bool = True) -> dict:
    """A released full training checkpoint ``{"model", "optimizer", "epoch", "args",
    "fp16_scaler"}`` with the DDP-wrapped key layout, EMA copy and OCM memory (or plain ``clf``)."""
    in_dim = 512 if arch in ("resnet18", "resnet34") else 2048
    model: Dict[str, torch.Tensor] = {}
    for branch, s in (("model", seed), ("model_ema", seed + 100)):
        for k, v in backbone_state_dict(arch, s).items():
            model[f"module.{branch}.encoder.{k}"] = v
        for k, v in head_state_dict(num_layers, in_dim, hidden, out, s).items():
            model[f"module.{branch}.head.{k}"] = v
    g = torch.Generator().manual_seed(seed + 3)
    if ocm:
        model["module.memory.features"] = torch.randn(memory_size, out, generator=g)
        if labels is None:
            labels = torch.randint(0, num_classes, (memory_size,), generator=g)
        model["module.memory.labels"] = labels.long()
        model["module.memory.ptr"] = torch.tensor([17], dtype=torch.long)
    else:
        model["module.clf.fc.weight"] = torch.randn(num_classes, out, generator=g)
    params = [k for k, v in model.items() if v.is_floating_point() and "running" not in k
              and not k.startswith("module.model_ema") and not k.startswith("module.memory")]
    optimizer = {
        "state": ({i: {"momentum_buffer": torch.zeros_like(model[k])}
                   for i, k in enumerate(params[:4])} if optimizer_state else {}),
        "param_groups": [
            {"lr": 0.0, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False,
             "maximize": False, "foreach": None, "differentiable": False, "fused": None,
             "params": list(range(0, len(params), 2))},
            {"lr": 0.0, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0, "nesterov": False,
             "maximize": False, "foreach": None, "differentiable": False, "fused": None,
             "params": list(range(1, len(params), 2))},
        ],
    }
    args = argparse.Namespace(
        arch=arch, epochs=100, batch_size=64, lr=0.1, wd=1e-4, tau=0.1, memory_size=memory_size,
        lr_schedule=np.linspace(0.0, 0.1, 50, dtype=np.float64), output_dir="/checkpoints",
        seed=22)
    ckpt = {"model": model, "optimizer": optimizer, "epoch": 100, "args": args,
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                            "growth_interval": 2000, "_growth_tracker": 12}}
    torch.save(ckpt, path)
    return ckpt


def reference_projector(feats: torch.Tensor, head: Dict[str, torch.Tensor],
                        num_layers: int) -> torch.Tensor:
    """Independent projector forward (eval): l2norm -> [Linear -> BN(eval) -> GELU] x L -> Linear."""
    x = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for i in range(1, num_layers + 1):
        x = x @ head[f"layers.{i}.fc.weight"].t() + head[f"layers.{i}.fc.bias"]
        mean, var = head[f"layers.{i}.bn.running_mean"], head[f"layers.{i}.bn.running_var"]
        x = (x - mean) / torch.sqrt(var + 1e-5) * head[f"layers.{i}.bn.weight"] \
            + head[f"layers.{i}.bn.bias"]
        x = 0.5 * x * (1.0 + torch.erf(x / 2 ** 0.5))
    return x @ head[f"layers.{num_layers + 1}.weight"].t()


def strip(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def file_size(path) -> int:
    return os.path.getsize(path)
