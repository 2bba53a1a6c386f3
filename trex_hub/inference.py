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
* Precision means what it says: ``"fp32"`` is full IEEE fp32 (TF32 off for matmul and cuDNN
  inside the call, the caller's flags restored after), ``"tf32"`` lets Ampere+ GPUs use TF32,
  ``"bf16"`` / ``"fp16"`` autocast.
* On CUDA: uint8 batches are copied into reused pinned buffers and to the device without
  blocking, normalised there (4x less transfer than float); :meth:`InferenceModel.launch`
  copies the features back asynchronously (pinned output + event) so the next batch overlaps.
* Optionally ``torch.compile`` (opt-in: it costs tens of seconds up front).
"""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import skip_init

from .choices import PRECISIONS
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _tf32_flags() -> List[Tuple[Any, str]]:
    """The (object, attribute) pairs that decide whether fp32 matmul / convolutions may use TF32:
    the ``fp32_precision`` API of torch >= 2.9 where it exists (mixing it with the legacy
    ``allow_tf32`` flags is an error there), else the legacy flags."""
    b = torch.backends
    new = [(b.cuda.matmul, "fp32_precision"), (getattr(b.cudnn, "conv", None), "fp32_precision"),
           (getattr(b.cudnn, "rnn", None), "fp32_precision")]
    if all(obj is not None and hasattr(obj, attr) for obj, attr in new):
        return new
    return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]


@contextlib.contextmanager
def fp32_mode(precision: str) -> Iterator[None]:
    """Inside: TF32 off (``"fp32"``) or on (``"tf32"``) for matmul and cuDNN; the caller's flags
    are restored on exit whatever happens. Other precisions leave the flags alone."""
    if precision not in ("fp32", "tf32"):
        yield
        return
    flags = _tf32_flags()
    saved = [getattr(obj, attr) for obj, attr in flags]
    tf32 = precision == "tf32"
    try:
        for obj, attr in flags:
            setattr(obj, attr, ("tf32" if tf32 else "ieee") if attr == "fp32_precision" else tf32)
        yield
    finally:
        for (obj, attr), value in zip(flags, saved):
            setattr(obj, attr, value)


class Pending:
    """Features of one launched batch: ``result()`` waits for the device and returns them as a
    float32 CPU tensor (on CUDA they are copied back without blocking into pinned memory)."""

    def __init__(self, out: torch.Tensor, event: Optional[Any] = None):
        self._out, self._event = out, event

    def result(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._out

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


def normalisation(model: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` the weights expect: the model's own preprocessing config (a
    :class:`~trex_hub.model.TReX` carries it, from the registry, ``config.json`` or timm's
    ``pretrained_cfg``), ImageNet's for a model without one. A preprocessing preset
    (``"transfer"``, ``"imagenet"``) only sets the geometry, as in ``get_transform``."""
    cfg = getattr(model, "preprocess_config", None)
    if cfg is None:
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


class InferenceModel:
    """A prepared copy of a model for one device / precision; call it on a batch.

    Accepts either an already normalised float batch ``[N, 3, H, W]`` or a uint8 batch in
    NHWC layout ``[N, H, W, 3]`` (what the decode pipeline produces), which it normalises with
    ``mean`` / ``std`` on the device (:func:`prepare` passes the model's own, see
    :func:`normalisation`). Returns float32 features on the CPU.
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
        self._full = 0  # compiled: the batch size every batch is padded to (see expect_batch)
        if compile:
            self.module = torch.compile(net, dynamic=False)
            self.compiled = True
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # CUDA: a small ring of pinned uint8 input buffers, each reusable once its copy is done
        self._pinned: List[Tuple[torch.Tensor, Any]] = []
        self._next_pinned = 0

    def expect_batch(self, n: int) -> None:
        """Batches of up to ``n`` rows are coming. Compiled, each smaller one is padded to the
        largest size announced or seen, so a short batch that comes first (hybrid decoding
        delivers batches as they are ready) compiles no shape of its own."""
        self._full = max(self._full, int(n))

    def _pinned_copy(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` (uint8, CPU) on the device, through a reused pinned buffer, not blocking."""
        n = batch.shape[0]
        slot = self._next_pinned % 3
        self._next_pinned += 1
        if slot >= len(self._pinned) or self._pinned[slot][0].shape[1:] != batch.shape[1:] \
                or self._pinned[slot][0].shape[0] < n:
            buf = torch.empty(batch.shape, dtype=torch.uint8, pin_memory=True)
            entry = (buf, torch.cuda.Event())
            if slot < len(self._pinned):
                self._pinned[slot][1].synchronize()
                self._pinned[slot] = entry
            else:
                self._pinned.append(entry)
        buf, done = self._pinned[slot]
        done.synchronize()  # its previous copy to the device has finished
        buf[:n].copy_(batch)
        x = buf[:n].to(self.device, non_blocking=True)
        done.record(torch.cuda.current_stream(self.device))
        return x

    # -- batches -------------------------------------------------------------------------------
    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or float NCHW (CPU or device) -> normalised float NCHW on the device."""
        cuda = self.device.type == "cuda"
        if batch.dtype == torch.uint8:
            if batch.ndim != 4 or batch.shape[-1] != 3:
                raise ValueError(f"uint8 batches must be [N, H, W, 3]; got {tuple(batch.shape)}")
            # a pinned host batch (hybrid's CPU lane) uploads as it is, like a device batch
            if cuda and batch.device.type == "cpu" and not batch.is_pinned():
                x = self._pinned_copy(batch).permute(0, 3, 1, 2)
            else:
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

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of ``batch`` on the device (float32), in this model's precision."""
        with torch.inference_mode(), fp32_mode(self.precision):
            x = self.to_input(batch)
            n = x.shape[0]
            if self.compiled:  # a short last batch is padded: no recompilation for its shape
                self._full = max(self._full, n)
                if n < self._full:
                    x = torch.cat([x, x.new_zeros((self._full - n, *x.shape[1:]))])
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
            if self.precision in _AUTOCAST_DTYPES:
                with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision]):
                    y = self.module(x)
            else:
                y = self.module(x)
            return y[:n].float()

    def launch(self, batch: torch.Tensor) -> Pending:
        """Start ``batch``; on CUDA the features come back to pinned host memory without
        blocking, so the caller can prepare (and launch) the next batch meanwhile."""
        if self.device.type != "cuda":
            return Pending(self.forward(batch).cpu())
        # On this model's GPU, whatever the calling thread's current device: the events go on
        # the stream the copies run on (a cuda:1 model called where cuda:0 is current recorded
        # them on cuda:0's, and its features were read before they arrived), and the pinned
        # buffers belong to its context, not to one opened on cuda:0.
        with torch.cuda.device(self.device), torch.inference_mode():
            y = self.forward(batch)
            out = torch.empty(y.shape, dtype=torch.float32, pin_memory=True)
            out.copy_(y, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return Pending(out, event)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.launch(batch).result()


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
    mean, std = normalisation(model)  # set_preprocess changes it without touching the weights
    key = (str(dev), precision, bool(channels_last), bool(fold_bn), bool(compile), mean, std)
    sig = _signature(model)
    with _CACHE_LOCK:
        entry = _CACHE.get(model, {}).get(key)
        if entry is not None and entry[0] == sig:
            return entry[1]
    prepared = InferenceModel(model, dev, precision, channels_last=channels_last,
                              fold_bn=fold_bn, compile=compile, mean=mean, std=std)
    with _CACHE_LOCK:
        # one prepared copy per model: a new key or new weights replace the old ones
        _CACHE[model] = {key: (sig, prepared)}
    return prepared


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


__all__ = ["InferenceModel", "Pending", "prepare", "normalisation", "fold_batchnorm",
           "fold_conv_bn", "fold_linear_bn", "fp32_mode", "PRECISIONS", "clear_cache"]
