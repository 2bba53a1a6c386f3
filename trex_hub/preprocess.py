"""Preprocessing as data: the presets that travel with the weights (resize, crop, mean, std).

The bottom of the package (no torch import): the registry, ``config.json``, the transforms and the
inference engine all read these values from here, so one change of a preset reaches all of them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize the shorter side to ``resize`` (``interpolation``, antialiased), centre-crop
    ``crop`` x ``crop``, scale to [0, 1] and normalise with ``mean`` / ``std``."""

    resize: int = 224
    crop: int = 224
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


# The paper's feature-extraction protocol, and the usual ImageNet evaluation.
PRESETS: Dict[str, PreprocessConfig] = {
    "transfer": PreprocessConfig(resize=224, crop=224, interpolation="bicubic"),
    "imagenet": PreprocessConfig(resize=256, crop=224, interpolation="bilinear"),
}
