"""The one funnel from a model name, a path or a Hub id to a ready :class:`TReX` model.

``load`` = :func:`trex_hub.resolve.resolve` (where are the weights?) then
:func:`trex_hub.loader.build` (read them, build the model).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from . import registry
from .fileio import PathLike
from .dense import FeatureMaps, check_options
from .loader import build
from .model import TReX
from .resolve import HUB, ModelLoadError, resolve

__all__ = ["load", "list_models", "model_info", "ModelLoadError"]


def list_models() -> list:
    """Names of the released models: ``['trex', 'trex_repro', 'trex_star', 'trex_star_repro']``."""
    return registry.list_models()


def model_info(name: str) -> dict:
    """Registry facts of a model (files, projector config, preprocessing, metrics, licence,
    citation)."""
    return registry.model_info(name)


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for but CUDA is not available here; "
                             "use device='cpu'")
    return dev


def load(name_or_path: PathLike, *, projector: bool = False,
         device: Union[str, torch.device, None] = None, pretrained: bool = True,
         ema: bool = False, cache_dir: Optional[PathLike] = None, progress: bool = True,
         base_url: Optional[str] = None, source: Optional[str] = None,
         features_only: bool = False, out_indices: Union[int, Sequence[int]] = (1, 2, 3, 4),
         frozen_bn: bool = False, trainable_layers: Optional[int] = None,
         **kwargs: Any) -> TReX:
    """Load a t-ReX model, ready for inference (eval mode).

    Args:
        name_or_path: a registry name or alias (``"trex"``, ``"trex_star"``, ``"t-ReX*"``...),
            a local checkpoint (released ``.pth`` file, full training checkpoint, ``.safetensors``
            file, or an exported folder), or ``"hf-hub:org/repo[@revision]"``.
        projector: keep the expendable projector (and the OCM prototypes when present), so that
            ``extract`` returns 256-d embeddings and ``classify`` works. Only models released
            with their full training checkpoint carry it.
        device: where to put the model (default CPU).
        pretrained: ``False`` builds the architecture with random weights and downloads no
            weights, for every kind of argument: a registry model is built from the registry,
            an ``hf-hub:`` id from the repository's ``config.json`` alone, a local checkpoint
            from its own config.
        ema: use the EMA copy of a full training checkpoint instead of the online network.
        cache_dir: download cache (default ``$TREX_HUB_CACHE`` or ``~/.cache/trex_hub``; for
            ``hf-hub:`` ids the Hugging Face cache).
        progress: show a download progress bar.
        base_url: mirror to download from instead of ``$TREX_HUB_BASE_URL`` / the official URL
            (``trex_hub.hub.download.set_mirror(name, url)`` sets one per model).
        source: for registry models, ``"hf"`` loads the entry's Hugging Face Hub mirror instead
            of the released file (only when asked: the default never changes silently).
        features_only: return a :class:`~trex_hub.model.FeatureMaps` whose forward gives the
            backbone's stage outputs at ``out_indices`` (0 = stem, 1-4 = ``layer1..4``; an int
            ``n``: the last ``n`` levels, as in timm) as a list, with timm's ``feature_info``
            (for FPN / detection / segmentation heads).
        frozen_bn, trainable_layers: with ``features_only``, for fine-tuning as torchvision's
            detection backbones do (``frozen_bn=True, trainable_layers=3``): BatchNorm layers
            frozen at the pretrained statistics, and only the last ``trainable_layers`` stages
            (of layer4..layer1, conv1) trainable (:meth:`~trex_hub.dense.FeatureMaps.freeze`).
        **kwargs: passed to the Hugging Face Hub download for ``hf-hub:`` ids and
            ``source="hf"`` (``revision``, ``token``...).

    The model carries its preprocessing (``model.pretrained_cfg``; ``trex_hub.get_transform``).
    """
    if (frozen_bn or trainable_layers is not None) and not features_only:
        raise ModelLoadError("frozen_bn and trainable_layers prepare a features_only=True "
                             "backbone for fine-tuning: add features_only=True")
    if features_only and projector:
        raise ModelLoadError("features_only=True returns the backbone's stage outputs, which "
                             "the projector does not use: drop projector=True")
    if features_only:
        check_options(out_indices, trainable_layers)  # before any download
    dev = _resolve_device(device)
    src = resolve(name_or_path, projector=projector, ema=ema, source=source,
                  revision=kwargs.pop("revision", None))
    if kwargs and src.kind != HUB:
        what = "registry model" if src.entry is not None else "local checkpoint"
        raise TypeError(f"unexpected arguments for a {what}: {sorted(kwargs)}")
    model = build(src, projector=projector, pretrained=pretrained, ema=ema, cache_dir=cache_dir,
                  progress=progress, base_url=base_url, **kwargs)
    if features_only:  # a post-load wrap: the same weights, stage outputs as a list
        maps = FeatureMaps(model, out_indices)
        if frozen_bn or trainable_layers is not None:
            maps.freeze(trainable_layers, frozen_bn=frozen_bn)
        return maps.to(dev).eval()  # type: ignore[return-value]
    return model.to(dev).eval()
