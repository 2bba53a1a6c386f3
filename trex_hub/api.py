"""The one funnel from a model name, a path or a Hub id to a ready :class:`TReX` model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from . import registry
from .checkpoint import Checkpoint, CheckpointError, build_model, read_checkpoint
from .model import FeatureMaps, TReX
from .fileio import PathLike

HF_PREFIX = "hf-hub:"


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


SOURCES = ("url", "hf")


def _fetch_registry_file(entry: registry.ModelEntry, file: registry.FileInfo, *,
                         cache_dir: Optional[PathLike], progress: bool,
                         base_url: Optional[str], validate: Any = None) -> Path:
    """The verified cached path of one released file (downloaded by local rank 0 under DDP)."""
    from .hub import download

    return download.fetch_distributed(file.filename, base_url=base_url, cache_dir=cache_dir,
                                      sha256=file.sha256, size=file.size, progress=progress,
                                      model=entry.name, validate=validate)


def _check_released(entry: registry.ModelEntry, file: registry.FileInfo, ckpt: Checkpoint,
                    where: str) -> None:
    """Raise unless ``ckpt`` is what ``file`` of ``entry`` must hold (architecture and layout)."""
    if ckpt.config["arch"] != entry.arch:
        raise CheckpointError(f"{where} holds a {ckpt.config['arch']}, but '{entry.name}' is a "
                              f"{entry.arch}")
    if file.kind == "full" and ckpt.format != "full":
        raise CheckpointError(f"{where} is a {ckpt.format} checkpoint, but '{file.filename}' "
                              "must be a full training checkpoint")
    if file.kind == "backbone" and ckpt.has_projector:
        raise CheckpointError(f"{where} carries a projector, but '{file.filename}' must be a "
                              "backbone-only state dict")


def _read_hf_mirror(entry: registry.ModelEntry, *, projector: bool, ema: bool,
                    cache_dir: Optional[PathLike]) -> Checkpoint:
    if not entry.hf_repo:
        with_hf = [e.name for e in registry.MODELS.values() if e.hf_repo]
        raise ModelLoadError(
            f"'{entry.name}' has no Hugging Face Hub mirror, so source='hf' is not available; "
            "drop source='hf' to download the released file"
            + (f" (models with an HF mirror: {', '.join(with_hf)})" if with_hf else ""))
    if ema:
        raise ModelLoadError(f"the Hugging Face Hub mirror of '{entry.name}' holds the online "
                             "network only; ema=True needs source='url'")
    from .hub import hf

    folder = hf.download_model(entry.hf_repo, cache_dir=cache_dir)
    ckpt = read_checkpoint(folder)
    if ckpt.config["arch"] != entry.arch:
        raise CheckpointError(f"hf-hub:{entry.hf_repo} holds a {ckpt.config['arch']}, but "
                              f"'{entry.name}' is a {entry.arch}")
    return ckpt


def _read_registry_checkpoint(entry: registry.ModelEntry, *, projector: bool, ema: bool,
                              cache_dir: Optional[PathLike], progress: bool,
                              base_url: Optional[str], source: Optional[str] = None
                              ) -> Checkpoint:
    """Fetch (or find in the cache) and read the released file a request needs.

    A freshly downloaded file is read before it is renamed into the cache: one that is not a
    loadable checkpoint of the expected architecture and layout is rejected and not kept. A
    cached file that cannot be read is deleted (with its trust-on-first-use manifest when the
    manifest vouches for those very bytes) so that the next call downloads it again.
    """
    if source not in (None, *SOURCES):
        raise ModelLoadError(f"source={source!r} is not one of {', '.join(map(repr, SOURCES))}")
    if source == "hf":
        return _read_hf_mirror(entry, projector=projector, ema=ema, cache_dir=cache_dir)
    file = entry.full_file if (projector or ema) else entry.backbone_file
    assert file is not None
    from .hub import download

    fresh: dict = {}

    def validate(tmp: Path) -> None:
        url = download.file_url(file.filename, base_url, entry.name)
        try:
            ckpt = read_checkpoint(tmp, ema=ema)
            _check_released(entry, file, ckpt, "it")
        except CheckpointError as exc:
            reason = str(exc).replace(f"{tmp}: ", "").replace(str(tmp), "the file")
            raise CheckpointError(
                f"'{entry.name}': the file downloaded from {url} is not a loadable {entry.arch} "
                f"checkpoint in the released layout ({reason}); rejected, not kept in the cache. "
                "Check the mirror setting TREX_HUB_BASE_URL / base_url=.") from None
        fresh["ckpt"] = ckpt

    path = _fetch_registry_file(entry, file, cache_dir=cache_dir, progress=progress,
                                base_url=base_url, validate=validate)
    ckpt = fresh.get("ckpt")
    if ckpt is None:  # served from the cache
        try:
            ckpt = read_checkpoint(path, ema=ema)
            _check_released(entry, file, ckpt, str(path))
        except CheckpointError as exc:
            man = download.read_manifest(path)
            bad_bytes_recorded = man is not None and download.sha256_of(path) == man["sha256"]
            download.remove_cached(path, manifest=bad_bytes_recorded)
            raise CheckpointError(f"{exc} [model '{entry.name}': the cached file {path} has been "
                                  "deleted; run again to download it]") from None
    ckpt.source = str(path)
    return ckpt


def load(name_or_path: PathLike, *, projector: bool = False,
         device: Union[str, torch.device, None] = None, pretrained: bool = True,
         ema: bool = False, cache_dir: Optional[PathLike] = None, progress: bool = True,
         base_url: Optional[str] = None, source: Optional[str] = None,
         features_only: bool = False, out_indices: Sequence[int] = (1, 2, 3, 4),
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
        pretrained: ``False`` builds the architecture with random weights (no download).
        ema: use the EMA copy of a full training checkpoint instead of the online network.
        cache_dir: download cache (default ``$TREX_HUB_CACHE`` or ``~/.cache/trex_hub``).
        progress: show a download progress bar.
        base_url: mirror to download from instead of ``$TREX_HUB_BASE_URL`` / the official URL
            (``trex_hub.hub.download.set_mirror(name, url)`` sets one per model).
        source: for registry models, ``"hf"`` loads the entry's Hugging Face Hub mirror instead
            of the released file (only when asked: the default never changes silently).
        features_only: return a :class:`~trex_hub.model.FeatureMaps` whose forward gives the
            backbone's stage outputs at ``out_indices`` (0 = stem, 1-4 = ``layer1..4``) as a
            list, with timm's ``feature_info`` (for FPN / detection / segmentation heads).
        **kwargs: passed to the Hugging Face Hub download for ``hf-hub:`` ids (``revision``,
            ``token``...).
    """
    if features_only and projector:
        raise ModelLoadError("features_only=True returns the backbone's stage outputs, which "
                             "the projector does not use: drop projector=True")
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
                                             base_url=base_url, source=source)
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
    if features_only:  # a post-load wrap: the same weights, stage outputs as a list
        return FeatureMaps(model, out_indices).to(dev).eval()  # type: ignore[return-value]
    return model.to(dev).eval()


def _from_checkpoint(ckpt: Checkpoint, projector: bool, name: str) -> TReX:
    if projector and not ckpt.has_projector:
        raise ModelLoadError(
            f"{ckpt.source}: this checkpoint has no projector weights ({ckpt.format} format), so "
            f"projector=True is not available. Released models with a projector: "
            f"{_projector_holders()}.")
    return build_model(ckpt, projector=projector, name=name)
