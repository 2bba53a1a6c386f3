"""trex_hub: the t-ReX / t-ReX* ResNet-50 model zoo.

>>> import trex_hub
>>> model = trex_hub.load("trex_star")          # backbone only, eval mode, CPU
>>> feats = model.extract(["a.jpg", "b.png"])   # float32 [2, 2048]
"""
from .version import __version__  # noqa: E402

from .api import ModelLoadError, list_models, load, model_info  # noqa: E402
from .checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from .extract import extract_features  # noqa: E402
from .featurefile import read_features  # noqa: E402
from .loader import fetch  # noqa: E402
from .model import TReX  # noqa: E402
from .onnx_export import export_onnx  # noqa: E402  (onnx, onnxruntime imported on use)
from .preprocess import PreprocessConfig  # noqa: E402
from .publish import push_to_hub, save_pretrained  # noqa: E402  (huggingface_hub imported on use)
from .registry import UnknownModelError  # noqa: E402
from .transforms import get_transform  # noqa: E402

__all__ = [
    "load", "list_models", "model_info", "fetch", "get_transform", "PreprocessConfig",
    "extract_features", "read_features", "read_checkpoint", "TReX", "CheckpointError",
    "ModelLoadError", "UnknownModelError", "save_pretrained", "push_to_hub", "export_onnx",
    "__version__",
]
