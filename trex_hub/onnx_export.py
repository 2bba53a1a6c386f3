"""ONNX: export a t-ReX model as one self-contained ``.onnx`` file, and run it with ONNX Runtime.

* :func:`export_onnx` writes the backbone (``head="backbone"``: output ``features``) or the
  backbone and projector (``head="projector"``: outputs ``features`` and ``embeddings``) with
  PyTorch's ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``, which needs
  ``onnxscript``), or the feature maps of a ``features_only=True`` model (one output per level,
  named as its ``feature_info.module_name()``: ``layer1`` ... ``layer4``, ``relu`` for the stem).
  The input is ``pixel_values``: float32 ``[N, 3, S, S]`` (``S = image_size``, by default the
  model's own crop: 224 for the released models), or ``[N, 3, H, W]`` with ``dynamic_size``,
  RGB, already normalised. The file's ``metadata_props`` record the input/output names and
  shapes, the opset written, the expected preprocessing (``preprocess`` as JSON: resize, crop,
  interpolation, mean, std), the model's name, architecture and licence.
* :class:`OnnxRuntimeModel` is an ONNX Runtime session with the call interface of
  :class:`trex_hub.inference.InferenceModel` (uint8 NHWC or normalised float NCHW batch in,
  float32 CPU tensor out), so the extraction engine can run on it (``trex-extract --engine
  onnxruntime``).

onnx, onnxscript and onnxruntime are imported inside the functions (``pip install
trex_hub[interop]``); the module is not called ``onnx.py`` so that it never shadows the package.
"""
from __future__ import annotations

import copy
import json
import logging
import operator
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .fileio import PathLike, temp_path
from .inference import Pending, normalisation
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, PRESETS, PreprocessConfig

INPUT_NAME = "pixel_values"
HEADS: Dict[str, Tuple[str, ...]] = {"backbone": ("features",),
                                     "projector": ("features", "embeddings")}
ENGINES = ("torch", "onnxruntime")
OPSET_MIN = 18  # the torch.export-based exporter has no implementations below opset 18
_HINT = "pip install 'trex_hub[interop]' (onnx, onnxscript, onnxruntime)"
# where the exporter reports a failed opset conversion (a warning with its traceback)
_CONVERTER_LOGGERS = ("onnxscript.version_converter", "torch.onnx._internal.exporter._compat")


class _Graph(nn.Module):
    """What is exported: the backbone, and the projector after it when asked."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head if head == "projector" else None

    def forward(self, pixel_values: torch.Tensor):
        features = self.backbone(pixel_values)
        if self.head is None:
            return features
        return features, self.head(features)


class _MapsGraph(nn.Module):
    """What is exported of a ``features_only`` model: its levels, as a tuple of outputs."""

    def __init__(self, maps: nn.Module):
        super().__init__()
        self.maps = maps

    def forward(self, pixel_values: torch.Tensor):
        return tuple(self.maps(pixel_values))


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"ONNX export/runtime needs '{module}': {_HINT}") from None


def require_exporter() -> None:
    """Raise the one-line ``ImportError`` (naming the fix) when :func:`export_onnx` cannot run:
    for callers that check before doing long work (``trex-download --to-onnx``)."""
    _require("onnx")
    _require("onnxscript")


def _is_feature_maps(model: nn.Module) -> bool:
    """A ``load(..., features_only=True)`` model (:class:`trex_hub.dense.FeatureMaps`)."""
    return hasattr(model, "feature_info") and not hasattr(model, "backbone")


def _preprocess(model: nn.Module) -> PreprocessConfig:
    """The model's own preprocessing (the ``"transfer"`` preset for a bare network)."""
    try:
        return model.preprocess_config
    except (AttributeError, KeyError, TypeError, ValueError):
        return PRESETS["transfer"]


def _output_dims(model: nn.Module, head: str) -> Dict[str, List[int]]:
    """Each output's name and trailing dims: ``[width]`` of a vector, ``[channels]`` of a map."""
    if _is_feature_maps(model):
        return {n: [int(c)] for n, c in zip(model.feature_info.module_name(),
                                             model.feature_info.channels())}
    outputs = {"features": [int(model.num_features)]}
    if head == "projector":
        outputs["embeddings"] = [int(model.out_dim)]
    return outputs


def onnx_metadata(model: nn.Module, head: str, image_size: int, dynamic_batch: bool, *,
                  dynamic_size: bool = False, opset: Optional[int] = None) -> Dict[str, str]:
    """The ``metadata_props`` written into the file (all values are strings)."""
    from .version import __version__

    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("name")
    pre = _preprocess(model)
    license = cfg.get("license")
    if not license and name:
        from . import registry

        license = registry.get_entry(name).license if registry.is_known(name) else None
    outputs = _output_dims(model, head)
    side: List[Any] = ["H", "W"] if dynamic_size else [image_size, image_size]
    meta = {
        "producer": "trex_hub", "trex_hub_version": __version__,
        "model_name": name or "", "arch": str(getattr(model, "arch", "")),
        "head": "feature_maps" if _is_feature_maps(model) else head,
        "input_name": INPUT_NAME,
        "input_shape": json.dumps(["N" if dynamic_batch else 1, 3, *side]),
        "dynamic_size": json.dumps(bool(dynamic_size)),
        "input_format": "float32 NCHW RGB, scaled to [0, 1] then normalised with mean/std",
        "output_names": json.dumps(list(outputs)),
        "output_dims": json.dumps(outputs),
        "preprocess": json.dumps(dict(pre.to_dict(), steps=[
            f"resize shorter side to {pre.resize} ({pre.interpolation}, antialiased)",
            f"center crop {pre.crop}x{pre.crop}", "to float in [0, 1]",
            "normalise (x - mean) / std"])),
    }
    if _is_feature_maps(model):  # map i is [N, C_i, ceil(H / stride_i), ceil(W / stride_i)]
        meta["output_strides"] = json.dumps(dict(zip(model.feature_info.module_name(),
                                                     model.feature_info.reduction())))
    if opset is not None:
        meta["opset"] = str(int(opset))
    if license:
        meta["license"] = license
    return meta


def check_opset(opset: Any) -> Optional[int]:
    """``opset`` as an int the exporter can write (``None``: its default), else one
    ``ValueError`` naming the request and the range."""
    if opset is None:
        return None
    onnx = _require("onnx")
    high = int(onnx.defs.onnx_opset_version())
    try:
        value = None if isinstance(opset, bool) else operator.index(opset)
    except TypeError:
        value = None
    if value is None or not OPSET_MIN <= value <= high:
        raise ValueError(f"opset={opset!r}: the torch.export-based exporter writes ONNX opset "
                         f"{OPSET_MIN} to {high}; pass one of those or leave opset out (for an "
                         "older opset, call torch.onnx.export(..., dynamo=False) yourself)")
    return value


@contextmanager
def _quiet_converter() -> Iterator[None]:
    """Keep the exporter's opset-conversion warnings (and their tracebacks) off stderr: a
    conversion that fails is reported as one ``ValueError`` instead."""
    loggers = [logging.getLogger(n) for n in _CONVERTER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_args(model: nn.Module, head: str, image_size: Any) -> int:
    """The input size to export (``image_size``, or the model's crop); refuses bad requests."""
    if head not in HEADS:
        raise ValueError(f"head={head!r}: use 'backbone' or 'projector'")
    if _is_feature_maps(model):
        if head != "backbone":
            raise ValueError(f"head={head!r}: a features_only model exports its feature maps "
                             "(one output per level); leave head out, or export the model "
                             "loaded without features_only=True")
    elif head == "projector" and not getattr(model, "has_projector", False):
        raise ValueError("head='projector' needs a model with its projector: load it with "
                         "projector=True (trex_repro, trex_star_repro), or use head='backbone'")
    if image_size is None:
        return int(_preprocess(model).crop)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r}: pass the input's height and width as a "
                         "positive int, or leave it out for the model's own crop")
    return image_size


def export_onnx(model: nn.Module, path: PathLike, *, head: str = "backbone",
                dynamic_batch: bool = True, opset: Optional[int] = None,
                image_size: Optional[int] = None, optimize: bool = True,
                dynamic_size: bool = False) -> Path:
    """Export ``model`` (a :class:`~trex_hub.model.TReX`, or a ``features_only=True``
    :class:`~trex_hub.dense.FeatureMaps`) to ``path`` as one ``.onnx`` file.

    Args:
        head: ``"backbone"`` (output ``features`` ``[N, 2048]``) or ``"projector"`` (outputs
            ``features`` and ``embeddings`` ``[N, out_dim]``; needs a model loaded with
            ``projector=True``). A ``features_only`` model has one output per level instead,
            ``[N, C, ceil(H / stride), ceil(W / stride)]``, named as
            ``model.feature_info.module_name()`` (leave ``head`` out).
        dynamic_batch: a symbolic batch dimension (else the graph takes exactly one image).
        opset: ONNX opset, 18 or later (default: the exporter's); one it cannot write is a
            ``ValueError`` and no file. The opset written is in the metadata (``opset``).
        image_size: height and width of the input (default: the model's own crop,
            ``model.preprocess_config.crop``; 224 for the released models).
        optimize: run the exporter's graph optimiser (constant folding, fusions). ONNX Runtime
            optimises at load time anyway, so ``False`` only makes the export faster.
        dynamic_size: symbolic height and width (input ``[N, 3, H, W]``: any size, e.g. for
            detection or segmentation); recorded in the metadata (``dynamic_size``).
    Returns:
        ``path``. The file is written atomically; ONNX Runtime outputs match PyTorch within
        1e-4 relative (tested).
    """
    size = _check_args(model, head, image_size)
    _require("onnxscript")
    opset = check_opset(opset)
    work = copy.deepcopy(model).float().cpu().eval()
    if _is_feature_maps(model):
        net: nn.Module = _MapsGraph(work).eval()
    else:
        net = _Graph(work, head).eval()
    names = list(_output_dims(model, head))
    batch = 2 if dynamic_batch else 1  # an example batch of 2 keeps the dimension symbolic
    side = size if size > 1 or not dynamic_size else 32  # a size of 1 would be specialised
    example = torch.zeros(batch, 3, side, side)
    dims: Dict[int, Any] = {0: torch.export.Dim("batch")} if dynamic_batch else {}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)})
    dynamic = {INPUT_NAME: dims} if dims else None
    import warnings

    with warnings.catch_warnings(), _quiet_converter():
        warnings.simplefilter("ignore")  # exporter chatter about unrelated deprecations
        program = torch.onnx.export(net, (example,), None, dynamo=True, verbose=False,
                                    input_names=[INPUT_NAME], output_names=names,
                                    opset_version=opset, dynamic_shapes=dynamic,
                                    optimize=optimize)
    written = program.model.opset_imports.get("")
    if opset is not None and written != opset:
        raise ValueError(f"opset={opset}: the exporter could not convert this graph to opset "
                         f"{opset} (it made opset {written}); pass opset={written} or leave "
                         "opset out")
    program.model.metadata_props.update(onnx_metadata(
        model, head, size, dynamic_batch, dynamic_size=dynamic_size, opset=written))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)  # created by the save, so with the umask's mode (mkstemp's 0600
    try:  # kept colleagues on a shared machine from reading the export)
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_onnx_metadata(path: PathLike) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file, as a dict."""
    onnx = _require("onnx")
    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


class OnnxRuntimeModel:
    """An ONNX Runtime CPU session called like :class:`~trex_hub.inference.InferenceModel`.

    ``output`` picks the graph output (``"features"`` or ``"embeddings"``; default: the last
    one, i.e. the head the file was exported for). ``threads`` sets ONNX Runtime's intra-op
    threads (default: torch's current setting, so ``--threads`` applies to both engines).
    ``image_size`` is the height and width the graph takes (``None`` if not fixed): a run
    checks it against its crop before it starts.
    """

    def __init__(self, path: PathLike, *, output: Optional[str] = None,
                 threads: Optional[int] = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        ort = _require("onnxruntime")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(os.fspath(path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        self.output = output or names[-1]
        if self.output not in names:
            raise ValueError(f"{path}: no output '{self.output}' (outputs: {names})")
        self.input_name = self.session.get_inputs()[0].name
        height, width = self.session.get_inputs()[0].shape[-2:]
        self.image_size = height if isinstance(height, int) and height == width else None
        dims = self.session.get_outputs()[names.index(self.output)].shape
        self.out_dim = dims[-1] if isinstance(dims[-1], int) else None
        self.device = torch.device("cpu")
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or float NCHW -> contiguous normalised float32 NCHW (on the CPU)."""
        if batch.dtype == torch.uint8:
            if batch.ndim != 4 or batch.shape[-1] != 3:
                raise ValueError(f"uint8 batches must be [N, H, W, 3]; got {tuple(batch.shape)}")
            # op for op as InferenceModel.to_input: (x / 255 - mean) / std
            x = batch.cpu().permute(0, 3, 1, 2).float().div_(255.0).sub_(self._mean)
            return x.div_(self._std).contiguous()
        if batch.ndim != 4:
            raise ValueError(f"float batches must be [N, 3, H, W]; got {tuple(batch.shape)}")
        return batch.detach().cpu().float().contiguous()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = self.to_input(batch).numpy()
        (y,) = self.session.run([self.output], {self.input_name: x})
        return torch.from_numpy(y).float()

    def launch(self, batch: torch.Tensor) -> Pending:
        """The extraction engine's batch interface: ONNX Runtime runs synchronously on the
        CPU, so the result is ready when this returns."""
        return Pending(self(batch))


def prepare_onnxruntime(model: nn.Module, workdir: Optional[PathLike] = None, *,
                        head: Optional[str] = None, threads: Optional[int] = None,
                        image_size: int = 224) -> OnnxRuntimeModel:
    """Export ``model`` and open it with ONNX Runtime: the engine ``trex-extract --engine
    onnxruntime`` runs. ``head`` defaults to the model's active head; ``image_size`` is the
    crop of the run's preprocessing (the graph takes that size only). The file goes to
    ``workdir`` when given (and stays there), else to a temporary folder removed once the session
    holds the graph. The exporter's optimiser is skipped: the session optimises the graph."""
    if head is None:
        head = "projector" if getattr(model, "has_projector", False) else "backbone"
    mean, std = normalisation(model)  # the weights' own, as the torch engine uses
    name = f"{getattr(model, 'arch', 'model')}-{head}.onnx"
    kw = dict(head=head, optimize=False, image_size=image_size)
    if workdir is not None:
        path = export_onnx(model, Path(workdir) / name, **kw)
        return OnnxRuntimeModel(path, output=HEADS[head][-1], threads=threads, mean=mean,
                                std=std)
    with tempfile.TemporaryDirectory(prefix="trex-onnx-") as tmp:
        path = export_onnx(model, Path(tmp) / name, **kw)
        return OnnxRuntimeModel(path, output=HEADS[head][-1], threads=threads, mean=mean,
                                std=std)


def engine_for(engine: str, model: nn.Module, workdir: Optional[PathLike] = None,
               threads: Optional[int] = None,
               image_size: int = 224) -> Union[OnnxRuntimeModel, None]:
    """The batch runner for ``engine``: ``None`` for ``"torch"`` (the extraction engine's own
    prepared model), an :class:`OnnxRuntimeModel` for ``"onnxruntime"`` taking ``image_size``
    inputs (the run's crop: ``resolve_preprocess(preprocess, model).crop``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "torch":
        return None
    return prepare_onnxruntime(model, workdir, threads=threads, image_size=image_size)


__all__ = ["export_onnx", "read_onnx_metadata", "OnnxRuntimeModel", "prepare_onnxruntime",
           "engine_for", "INPUT_NAME", "HEADS", "ENGINES", "OPSET_MIN", "onnx_metadata",
           "check_opset", "require_exporter"]
