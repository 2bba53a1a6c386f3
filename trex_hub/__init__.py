"""trex_hub: the t-ReX / t-ReX* ResNet-50 model zoo.

>>> import trex_hub
>>> model = trex_hub.load("trex_star")          # backbone only, eval mode, CPU
>>> feats = model.extract(["a.jpg", "b.png"])   # float32 [2, 2048]

The names below are imported on first use (PEP 562), so ``import trex_hub`` and the programs'
``--help`` do not wait for torch and torchvision (4 s on 2 cores), and a program can start CUDA
while they load. Submodules are reachable as attributes too (``trex_hub.model``).
"""
from importlib import import_module
from typing import TYPE_CHECKING, Any, Dict, List

from .version import __version__

# public name -> the module that defines it
_HOMES: Dict[str, str] = {
    "load": "api", "list_models": "api", "model_info": "api", "ModelLoadError": "api",
    "CheckpointError": "checkpoint", "CheckpointReadError": "checkpoint",
    "read_checkpoint": "checkpoint",
    "extract_features": "extract", "read_features": "featurefile", "fetch": "loader",
    "TReX": "model", "export_onnx": "onnx_export", "PreprocessConfig": "preprocess",
    "push_to_hub": "publish", "save_pretrained": "publish",
    "UnknownModelError": "registry", "get_transform": "transforms",
}

__all__ = [
    "load", "list_models", "model_info", "fetch", "get_transform", "PreprocessConfig",
    "extract_features", "read_features", "read_checkpoint", "TReX", "CheckpointError",
    "CheckpointReadError", "ModelLoadError", "UnknownModelError", "save_pretrained", "push_to_hub",
    "export_onnx",
    "__version__",
]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ does the same on first use
    from .api import ModelLoadError, list_models, load, model_info  # noqa: F401
    from .checkpoint import CheckpointError, CheckpointReadError, read_checkpoint  # noqa: F401
    from .extract import extract_features  # noqa: F401
    from .featurefile import read_features  # noqa: F401
    from .loader import fetch  # noqa: F401
    from .model import TReX  # noqa: F401
    from .onnx_export import export_onnx  # noqa: F401
    from .preprocess import PreprocessConfig  # noqa: F401
    from .publish import push_to_hub, save_pretrained  # noqa: F401
    from .registry import UnknownModelError  # noqa: F401
    from .transforms import get_transform  # noqa: F401


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # what tools probe for (inspect: __wrapped__): not a submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(import_module(f".{home}", __name__), name)
    else:
        try:  # a submodule: trex_hub.model, trex_hub.preprocess, ...
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # the submodule exists but needs a package
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
