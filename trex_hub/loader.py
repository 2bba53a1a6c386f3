"""Load once: a :class:`~trex_hub.resolve.WeightsSource` -> a checkpoint -> a :class:`TReX`.

Also home of :func:`fetch`, the verified cached path of a released file, which both
``trex_hub.load`` and ``trex-download`` use. A released file is checked by the cache's hook
(:func:`trex_hub.hub.cache.fetch_checked`): the hook reads it as a checkpoint and requires the
registry's architecture and the released layout, on a fresh download (a bad one is not kept) and
on a cached copy (a bad one is deleted) alike.
"""
from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import mirrors, registry
from .checkpoint import Checkpoint, CheckpointError, build_model, read_checkpoint, read_config
from .fileio import PathLike
from .hub import cache, hf
from .model import TReX, weights_digest
from .resolve import HUB, LOCAL, RELEASE, ModelLoadError, WeightsSource
from .safeload import REDOWNLOAD_HINT


def _check_arch(entry: registry.ModelEntry, ckpt: Checkpoint, where: str) -> None:
    if ckpt.config["arch"] != entry.arch:
        raise CheckpointError(f"{where} holds a {ckpt.config['arch']}, but '{entry.name}' is a "
                              f"{entry.arch}")


def _check_released(entry: registry.ModelEntry, file: registry.FileInfo, ckpt: Checkpoint,
                    where: str) -> None:
    """Raise unless ``ckpt`` is what ``file`` of ``entry`` must hold (architecture and layout)."""
    _check_arch(entry, ckpt, where)
    if file.kind == "full" and ckpt.format != "full":
        raise CheckpointError(f"{where} is a {ckpt.format} checkpoint, but '{file.filename}' "
                              "must be a full training checkpoint")
    if file.kind == "backbone" and ckpt.has_projector:
        raise CheckpointError(f"{where} carries a projector, but '{file.filename}' must be a "
                              "backbone-only state dict")


def _release_check(entry: registry.ModelEntry, file: registry.FileInfo, ema: bool,
                   path: Path) -> Checkpoint:
    """The cache's check hook for a released file: the file read as a checkpoint."""
    try:
        ckpt = read_checkpoint(path, ema=ema)
        _check_released(entry, file, ckpt, str(path))
    except CheckpointError as exc:  # the cache says what happens to the file: not the hint
        raise CheckpointError(f"'{entry.name}': not a loadable {entry.arch} checkpoint in the "
                              f"released layout ({exc.problem})") from None
    return ckpt


def _fetch_release(entry: registry.ModelEntry, file: registry.FileInfo, *, ema: bool = False,
                   cache_dir: Optional[PathLike] = None, base_url: Optional[str] = None,
                   progress: bool = True, offline: Optional[bool] = None
                   ) -> Tuple[Path, Checkpoint]:
    """The verified cached path of a released file and the checkpoint it holds (downloaded by
    local rank 0 first under ``torch.distributed``)."""
    path, ckpt = cache.local_rank_zero_first(
        cache.fetch_checked, file.filename,
        partial(mirrors.file_url, file.filename, base_url, entry.name),  # made when needed
        cache_dir=cache_dir, sha256=file.sha256, size=file.size, progress=progress,
        offline=offline, check=partial(_release_check, entry, file, ema),
        offline_command=partial(mirrors.download_command, file.filename))
    ckpt.source = str(path)
    return path, ckpt


def fetch(name: str, *, full: bool = False, cache_dir: Optional[PathLike] = None,
          base_url: Optional[str] = None, progress: bool = True,
          offline: Optional[bool] = None) -> Path:
    """The verified cached path of a released model's file, downloading it first if needed.

    ``full=False`` gives the backbone file (``trexstar.pth``), ``full=True`` the full training
    checkpoint (projector, OCM memory, EMA copy) of the models released with one. The file is
    checked like ``load()`` checks it: bytes against the registry and the manifest, then read
    as a checkpoint of the right architecture and layout (a bad file is not kept). ``base_url``,
    ``cache_dir`` and ``offline`` behave as in :func:`trex_hub.load`.
    """
    entry = registry.get_entry(name)
    file = entry.full_file if full else entry.backbone_file
    if file is None:
        raise ModelLoadError(f"'{entry.name}' has no full training checkpoint (it was released "
                             f"as a backbone only); models with one: "
                             f"{', '.join(registry.projector_models())}")
    return _fetch_release(entry, file, cache_dir=cache_dir, base_url=base_url,
                          progress=progress, offline=offline)[0]


def read_weights(src: WeightsSource, *, ema: bool = False, cache_dir: Optional[PathLike] = None,
                 progress: bool = True, base_url: Optional[str] = None,
                 **hub_kwargs: Any) -> Checkpoint:
    """The checkpoint ``src`` describes, fetched first when it is remote."""
    if src.kind == RELEASE:
        assert src.entry is not None and src.file is not None
        return _fetch_release(src.entry, src.file, ema=ema, cache_dir=cache_dir,
                              base_url=base_url, progress=progress)[1]
    if src.kind == HUB:
        folder = hf.download_model(src.hf_repo or "", cache_dir=cache_dir, revision=src.revision,
                                   progress=progress, **hub_kwargs)
        ckpt = read_checkpoint(folder, ema=ema)
        if src.entry is not None:  # a registry model's Hub mirror
            _check_arch(src.entry, ckpt, src.hf_id)
        return ckpt
    assert src.path is not None
    return _read_local(src.path, ema)


#: the hint for a file the user named (not one of the cache's, which can be downloaded again)
_LOCAL_HINT = ("Give a checkpoint: a .pth / .safetensors file, or a folder written by "
               "save_pretrained / trex-train export.")


def _read_local(path: Path, ema: bool) -> Checkpoint:
    """A local checkpoint; an unreadable one gets advice about the argument, not "download it
    again", which only fits files of the download cache."""
    try:
        return read_checkpoint(path, ema=ema)
    except CheckpointError as exc:
        if exc.hint != REDOWNLOAD_HINT:
            raise
        raise CheckpointError(exc.problem, _LOCAL_HINT) from None


def read_architecture(src: WeightsSource, *, ema: bool = False,
                      cache_dir: Optional[PathLike] = None, progress: bool = True,
                      **hub_kwargs: Any) -> Dict[str, Any]:
    """The config that rebuilds ``src``'s architecture, without downloading weights: the registry
    entry, the Hub repo's ``config.json`` alone, or the local file's own config."""
    if src.entry is not None:
        return {"arch": src.entry.arch, "projector": asdict(src.entry.projector),
                "classifier": None, "preprocess": src.entry.preprocess.to_dict()}
    if src.kind == HUB:
        return read_config(hf.download_config(src.hf_repo or "", cache_dir=cache_dir,
                                              revision=src.revision, progress=progress,
                                              **hub_kwargs))
    assert src.path is not None
    return _read_local(src.path, ema).config


def _model_name(src: WeightsSource, config: Dict[str, Any]) -> str:
    """A registry model's name, a Hub model's id (a repository can name itself anything,
    a release included: the id says where it came from), a local export's own name."""
    return src.name if src.kind != LOCAL else (config.get("name") or src.name)


def _record_provenance(model: TReX, src: WeightsSource, config: Dict[str, Any]) -> None:
    """Where the weights come from, on ``model.pretrained_cfg`` for the exporters (cards, timm,
    ONNX). ``build_model`` has put the checkpoint's own ``license`` / ``derived_from`` /
    ``release`` there (:func:`trex_hub.provenance.loaded_facts`); a release (or its Hub mirror)
    gets the registry's licence, ``release`` and ``release_digest`` (its weights'
    :func:`~trex_hub.model.weights_digest`, so that an export can tell whether they changed);
    an older export without a licence, named after a release of its architecture, the
    release's licence."""
    cfg = model.pretrained_cfg
    if src.entry is not None:
        if cfg.get("release") != src.entry.name:  # build_model knows a release's cached file
            cfg.update(release=src.entry.name, release_digest=weights_digest(model))
        cfg["license"] = src.entry.license
        return
    named = config.get("name")
    entry = registry.get_entry(named) if registry.is_known(named) else None
    if not cfg.get("license") and entry is not None and entry.arch == config.get("arch"):
        cfg["license"] = entry.license


def build(src: WeightsSource, *, projector: bool = False, pretrained: bool = True,
          ema: bool = False, cache_dir: Optional[PathLike] = None, progress: bool = True,
          base_url: Optional[str] = None, **hub_kwargs: Any) -> TReX:
    """The model ``src`` describes: its weights, or (``pretrained=False``) its architecture with
    random weights and no weights downloaded. ``projector=True`` on weights without a projector
    is a :class:`ModelLoadError` either way."""
    if pretrained:
        ckpt = read_weights(src, ema=ema, cache_dir=cache_dir, progress=progress,
                            base_url=base_url, **hub_kwargs)
        config, where = ckpt.config, f"{ckpt.source}: this checkpoint ({ckpt.format} format)"
    else:
        config = read_architecture(src, ema=ema, cache_dir=cache_dir, progress=progress,
                                   **hub_kwargs)
        where = f"{src.hf_id if src.kind == HUB else src.path}: this model"
    if projector and not config.get("projector"):
        raise ModelLoadError(
            f"{where} has no projector weights (a backbone only, such as a released backbone "
            "file or the export of a run without a projector), so projector=True is not "
            "available: load it without projector=True for its backbone features. Released "
            f"models with a projector: {', '.join(registry.projector_models())}.")
    name = _model_name(src, config)
    preprocess = src.entry.preprocess.to_dict() if src.entry is not None else None
    if pretrained:
        model = build_model(ckpt, projector=projector, name=name, preprocess=preprocess)
        _record_provenance(model, src, config)
        return model
    cfg = dict(config, classifier=None, name=name)  # random weights: no provenance recorded
    if not projector:
        cfg["projector"] = None
    return TReX.from_config(cfg)
