"""Export a model in the zoo's folder format, and publish it on the Hugging Face Hub.

``save_pretrained`` writes ``model.safetensors`` + ``config.json`` (through
:func:`trex_hub.checkpoint.save_safetensors`) and the model card (:mod:`trex_hub.cards`);
``push_to_hub`` uploads that folder (:mod:`trex_hub.hub.hf`).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .cards import render_card
from .checkpoint import save_safetensors
from .dense import FeatureMaps
from .fileio import CARD_NAME, CONFIG_NAME, PathLike, atomic_write
from .hub import hf
from .model import TReX
from .provenance import check_license


def save_pretrained(model: Any, folder: PathLike, *, name: Optional[str] = None,
                    repo_id: Optional[str] = None, license: Optional[str] = None,
                    extra_config: Optional[Dict[str, Any]] = None,
                    format: str = "trex_hub") -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (model card) into ``folder``.

    ``trex_hub.load(folder)`` (or ``load("hf-hub:...")`` once pushed) rebuilds the same model with
    bit-identical outputs and the same preprocessing. ``name`` picks the registry facts for the
    card (default: the model's own name). ``format="timm"`` writes the backbone in timm's layout
    instead (:mod:`trex_hub.timm_format`), for ``timm.create_model("hf-hub:...")``.
    ``config.json`` records the weights' licence (``license``, else the one they were loaded
    with, else the release's) and, for a release's weights changed since they were loaded, that
    they derive from it: the card then says so instead of repeating the release's.
    A ``license`` that would not load back (not one line of short printable text) is a
    ``ValueError`` before anything is written.
    """
    _check_savable(model, license)
    if format == "timm":
        from .timm_format import save_timm

        return save_timm(model, folder, name=name, license=license, repo_id=repo_id)
    if format != "trex_hub":
        raise ValueError(f"format={format!r}: use 'trex_hub' (default) or 'timm'")
    folder = Path(folder)
    save_safetensors(model, folder, extra_config=extra_config, name=name, license=license)
    config = json.loads((folder / CONFIG_NAME).read_text())
    card = render_card(config, name=name or config.get("name"), repo_id=repo_id,
                       license=config.get("license"))
    text = str(card).encode("utf-8")
    atomic_write(folder / CARD_NAME, lambda fh: fh.write(text))
    return folder


def _check_savable(model: Any, license: Optional[str] = None) -> None:
    """One line for what save_pretrained cannot write (before any file is written)."""
    check_license(license)
    if isinstance(model, FeatureMaps):
        raise ValueError("save_pretrained: this model was loaded with features_only=True (a "
                         "FeatureMaps view of the backbone); save the model loaded without "
                         "features_only=True instead: the weights are the same")
    if not isinstance(model, TReX):
        raise TypeError(f"save_pretrained takes a t-ReX model (trex_hub.load(...)), not a "
                        f"{type(model).__name__}")


def push_to_hub(model: Any, repo_id: str, *, token: Union[str, bool, None] = None,
                private: Optional[bool] = None, revision: Optional[str] = None,
                commit_message: str = "Upload t-ReX model (trex_hub)",
                create_repo: bool = True, endpoint: Optional[str] = None,
                name: Optional[str] = None, license: Optional[str] = None) -> str:
    """Export ``model`` with :func:`save_pretrained` and upload it to ``repo_id``; returns the
    commit URL. ``trex_hub.load(f"hf-hub:{repo_id}")`` loads it back. ``"org/repo@branch"`` (or
    ``revision="branch"``) uploads to that branch, created from ``main`` when it does not exist
    yet; a commit id is refused (an upload is a new commit on a branch)."""
    repo_id, revision = hf.parse_hf_id(repo_id, revision)
    _check_savable(model, license)  # before anything is written or uploaded
    with tempfile.TemporaryDirectory(prefix="trex_hub_push_") as tmp:
        save_pretrained(model, tmp, name=name, repo_id=repo_id, license=license)
        return hf.upload_folder(tmp, repo_id, token=token, private=private, revision=revision,
                                commit_message=commit_message, create_repo=create_repo,
                                endpoint=endpoint)
