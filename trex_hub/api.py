"""The one funnel from a model name, a path or a Hub id to a ready :class:`TReX` model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import registry
from .checkpoint import Checkpoint, CheckpointError, build_model, read_checkpoint
from .model import TReX

HF_PREFIX = "hf-hub:"

PathLike = Union[str, "os.PathLike[str]"]


class ModelLoadError(ValueError):
    """A request ``load()`` cannot satisfy; the message says which model or option to use."""


def list_models() -> list:
    """Names of the released models: ``['trex', 'trex_repro', 'trex_star', 'trex_star_repro']``."""
    return registry.list_models()


def model_info(name: str) -> dict:
    """Registry facts of a model (files, projector config, metrics, licence, citation)."""
    return registry.model_info(name)


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for but CUDA is not available here; "
                             "use device='cpu'")
    return dev


def _projector_holders() -> str:
    return ", ".join(e.name for e in registry.MODELS.values() if e.has_projector)


def _fetch_registry_file(entry: registry.ModelEntry, file: registry.FileInfo, *,
                         cache_dir: Optional[PathLike], progress: bool,
                         base_url: Optional[str]) -> Path:
    from .hub import download

    return download.fetch(file.filename, base_url=base_url, cache_dir=cache_dir,
                          sha256=file.sha256, progress=progress)


def _read_registry_checkpoint(entry: registry.ModelEntry, *, projector: bool, ema: bool,
                              cache_dir: Optional[PathLike], progress: bool,
                              base_url: Optional[str]) -> Checkpoint:
    file = entry.full_file if (projector or ema) else entry.backbone_file
    assert file is not None
    path = _fetch_registry_file(entry, file, cache_dir=cache_dir, progress=progress,
                                base_url=base_url)
    try:
        ckpt = read_checkpoint(path, ema=ema)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} [model '{entry.name}', cached file {path}]") from None
    if ckpt.config["arch"] != entry.arch:
        raise CheckpointError(f"{path}: holds a {ckpt.config['arch']} but '{entry.name}' is a "
                              f"{entry.arch}; delete the file and download it again")
    return ckpt


def load(name_or_path: PathLike, *, projector: bool = False,
         device: Union[str, torch.device, None] = None, pretrained: bool = True,
         ema: bool = False, cache_dir: Optional[PathLike] = None, progress: bool = True,
         base_url: Optional[str] = None, **kwargs: Any) -> TReX:
    """Load a t-ReX model, ready for inference (eval mode).

    Args:
        name_or_path: a registry name or alias (``"trex"``, ``"trex_star"``, ``"t-ReX*"``...),
            a local checkpoint (released ``.pth`` file, full training checkpoint, ``.safetensors``
            file, or an exported folder), or ``"hf-hub:org/repo[@revision]"``.
        projector: keep the expendable projector (and the OCM prototypes when present), so that
            ``extract`` returns 256-d embeddings and ``classify`` works. Only models released
            with their full training checkpoint carry it.
        device: where to put the model (default CPU).
        pretrained: ``False`` builds the architecture with random weights (no download).
        ema: use the EMA copy of a full training checkpoint instead of the online network.
        cache_dir: download cache (default ``$TREX_HUB_CACHE`` or ``~/.cache/trex_hub``).
        progress: show a download progress bar.
        base_url: mirror to download from instead of ``$TREX_HUB_BASE_URL`` / the official URL.
        **kwargs: passed to the Hugging Face Hub download for ``hf-hub:`` ids (``revision``,
            ``token``...).
    """
    dev = _resolve_device(device)
    name = os.fspath(name_or_path)
    model: TReX
    if isinstance(name_or_path, str) and name.startswith(HF_PREFIX):
        from .hub import hf

        folder = hf.download_model(name[len(HF_PREFIX):], cache_dir=cache_dir, **kwargs)
        model = _from_checkpoint(read_checkpoint(folder, ema=ema), projector, name)
    elif isinstance(name_or_path, str) and registry.is_known(name):
        if kwargs:
            raise TypeError(f"unexpected arguments for a registry model: {sorted(kwargs)}")
        entry = registry.get_entry(name)
        if (projector or ema) and not entry.has_projector:
            what = "projector=True" if projector else "ema=True"
            raise ModelLoadError(
                f"'{entry.name}' was released as a backbone only, so {what} is not available. "
                f"Models released with the projector, OCM prototypes and EMA copy: "
                f"{_projector_holders()}.")
        if not pretrained:
            model = TReX(arch=entry.arch, projector=entry.projector if projector else None,
                         name=entry.name)
        else:
            ckpt = _read_registry_checkpoint(entry, projector=projector, ema=ema,
                                             cache_dir=cache_dir, progress=progress,
                                             base_url=base_url)
            model = _from_checkpoint(ckpt, projector, entry.name)
    else:
        if kwargs:
            raise TypeError(f"unexpected arguments for a local checkpoint: {sorted(kwargs)}")
        path = Path(name).expanduser()
        if not path.exists():
            registry.get_entry(name)  # raises with the known names and the closest match
        ckpt = read_checkpoint(path, ema=ema)
        if not pretrained:
            cfg = dict(ckpt.config, classifier=None)
            if not projector:
                cfg["projector"] = None
            model = TReX.from_config(cfg)
        else:
            model = _from_checkpoint(ckpt, projector, ckpt.config.get("name") or path.name)
    return model.to(dev).eval()


def _from_checkpoint(ckpt: Checkpoint, projector: bool, name: str) -> TReX:
    if projector and not ckpt.has_projector:
        raise ModelLoadError(
            f"{ckpt.source}: this checkpoint has no projector weights ({ckpt.format} format), so "
            f"projector=True is not available. Released models with a projector: "
            f"{_projector_holders()}.")
    return build_model(ckpt, projector=projector, name=name)
