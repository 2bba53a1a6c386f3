"""ONNX: export a t-ReX model as one self-contained ``.onnx`` file, and run it with ONNX Runtime.

* :func:`export_onnx` writes the backbone (``head="backbone"``: output ``features``) or the
  backbone and projector (``head="projector"``: outputs ``features`` and ``embeddings``) with
  PyTorch's ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``, which needs
  ``onnxscript``). The input is ``pixel_values``: float32 ``[N, 3, S, S]`` (``S =
  image_size``, 224 by default), RGB, already normalised. The file's ``metadata_props`` record
  the input/output names and shapes, the expected preprocessing (``preprocess`` as JSON:
  resize, crop, interpolation, mean, std), the model's name, architecture and licence.
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
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .fileio import PathLike, temp_path
from .inference import Pending, normalisation
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, PRESETS

INPUT_NAME = "pixel_values"
HEADS: Dict[str, Tuple[str, ...]] = {"backbone": ("features",),
                                     "projector": ("features", "embeddings")}
ENGINES = ("torch", "onnxruntime")
_HINT = "pip install 'trex_hub[interop]' (onnx, onnxscript, onnxruntime)"


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


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"ONNX export/runtime needs '{module}': {_HINT}") from None


def onnx_metadata(model: nn.Module, head: str, image_size: int,
                  dynamic_batch: bool) -> Dict[str, str]:
    """The ``metadata_props`` written into the file (all values are strings)."""
    from .version import __version__

    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("name")
    pre = model.preprocess_config if hasattr(model, "preprocess_config") else PRESETS["transfer"]
    license = None
    if name:
        from . import registry

        license = registry.get_entry(name).license if registry.is_known(name) else None
    outputs = {"features": [int(model.num_features)]}
    if head == "projector":
        outputs["embeddings"] = [int(model.out_dim)]
    meta = {
        "producer": "trex_hub", "trex_hub_version": __version__,
        "model_name": name or "", "arch": str(getattr(model, "arch", "")), "head": head,
        "input_name": INPUT_NAME,
        "input_shape": json.dumps(["N" if dynamic_batch else 1, 3, image_size, image_size]),
        "input_format": "float32 NCHW RGB, scaled to [0, 1] then normalised with mean/std",
        "output_names": json.dumps(list(HEADS[head])),
        "output_dims": json.dumps(outputs),
        "preprocess": json.dumps(dict(pre.to_dict(), steps=[
            f"resize shorter side to {pre.resize} ({pre.interpolation}, antialiased)",
            f"center crop {pre.crop}x{pre.crop}", "to float in [0, 1]",
            "normalise (x - mean) / std"])),
    }
    if license:
        meta["license"] = license
    return meta


def export_onnx(model: nn.Module, path: PathLike, *, head: str = "backbone",
                dynamic_batch: bool = True, opset: Optional[int] = None,
                image_size: int = 224, optimize: bool = True) -> Path:
    """Export ``model`` (a :class:`~trex_hub.model.TReX`) to ``path`` as one ``.onnx`` file.

    Args:
        head: ``"backbone"`` (output ``features`` ``[N, 2048]``) or ``"projector"`` (outputs
            ``features`` and ``embeddings`` ``[N, out_dim]``; needs a model loaded with
            ``projector=True``).
        dynamic_batch: a symbolic batch dimension (else the graph takes exactly one image).
        opset: ONNX opset (default: the exporter's).
        image_size: height and width of the input (224 for the paper's protocol).
        optimize: run the exporter's graph optimiser (constant folding, fusions). ONNX Runtime
            optimises at load time anyway, so ``False`` only makes the export faster.
    Returns:
        ``path``. The file is written atomically; ONNX Runtime outputs match PyTorch within
        1e-4 relative (tested).
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r}: use 'backbone' or 'projector'")
    if head == "projector" and not getattr(model, "has_projector", False):
        raise ValueError("head='projector' needs a model with its projector: load it with "
                         "projector=True (trex_repro, trex_star_repro), or use head='backbone'")
    _require("onnxscript")
    net = _Graph(copy.deepcopy(model).float().cpu().eval(), head).eval()
    batch = 2 if dynamic_batch else 1  # an example batch of 2 keeps the dimension symbolic
    example = torch.zeros(batch, 3, image_size, image_size)
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch")}} if dynamic_batch else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about unrelated deprecations
        program = torch.onnx.export(net, (example,), None, dynamo=True, verbose=False,
                                    input_names=[INPUT_NAME], output_names=list(HEADS[head]),
                                    opset_version=opset, dynamic_shapes=dynamic,
                                    optimize=optimize)
    program.model.metadata_props.update(onnx_metadata(model, head, image_size, dynamic_batch))
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
           "engine_for", "INPUT_NAME", "HEADS", "ENGINES", "onnx_metadata"]
