"""The fast inference path: a frozen, BatchNorm-folded, channels_last copy of a model.

:func:`prepare` turns a :class:`~trex_hub.model.TReX` (or any torchvision-style ResNet) into an
:class:`InferenceModel` for one device and precision, and caches it on the model, so calling
``model.extract`` in a loop pays the preparation once. The cache notices when the weights change
(``load_state_dict``, an optimiser step, a BN statistics update: anything that bumps a tensor's
version counter or replaces a tensor) and prepares again.

What the prepared copy does differently from ``model.eval()``:

* BatchNorm folded into the preceding convolution (backbone) or linear layer (projector), so a
  Bottleneck runs three convolutions and no normalisation. Only modules whose forward is known
  to apply the BatchNorm right after that layer are folded: torchvision's own ``ResNet``,
  ``BasicBlock``, ``Bottleneck`` and our ``ProjectorBlock`` (exact classes, not subclasses,
  whose forward may differ); anything else keeps its BatchNorm layers.
* channels_last (NHWC) weights and inputs: oneDNN's fastest convolution layout on CPU and the
  tensor-core layout on CUDA.
* ``torch.inference_mode`` and no parameter gradients.
* On CUDA: ``precision="bf16"`` / ``"fp16"`` autocast; uint8 batches are copied to the device
  from pinned memory without blocking and normalised there (4x less transfer than float).
* Optionally ``torch.compile`` (opt-in: it costs tens of seconds up front).
"""
from __future__ import annotations

import copy
import threading
import weakref
from typing import Any, Dict, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import skip_init

from .preprocess import IMAGENET_MEAN, IMAGENET_STD

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = x * scale + shift`` for an eval-mode BatchNorm, computed in float64."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    inv_std = torch.rsqrt(var + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma * inv_std
    return scale, beta - mean * scale


def _foldable(bn: nn.Module) -> bool:
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """A new convolution equal to ``bn(conv(x))`` for an eval-mode ``bn``."""
    scale, shift = _bn_scale_shift(bn)
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    fused = skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size,
                      conv.stride, conv.padding, conv.dilation, conv.groups, bias=True,
                      padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(w * scale.view(-1, *([1] * (w.ndim - 1))))
        fused.bias.copy_(b * scale + shift)
    return fused


def fold_linear_bn(linear: nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> nn.Linear:
    """A new linear layer equal to ``bn(linear(x))`` for an eval-mode ``bn``."""
    scale, shift = _bn_scale_shift(bn)
    w = linear.weight.detach().double()
    b = linear.bias.detach().double() if linear.bias is not None else torch.zeros_like(scale)
    fused = skip_init(nn.Linear, linear.in_features, linear.out_features, bias=True,
                      device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(w * scale.view(-1, 1))
        fused.bias.copy_(b * scale + shift)
    return fused


def _fold_sequential(seq: nn.Sequential) -> int:
    """Fold every ``Conv2d -> BatchNorm2d`` pair of consecutive entries (ResNet ``downsample``)."""
    names = list(seq._modules)
    done = 0
    for a, b in zip(names, names[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if isinstance(conv, nn.Conv2d) and _foldable(bn) and conv.out_channels == bn.num_features:
            seq._modules[a] = fold_conv_bn(conv, bn)
            seq._modules[b] = nn.Identity()
            done += 1
    return done


def fold_batchnorm(model: nn.Module) -> int:
    """Fold BatchNorm into the layer before it, in place, for the layouts whose forward applies
    the BatchNorm directly to that layer's output: torchvision ResNet stems and blocks
    (``convK -> bnK``, ``downsample = Sequential(conv, bn)``) and projector blocks
    (``fc -> bn``). Exact classes only: a subclass may have its own forward. Returns how many
    BatchNorm layers were folded. Only valid for inference.
    """
    import torchvision.models.resnet as tv_resnet

    from .model import ProjectorBlock

    done = 0
    for module in list(model.modules()):
        kind = type(module)
        if kind in (tv_resnet.ResNet, tv_resnet.BasicBlock, tv_resnet.Bottleneck):
            for k in (1, 2, 3):
                conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
                if isinstance(conv, nn.Conv2d) and bn is not None and _foldable(bn):
                    setattr(module, f"conv{k}", fold_conv_bn(conv, bn))
                    setattr(module, f"bn{k}", nn.Identity())
                    done += 1
            down = getattr(module, "downsample", None)
            if isinstance(down, nn.Sequential):
                done += _fold_sequential(down)
        elif kind is ProjectorBlock and _foldable(module.bn):
            module.fc = fold_linear_bn(module.fc, module.bn)
            module.bn = nn.Identity()
            done += 1
    return done


# --------------------------------------------------------------------------------------------
# The prepared model
# --------------------------------------------------------------------------------------------


def resolve_device(device: Union[str, torch.device, None], model: nn.Module) -> torch.device:
    if device is None:
        try:
            return next(model.parameters()).device
        except StopIteration:
            return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' was asked for but CUDA is not available here; "
                             "use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return precision


def _signature(model: nn.Module) -> Tuple[Any, ...]:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    sig = []
    for t in list(model.parameters()) + list(model.buffers()):
        sig.append((id(t), t.data_ptr(), t._version, t.device.type))
    return tuple(sig)


class InferenceModel:
    """A prepared copy of a model for one device / precision; call it on a batch.

    Accepts either an already normalised float batch ``[N, 3, H, W]`` or a uint8 batch in
    NHWC layout ``[N, H, W, 3]`` (what the decode pipeline produces), which it normalises with
    the ImageNet mean/std on the device. Returns float32 features on the CPU.
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32",
                 channels_last: bool = True, fold_bn: bool = True, compile: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.device = device
        self.precision = check_precision(precision, device)
        self.channels_last = channels_last
        self.out_dim = getattr(model, "out_dim", None)
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.folded = 0
        if fold_bn:
            self.folded = fold_batchnorm(net)
        net = net.to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.module = net
        self.compiled = False
        if compile:
            self.module = torch.compile(net, dynamic=False)
            self.compiled = True
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    # -- batches -------------------------------------------------------------------------------
    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or float NCHW (CPU or device) -> normalised float NCHW on the device."""
        cuda = self.device.type == "cuda"
        if batch.dtype == torch.uint8:
            if batch.ndim != 4 or batch.shape[-1] != 3:
                raise ValueError(f"uint8 batches must be [N, H, W, 3]; got {tuple(batch.shape)}")
            if cuda and batch.device.type == "cpu":
                batch = batch.pin_memory() if not batch.is_pinned() else batch
            x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            # the permuted NHWC buffer is already channels_last; float() keeps that layout.
            # (x / 255 - mean) / std, op for op as ToTensor + Normalize.
            x = x.float().div_(255.0).sub_(self._mean).div_(self._std)
        else:
            if batch.ndim != 4:
                raise ValueError(f"float batches must be [N, 3, H, W]; got {tuple(batch.shape)}")
            if cuda and batch.device.type == "cpu":
                batch = batch.float().pin_memory()
            x = batch.to(self.device, dtype=torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = self.to_input(batch)
            if self.precision != "fp32":
                with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision]):
                    y = self.module(x)
            else:
                y = self.module(x)
            return y.float().cpu()


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Any, Tuple[Any, InferenceModel]]]" = \
    weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def prepare(model: nn.Module, device: Union[str, torch.device, None] = None,
            precision: str = "fp32", *, channels_last: bool = True, fold_bn: bool = True,
            compile: bool = False) -> InferenceModel:
    """The cached :class:`InferenceModel` of ``model`` for this device and options.

    ``device=None`` uses the model's own device. Prepared again when the model's weights
    changed since the last call.
    """
    dev = resolve_device(device, model)
    check_precision(precision, dev)
    key = (str(dev), precision, bool(channels_last), bool(fold_bn), bool(compile))
    sig = _signature(model)
    with _CACHE_LOCK:
        entry = _CACHE.get(model, {}).get(key)
        if entry is not None and entry[0] == sig:
            return entry[1]
    prepared = InferenceModel(model, dev, precision, channels_last=channels_last,
                              fold_bn=fold_bn, compile=compile)
    with _CACHE_LOCK:
        # one prepared copy per model: a new key or new weights replace the old ones
        _CACHE[model] = {key: (sig, prepared)}
    return prepared


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = ["InferenceModel", "prepare", "fold_batchnorm", "fold_conv_bn", "fold_linear_bn",
           "PRECISIONS", "clear_cache"]
