"""trex_hub: the t-ReX / t-ReX* ResNet-50 model zoo.

>>> import trex_hub
>>> model = trex_hub.load("trex_star")          # backbone only, eval mode, CPU
>>> feats = model.extract(["a.jpg", "b.png"])   # float32 [2, 2048]
"""
__version__ = "0.1.0"

from .api import ModelLoadError, list_models, load, model_info  # noqa: E402
from .checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from .extract import extract_features  # noqa: E402
from .model import TReX  # noqa: E402
from .registry import UnknownModelError  # noqa: E402

__all__ = [
    "load", "list_models", "model_info", "extract_features", "read_checkpoint", "TReX",
    "CheckpointError", "ModelLoadError", "UnknownModelError", "__version__",
]
