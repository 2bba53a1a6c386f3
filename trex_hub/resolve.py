"""Resolve once: any argument of ``load()`` -> one description of where the weights are.

``resolve("t-ReX*")``, ``resolve("runs/x/checkpoint.pth")``, ``resolve("hf-hub:org/repo@v1")``
and ``resolve("trex_star", source="hf")`` each return a :class:`WeightsSource`; the loader
(:mod:`trex_hub.loader`) reads and builds from it without looking at the argument again. Every
check that depends only on the request (is there a projector to keep? an EMA copy? a Hub
mirror?) happens here, before anything is downloaded.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import registry
from .fileio import PathLike
from .hub.hf import HF_PREFIX, is_hf_id, parse_hf_id

SOURCES = ("url", "hf")

#: the kinds of :class:`WeightsSource`
RELEASE, HUB, LOCAL = "release", "hf", "local"


class ModelLoadError(ValueError):
    """A request ``load()`` cannot satisfy; the message says which model or option to use."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights of one ``load()`` request are.

    ``kind`` is ``"release"`` (a file of a registry ``entry``, from the official server or a
    mirror, cached by ``hub/cache.py``), ``"hf"`` (a Hugging Face Hub repository ``hf_repo`` at
    ``revision``; ``entry`` is set when it is a registry model's Hub mirror) or ``"local"`` (a
    file or folder at ``path``). ``name`` is the name the model gets.
    """

    kind: str
    name: str
    entry: Optional[registry.ModelEntry] = None
    file: Optional[registry.FileInfo] = None
    hf_repo: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[Path] = None

    @property
    def hf_id(self) -> str:
        return f"{HF_PREFIX}{self.hf_repo}" + (f"@{self.revision}" if self.revision else "")


def _registry_source(entry: registry.ModelEntry, *, projector: bool, ema: bool,
                     source: Optional[str], revision: Optional[str]) -> WeightsSource:
    if (projector or ema) and not entry.has_projector:
        what = "projector=True" if projector else "ema=True"
        raise ModelLoadError(
            f"'{entry.name}' was released as a backbone only, so {what} is not available. "
            f"Models released with the projector, OCM prototypes and EMA copy: "
            f"{', '.join(registry.projector_models())}.")
    if source == "hf":
        if not entry.hf_repo:
            with_hf = [e.name for e in registry.MODELS.values() if e.hf_repo]
            raise ModelLoadError(
                f"'{entry.name}' has no Hugging Face Hub mirror, so source='hf' is not available; "
                "drop source='hf' to download the released file"
                + (f" (models with an HF mirror: {', '.join(with_hf)})" if with_hf else
                   " (no released model has a Hub mirror yet; a copy pushed with push_to_hub "
                   "loads as 'hf-hub:org/repo')"))
        if ema:
            raise ModelLoadError(f"the Hugging Face Hub mirror of '{entry.name}' holds the online "
                                 "network only; ema=True needs source='url'")
        repo, rev = parse_hf_id(entry.hf_repo, revision)
        return WeightsSource(HUB, entry.name, entry=entry, hf_repo=repo, revision=rev)
    if revision is not None:
        raise TypeError(f"revision= applies to hf-hub: ids and source='hf', not to "
                        f"'{entry.name}' from its released files")
    file = entry.full_file if (projector or ema) else entry.backbone_file
    assert file is not None  # has_projector checked above
    return WeightsSource(RELEASE, entry.name, entry=entry, file=file)


#: endings of checkpoint files: a name with one is a path, never a registry name
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors", ".json")


def _looks_like_a_path(text: str) -> bool:
    """A string no registry name can be: it has a folder separator, starts like a path or ends
    like a checkpoint file."""
    return (os.sep in text or "/" in text or text.startswith((".", "~"))
            or text.lower().endswith(_CHECKPOINT_SUFFIXES))


def _nearest_folder(path: Path) -> str:
    """Where a missing path stops existing, so a typo is found at a glance."""
    for parent in path.absolute().parents:
        if parent.is_dir():
            return f" ({parent} exists; {path.absolute().relative_to(parent)} in it does not)"
    return ""


def resolve(name_or_path: PathLike, *, projector: bool = False, ema: bool = False,
            source: Optional[str] = None, revision: Optional[str] = None) -> WeightsSource:
    """Where the weights of ``name_or_path`` are (see the module doc).

    Raises :class:`ModelLoadError` for a request no source can satisfy,
    :class:`~trex_hub.registry.UnknownModelError` for a string that is neither a model name nor
    an existing path, and ``ValueError`` for a malformed Hub id.
    """
    if source not in (None, *SOURCES):
        raise ModelLoadError(f"source={source!r} is not one of {', '.join(map(repr, SOURCES))}")
    if not os.fspath(name_or_path).strip():
        raise ModelLoadError(f"an empty model name: give a registry name "
                             f"({', '.join(registry.list_models())}), a checkpoint path or an "
                             "hf-hub:org/repo id")
    if is_hf_id(name_or_path):
        name = os.fspath(name_or_path)
        repo, rev = parse_hf_id(name, revision)
        return WeightsSource(HUB, name, hf_repo=repo, revision=rev)
    if isinstance(name_or_path, str) and registry.is_known(name_or_path):
        entry = registry.get_entry(name_or_path)
        if Path(name_or_path).exists():  # the name wins; say how to load the local one
            warnings.warn(f"'{name_or_path}' is the registry model {entry.name}; the local "
                          f"'{name_or_path}' is not used (load './{name_or_path}' for it)",
                          UserWarning, stacklevel=3)
        return _registry_source(entry, projector=projector, ema=ema, source=source,
                                revision=revision)
    path = Path(os.fspath(name_or_path)).expanduser()
    if not path.exists():
        if not isinstance(name_or_path, str) or _looks_like_a_path(name_or_path):
            raise ModelLoadError(f"{path.absolute()}: no such file or folder"
                                 + _nearest_folder(path))
        registry.get_entry(os.fspath(name_or_path))  # raises with the known names and the closest
    if source == "hf" or revision is not None:
        raise ModelLoadError(f"{path}: source='hf' and revision= apply to registry models and "
                             "hf-hub: ids, not to a local checkpoint")
    return WeightsSource(LOCAL, path.name, path=path)
