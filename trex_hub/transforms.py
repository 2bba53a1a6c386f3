"""Preprocessing as torchvision transforms, and robust image opening.

Presets (``preprocess=``; their values live in :mod:`trex_hub.preprocess`):

* ``"transfer"`` (default): Resize(224, bicubic, shorter side) -> CenterCrop(224) -> ImageNet
  mean/std. The paper's feature-extraction protocol.
* ``"imagenet"``: Resize(256, bilinear) -> CenterCrop(224) -> mean/std. The usual ImageNet eval.
* ``None``: only ToTensor + mean/std (images must already share one size).

:func:`get_transform` builds the transform that travels with the weights: a registry entry's or
a model's own :class:`~trex_hub.preprocess.PreprocessConfig`.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from . import preprocess as pp
from .choices import MAX_PIXELS_CEILING
from . import registry

PRESETS = tuple(pp.PRESETS)


class ImageLoadError(ValueError):
    """An input that cannot be turned into an RGB image; the message names the item."""


def _geometry(cfg: pp.PreprocessConfig) -> Tuple[int, int, T.InterpolationMode]:
    return cfg.resize, cfg.crop, T.InterpolationMode(cfg.interpolation)


MODEL = "model"  # preprocess="model": the model's own preprocessing config


def check_preprocess(preprocess: Any) -> None:
    """A ``preprocess`` argument is a preset name, ``"model"``, a ``PreprocessConfig`` or
    ``None``; anything else is a ``ValueError`` naming the choices."""
    if preprocess is None or isinstance(preprocess, pp.PreprocessConfig) or preprocess == MODEL:
        return
    if preprocess not in pp.PRESETS:
        raise ValueError(f"unknown preprocess '{preprocess}'; choose one of {PRESETS}, "
                         f"'{MODEL}' or None")


def resolve_preprocess(preprocess: Any, model: Any = None) -> Optional[pp.PreprocessConfig]:
    """The config a ``preprocess`` argument stands for: a preset's, the model's own for
    ``"model"`` (what ``get_transform(model)`` uses: registry, ``config.json`` or timm's
    ``pretrained_cfg``), a ``PreprocessConfig`` as given, ``None`` (no resizing)."""
    check_preprocess(preprocess)
    if preprocess is None or isinstance(preprocess, pp.PreprocessConfig):
        return preprocess
    if preprocess == MODEL:
        cfg = getattr(model, "preprocess_config", None)
        if cfg is None:
            raise ValueError(f"preprocess='{MODEL}' uses the model's own preprocessing config, "
                             "and this model has none (trex_hub models do); pass "
                             "'transfer' or 'imagenet'")
        return cfg
    return pp.PRESETS[preprocess]


def preprocess_record(preprocess: Any, model: Any = None) -> Any:
    """What a features file records about its preprocessing: the preset name (or ``None``), or
    for ``"model"`` / a config the geometry it resolved to (a resumed run compares it)."""
    if preprocess is None or (isinstance(preprocess, str) and preprocess != MODEL):
        return preprocess
    cfg = resolve_preprocess(preprocess, model)
    assert cfg is not None
    return {"resize": cfg.resize, "crop": cfg.crop, "interpolation": cfg.interpolation}


def preset_geometry(preset: Any) -> Optional[Tuple[int, int, T.InterpolationMode]]:
    """``(resize, crop, interpolation)`` of a preset name or ``PreprocessConfig``, or ``None``
    for ``None``."""
    if preset == MODEL:
        raise ValueError(f"preprocess='{MODEL}' needs the model: resolve it first "
                         "(resolve_preprocess)")
    cfg = resolve_preprocess(preset)
    return _geometry(cfg) if cfg is not None else None


def transform_from_config(cfg: Optional[pp.PreprocessConfig]
                          ) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised float tensor [3, H, W] for a preprocessing config (``None``:
    no resizing, ImageNet mean/std)."""
    ops = []
    if cfg is not None:
        resize, crop, interp = _geometry(cfg)
        ops += [T.Resize(resize, interpolation=interp, antialias=True), T.CenterCrop(crop)]
    mean, std = (cfg.mean, cfg.std) if cfg is not None else (pp.IMAGENET_MEAN, pp.IMAGENET_STD)
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def build_transform(preset: Optional[str] = "transfer") -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised float tensor [3, H, W] for a preset."""
    preset_geometry(preset)  # validates the name
    return transform_from_config(pp.PRESETS[preset] if preset is not None else None)


def get_transform(name_or_model: Any = None, preset: Optional[str] = None
                  ) -> Callable[[Image.Image], torch.Tensor]:
    """The torchvision transform (PIL RGB image -> normalised tensor) for a set of weights.

    ``name_or_model`` is a registry name or alias, a loaded :class:`~trex_hub.TReX` model (its
    ``pretrained_cfg``), a :class:`~trex_hub.preprocess.PreprocessConfig`, or ``None`` (the
    ``"transfer"`` preset). ``preset="transfer"`` or ``"imagenet"`` replaces the resize, crop
    and interpolation by that preset's, keeping the weights' mean and std.
    """
    if name_or_model is None or isinstance(name_or_model, pp.PreprocessConfig):
        cfg = pp.as_preprocess_config(name_or_model)
    elif isinstance(name_or_model, str):
        if not registry.is_known(name_or_model):
            raise ValueError(
                f"get_transform: '{name_or_model}' is not a registry model; pass a registry "
                f"name ({', '.join(registry.list_models())}), a loaded model "
                "(get_transform(trex_hub.load(path_or_hf_id))), a PreprocessConfig or None")
        cfg = registry.get_entry(name_or_model).preprocess
    elif isinstance(getattr(name_or_model, "preprocess_config", None), pp.PreprocessConfig):
        cfg = name_or_model.preprocess_config
    else:
        raise TypeError(f"get_transform takes a registry name, a TReX model, a PreprocessConfig "
                        f"or None, not {type(name_or_model).__name__}")
    if preset is not None:
        preset_geometry(preset)  # validates the name
        geo = pp.PRESETS[preset]
        cfg = replace(cfg, resize=geo.resize, crop=geo.crop, interpolation=geo.interpolation)
    return transform_from_config(cfg)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, 16-bit and float scaled, palettes and alpha
    flattened onto white, CMYK/YCbCr/LAB converted."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            top = arr.max() if arr.size else 0
            arr = arr / 257.0 if top > 255 else arr
        else:  # float images: 0..1 if they look normalised, else clip to 0..255
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray, what: str) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageLoadError(f"{what}: numpy arrays must be uint8 HxW or HxWxC (got dtype "
                             f"{arr.dtype}); convert with (x * 255).astype('uint8') or pass a "
                             "normalised float tensor")
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        if arr.shape[2] == 1:
            return Image.fromarray(arr[:, :, 0], mode="L").convert("RGB")
        if arr.shape[2] == 4:
            return to_rgb(Image.fromarray(arr, mode="RGBA"))
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    raise ImageLoadError(f"{what}: array of shape {arr.shape} is not an HxW or HxWxC image "
                         "(C = 1, 3 or 4)")


def pixel_limit(max_pixels: Optional[int]) -> int:
    """The most pixels an image may have under ``max_pixels`` (``None``: PIL's limit; 0: the
    ceiling, which no setting lifts), for every decoder."""
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or 0
    return min(max_pixels, MAX_PIXELS_CEILING) if max_pixels > 0 else MAX_PIXELS_CEILING


def resized_size(width: int, height: int, resize: int) -> Tuple[int, int]:
    """``(width, height)`` after ``Resize(resize)``: the shorter side made ``resize``, the longer
    scaled and truncated (torchvision's rule for an int size)."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


#: the resized copy may always be this many times ``resize ** 2`` (an aspect ratio of 64): a
#: small ``--max-pixels`` (thumbnails) bounds the source, not the resize that every image needs
RESIZE_ASPECT_FLOOR = 64


def _resize_budget(resize: int, limit: int) -> int:
    return max(limit, RESIZE_ASPECT_FLOOR * resize * resize)


def resized_pixels_ok(width: int, height: int, resize: int, limit: int) -> bool:
    """Whether ``Resize(resize)`` of a ``width x height`` image stays within the pixel budget:
    ``limit``, but never less than :data:`RESIZE_ASPECT_FLOOR` ``* resize ** 2``. A file of a
    few bytes with an extreme aspect ratio (1 x 20,000 px) passes the decompression-bomb check,
    then resizing its shorter side to 224 px made a 224 x 4,480,000 image (5 GB, 13 s) that the
    centre crop throws away."""
    w, h = resized_size(width, height, resize)
    return w * h <= _resize_budget(resize, limit)


def _resize_refused(width: int, height: int, resize: int, limit: int,
                    what: str) -> ImageLoadError:
    w, h = resized_size(width, height, resize)
    return ImageLoadError(f"{what}: refused: resizing {width}x{height} to a shorter side of "
                          f"{resize} px would make {w}x{h} = {w * h} pixels, over the limit "
                          f"of {_resize_budget(resize, limit)} (an extreme aspect ratio)")


def _draft(img: Image.Image, draft_size: Optional[int]) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while the shorter side stays at least
    ``draft_size`` (only when that saves at least half of each side)."""
    if not draft_size or img.format != "JPEG":
        return
    w, h = img.size
    scale = min(w, h) / draft_size
    if scale >= 2:
        img.draft("RGB", (int(w / scale + 0.999), int(h / scale + 0.999)))


def open_image(item: Any, what: str = "image", draft_size: Optional[int] = None,
               max_pixels: Optional[int] = None) -> Image.Image:
    """Turn a path, PIL image, uint8 numpy array or uint8 CxHxW tensor into an RGB PIL image.

    ``draft_size`` lets JPEG decoding skip resolution it would throw away (the image stays at
    least that large on its shorter side). Files with more than ``max_pixels`` pixels are refused
    as decompression bombs before decoding (default: ``PIL.Image.MAX_IMAGE_PIXELS``, about 89
    megapixels; ``0`` means up to :data:`MAX_PIXELS_CEILING`, which no setting lifts).
    Raises :class:`ImageLoadError` naming ``what``.
    """
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        what = f"{what} ({path})"
        limit = pixel_limit(max_pixels)
        try:
            with Image.open(path) as img:
                w, h = img.size
                if w * h > limit:
                    raise Image.DecompressionBombError(
                        f"{w}x{h} = {w * h} pixels, over the limit of {limit}")
                _draft(img, draft_size)
                img.load()
                return to_rgb(img)
        except FileNotFoundError:
            raise ImageLoadError(f"{what}: no such file") from None
        except IsADirectoryError:
            raise ImageLoadError(f"{what}: is a directory") from None
        except Image.DecompressionBombError as exc:
            raise ImageLoadError(f"{what}: decompression bomb refused ({exc})") from None
        except MemoryError:
            raise ImageLoadError(f"{what}: out of memory while decoding") from None
        except Exception as exc:  # PIL raises many types on malformed files
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            hint = "empty file" if size == 0 else f"{type(exc).__name__}: {exc}"
            raise ImageLoadError(f"{what}: not a readable image ({hint})") from None
    if isinstance(item, Image.Image):
        try:
            item.load()
            return to_rgb(item)
        except (OSError, ValueError) as exc:
            raise ImageLoadError(f"{what}: unusable PIL image ({exc})") from None
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, what)
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] not in (1, 3, 4):
            raise ImageLoadError(f"{what}: tensors must be uint8 CxHxW (C = 1, 3 or 4) or a "
                                 f"normalised float batch; got {item.dtype} {tuple(item.shape)}")
        return _array_to_pil(item.permute(1, 2, 0).cpu().numpy(), what)
    raise ImageLoadError(f"{what}: unsupported input type {type(item).__name__}; pass a path, "
                         "a PIL image, a uint8 numpy array or tensor, or a float batch")


class Decoder:
    """An input item -> uint8 ``[H, W, 3]`` numpy array, resized and cropped by a preset.

    The geometry is torchvision's own ``Resize`` / ``CenterCrop`` on the PIL image (so pixels
    match ``build_transform`` exactly when ``draft`` is off); the float conversion and mean/std
    normalisation are left to the batch (:class:`trex_hub.inference.InferenceModel`), where
    they run once per batch, in place, in channels_last layout.

    ``draft=True`` decodes large JPEGs at a reduced scale (see :func:`open_image`): several
    times faster on photos much larger than the target, at the price of slightly different
    pixels. Images that are already small are decoded exactly either way.
    """

    def __init__(self, preset: Any = "transfer", draft: bool = True,
                 max_pixels: Optional[int] = None,
                 mean: Sequence[float] = pp.IMAGENET_MEAN, std: Sequence[float] = pp.IMAGENET_STD):
        geo = preset_geometry(preset)
        self.preset = preset
        self.config: Optional[pp.PreprocessConfig] = resolve_preprocess(preset)
        # the weights' normalisation, for the rare batch that mixes decoded images with
        # already normalised tensors (every other batch is normalised by the inference model)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_pixels = max_pixels
        self.resize = geo[0] if geo else None
        self.draft_size = geo[0] if (geo and draft) else None
        self.ops = []
        if geo is not None:
            resize, crop, interp = geo
            self.ops = [T.Resize(resize, interpolation=interp, antialias=True),
                        T.CenterCrop(crop)]

    def __call__(self, item: Any, what: str = "image") -> np.ndarray:
        img = open_image(item, what, draft_size=self.draft_size, max_pixels=self.max_pixels)
        limit = pixel_limit(self.max_pixels)
        if self.resize is not None and not resized_pixels_ok(*img.size, self.resize, limit):
            # named as open_image names a file
            named = f"{what} ({item})" if isinstance(item, (str, os.PathLike)) else what
            raise _resize_refused(*img.size, self.resize, limit, named)
        for op in self.ops:
            img = op(img)
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:  # pragma: no cover
            raise ImageLoadError(f"{what}: decoded to an unexpected array {arr.dtype} "
                                 f"{arr.shape}")
        return arr
