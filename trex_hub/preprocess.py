"""Preprocessing as data: the presets that travel with the weights (resize, crop, mean, std).

The bottom of the package (no torch import): the registry, ``config.json``, the transforms and the
inference engine all read these values from here, so one change of a preset reaches all of them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Tuple, Union

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

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing interpolation '{self.interpolation}' is not one of "
                             f"{', '.join(INTERPOLATIONS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocessing mean/std need 3 values each (std > 0); got "
                             f"{self.mean} / {self.std}")
        if self.resize < 1 or self.crop < 1:
            raise ValueError(f"preprocessing sizes must be positive; got resize {self.resize}, "
                             f"crop {self.crop}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON types (what ``config.json`` holds)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessConfig":
        """The inverse of :meth:`to_dict`; unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {unknown}; known: {sorted(known)}")
        kw = dict(data)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)


# The paper's feature-extraction protocol, and the usual ImageNet evaluation.
PRESETS: Dict[str, PreprocessConfig] = {
    "transfer": PreprocessConfig(resize=224, crop=224, interpolation="bicubic"),
    "imagenet": PreprocessConfig(resize=256, crop=224, interpolation="bilinear"),
}


PreprocessLike = Union[PreprocessConfig, Mapping[str, Any], str, None]


def as_preprocess_config(value: PreprocessLike) -> PreprocessConfig:
    """A :class:`PreprocessConfig` from a config, its dict form, a preset name, or ``None`` (the
    ``"transfer"`` preset)."""
    if value is None:
        return PRESETS["transfer"]
    if isinstance(value, PreprocessConfig):
        return value
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"unknown preprocessing preset '{value}'; choose one of "
                             f"{', '.join(PRESETS)}")
        return PRESETS[value]
    return PreprocessConfig.from_dict(value)


def timm_crop_pct(cfg: PreprocessConfig) -> float:
    """timm's ``crop_pct`` for ``cfg``: timm resizes to ``floor(crop / crop_pct)``, so the plain
    ratio, rounded to 6 digits, can land one pixel short (224 / 235); then a ratio aimed at the
    middle of the pixel is used. :func:`preprocess_from_timm` reads either back exactly."""
    pct = round(cfg.crop / cfg.resize, 6)
    return pct if math.floor(cfg.crop / pct) == cfg.resize else \
        round(cfg.crop / (cfg.resize + 0.5), 6)


def preprocess_from_timm(pre: Mapping[str, Any]) -> Dict[str, Any]:
    """Our ``preprocess`` dict from timm's ``pretrained_cfg`` (``input_size``, ``crop_pct``,
    ``interpolation``, ``mean`` / ``std``; resize = floor(crop / crop_pct) as timm computes it).
    Keys it lacks keep the transfer preset's values; the sizes and statistics are then checked by
    the config schema like any other. A preprocessing trex_hub cannot reproduce (a ``crop_mode``
    other than ``"center"``, an interpolation other than bicubic / bilinear / nearest, a
    ``crop_pct`` outside (0, 1], values of the wrong type) is a ``ValueError`` naming the field:
    loading the weights with another preprocessing than theirs would change the features
    silently."""
    def bad(key: str, what: str) -> ValueError:
        return ValueError(f"timm config field 'pretrained_cfg.{key}' is {pre.get(key)!r}"[:200]
                          + f": {what}")

    how = "trex_hub preprocesses by resize + centre crop only; load these weights with timm"
    if pre.get("crop_mode", "center") != "center":
        raise bad("crop_mode", f"{how} (or set it to 'center' to use a centre crop)")
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise bad("interpolation", f"use one of {', '.join(INTERPOLATIONS)}; {how}")
    size = pre.get("input_size", [3, PRESETS["transfer"].crop, PRESETS["transfer"].crop])
    if not isinstance(size, (list, tuple)) or len(size) != 3 or size[1] != size[2] \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise bad("input_size", "expected [3, S, S] with an integer side S")
    pct = pre.get("crop_pct", 1.0)
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0.0 < pct <= 1.0:
        raise bad("crop_pct", f"expected a number in (0, 1]; {how}")
    crop = size[-1]
    out: Dict[str, Any] = {"resize": int(math.floor(crop / pct + 1e-3)), "crop": crop,
                           "interpolation": interpolation}
    for key in ("mean", "std"):
        if key in pre:
            if not isinstance(pre[key], (list, tuple)):
                raise bad(key, "expected a list of 3 numbers")
            out[key] = list(pre[key])
    return out
