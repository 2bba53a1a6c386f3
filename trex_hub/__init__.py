"""trex_hub: the t-ReX / t-ReX* ResNet-50 model zoo.

>>> import trex_hub
>>> model = trex_hub.load("trex_star")          # backbone only, eval mode, CPU
>>> feats = model.extract(["a.jpg", "b.png"])   # float32 [2, 2048]
"""
__version__ = "0.1.0"

from .api import ModelLoadError, list_models, load, model_info  # noqa: E402
from .checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from .extract import extract_features, read_features  # noqa: E402
from .hub.hf import push_to_hub, save_pretrained  # noqa: E402  (huggingface_hub imported on use)
from .model import TReX  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402  (onnx, onnxruntime imported on use)
from .registry import UnknownModelError  # noqa: E402

__all__ = [
    "load", "list_models", "model_info", "extract_features", "read_features", "read_checkpoint", "TReX",
    "CheckpointError", "ModelLoadError", "UnknownModelError", "save_pretrained", "push_to_hub",
    "export_onnx", "__version__",
]
