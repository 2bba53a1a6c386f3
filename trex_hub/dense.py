"""Dense features: a ResNet backbone's stage outputs as a list (``load(..., features_only=True)``),
with timm's ``feature_info``, for detection and segmentation heads (torchvision's
``BackboneWithFPN``), and the frozen BatchNorm / frozen early stages that torchvision's detection
backbones use when fine-tuned."""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .preprocess import PreprocessConfig


class FeatureInfo:
    """Channels, stride and module of each feature level, with timm's ``FeatureInfo`` API:
    ``channels()``, ``reduction()``, ``module_name()`` give the values at ``out_indices``
    (or at the level(s) ``idx``); ``info[i]`` / ``len()`` cover every level."""

    def __init__(self, info: List[Dict[str, Any]], out_indices: Sequence[int]):
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: Any = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Any = None) -> Any:
        pick = (lambda d: dict(d)) if keys is None else (lambda d: {k: d[k] for k in keys})
        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx: Any = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: Any = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: Any = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: int) -> Dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)


_STAGES = ("layer1", "layer2", "layer3", "layer4")
_LEVELS = len(_STAGES) + 1  # the stem, then layer1..4


def _levels(out_indices: Union[int, Sequence[int]]) -> List[int]:
    """Sorted levels from ``out_indices``: levels (negative ones count from the last), or, as in
    timm, an int ``n`` for the last ``n`` levels. Anything else (a float, a bool, a level out of
    range, nothing) raises ``ValueError``."""
    fix = (f"out_indices={out_indices!r}: pick levels from 0 (stem, stride 2) to 4 (layer4, "
           "stride 32), e.g. (1, 2, 3, 4), or an int n for the last n levels, as in timm")
    if isinstance(out_indices, bool):
        raise ValueError(fix)
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= _LEVELS:
            raise ValueError(fix)
        return list(range(_LEVELS - out_indices, _LEVELS))
    try:
        raw = list(out_indices)
        if any(isinstance(i, bool) for i in raw):
            raise TypeError
        idx = sorted({i + _LEVELS if i < 0 else i for i in map(operator.index, raw)})
    except TypeError:  # not a sequence, or a float / string level
        raise ValueError(fix) from None
    if not idx or idx[0] < 0 or idx[-1] >= _LEVELS:
        raise ValueError(fix)
    return idx


_TRAIN_ORDER = ["layer4", "layer3", "layer2", "layer1", "conv1"]  # torchvision's


def check_options(out_indices: Union[int, Sequence[int]],
                  trainable_layers: Optional[int] = None) -> None:
    """``ValueError`` naming the fix for options :class:`FeatureMaps` and
    :meth:`FeatureMaps.freeze` would refuse (``load`` asks before downloading anything)."""
    _levels(out_indices)
    n = trainable_layers
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)
                          or not 0 <= n <= len(_TRAIN_ORDER)):
        raise ValueError(f"trainable_layers={n!r}: pick 0 (all frozen) to 5 (all trainable), "
                         "counted from layer4 down to conv1, as in torchvision's detection "
                         "backbones (its default is 3)")


class FeatureMaps(nn.Module):
    """A ResNet backbone that returns its stage outputs as a list, like timm's
    ``features_only=True``: level 0 is the stem (stride 2), levels 1-4 are ``layer1..4``
    (strides 4/8/16/32; 256/512/1024/2048 channels for ResNet-50).

    Its children are the backbone's own modules under torchvision's names (``conv1``, ``bn1``,
    ``relu``, ``maxpool``, ``layer1``...), shared with the model it was built from, so
    ``state_dict()`` has torchvision's (= timm's) keys and torchvision's ``BackboneWithFPN``
    can wrap it. Layers after the last requested level are not run.
    """

    def __init__(self, model: nn.Module, out_indices: Union[int, Sequence[int]] = (1, 2, 3, 4)):
        super().__init__()
        net = getattr(model, "backbone", model)
        missing = [n for n in ("conv1", "bn1", "relu", "maxpool", *_STAGES) if not hasattr(net, n)]
        if missing:
            raise ValueError(f"features_only needs a ResNet backbone; {type(net).__name__} has "
                             f"no {', '.join(missing)}")
        idx = _levels(out_indices)
        for name in ("conv1", "bn1", "relu", "maxpool", *_STAGES[:idx[-1]]):
            self.add_module(name, getattr(net, name))
        info = [{"num_chs": net.bn1.num_features, "reduction": 2, "module": "relu"}]
        for k, name in enumerate(_STAGES, 1):
            last = getattr(net, name)[-1]
            bn = getattr(last, "bn3", None) or last.bn2
            info.append({"num_chs": bn.num_features, "reduction": 2 ** (k + 1), "module": name})
        self.feature_info = FeatureInfo(info, idx)
        self.out_indices = tuple(idx)
        self.arch = getattr(model, "arch", None)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing of the weights (``trex_hub.get_transform(maps)``), as the model's."""
        return PreprocessConfig.from_dict(
            {k: self.pretrained_cfg[k] for k in ("resize", "crop", "interpolation", "mean",
                                                 "std")})

    def freeze(self, trainable_layers: Optional[int] = None, frozen_bn: bool = True
               ) -> "FeatureMaps":
        """Prepare for fine-tuning as torchvision's detection backbones are (``load(...,
        features_only=True, frozen_bn=True, trainable_layers=3)``): every BatchNorm becomes
        torchvision's ``FrozenBatchNorm2d`` (the pretrained statistics and affine kept, the same
        ``state_dict`` keys but ``num_batches_tracked``), and only the last ``trainable_layers``
        of layer4, layer3, layer2, layer1, conv1 keep ``requires_grad`` (5: all, with bn1; 0:
        none; ``None``: leave them). In place, on the modules shared with the source model."""
        check_options(self.out_indices, trainable_layers)
        if frozen_bn:
            _freeze_batchnorm(self)
        if trainable_layers is not None:
            train = _TRAIN_ORDER[:trainable_layers] + (
                ["bn1"] if trainable_layers == len(_TRAIN_ORDER) else [])
            for name, p in self.named_parameters():
                p.requires_grad_(name.split(".")[0] in train)
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        outs = [x] if 0 in self.out_indices else []
        x = self.maxpool(x)
        for k, name in enumerate(_STAGES[:self.out_indices[-1]], 1):
            x = getattr(self, name)(x)
            if k in self.out_indices:
                outs.append(x)
        return outs


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every ``BatchNorm2d`` below ``module`` by a ``FrozenBatchNorm2d`` of its values."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    value = getattr(child, key)
                    if value is not None:
                        getattr(frozen, key).copy_(value.detach())
            setattr(module, name, frozen.to(child.running_mean.device))
        else:
            _freeze_batchnorm(child)


__all__ = ["FeatureMaps", "FeatureInfo", "check_options"]
