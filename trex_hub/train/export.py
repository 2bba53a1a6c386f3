"""``trex-train export CKPT OUT``: a training checkpoint -> the zoo's folder format.

The folder holds ``model.safetensors`` + ``config.json`` + a model card ``README.md`` (written by
:func:`trex_hub.publish.save_pretrained`) and loads with ``trex_hub.load(OUT)``. A run with a
projector keeps it and its classifier as prototypes, with the class names that
:mod:`trex_hub.checkpoint` reads from the checkpoint's ``args``: the OCM memory's or the learnable
classifier's (``clf.fc``: a cosine classifier's rows as they are, a linear one's normalised and
without its bias), so ``trex_hub.load(OUT, projector=True)`` and ``classify`` work. A run without
a projector (``--preset baseline``, ``--no-projector``) exports its backbone only: ``classify``
scores projector outputs, so its classifier is left out (:func:`left_out` says so).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional

from ..checkpoint import Checkpoint, build_model, read_checkpoint
from ..fileio import PathLike
from ..publish import save_pretrained

_TRAINING_KEYS = ("preset", "arch", "epochs", "batch_size", "world_size", "lr", "peak_lr",
                  "weight_decay", "tau", "memory_size", "ema_momentum", "global_crops",
                  "global_size", "global_scale", "local_crops", "local_size", "local_scale",
                  "dataset", "classes", "train_limit", "seed", "amp")


def left_out(ckpt: Checkpoint) -> List[str]:
    """What of a training checkpoint's classifier its export does not keep as trained, one line
    each: a classifier without a projector (not exported), or a linear classifier (exported as
    cosine prototypes, without its bias)."""
    clf = ckpt.config.get("classifier") or {}
    if clf.get("from") != "linear":  # OCM prototypes, or no classifier: exported as they are
        return []
    kind = ((ckpt.extra or {}).get("args") or {}).get("classifier")
    name = f"the {kind} classifier" if kind in ("linear", "cosine") else "the classifier"
    if not ckpt.has_projector:
        return [f"{name} (clf.fc) is not exported: classify() scores projector outputs and this "
                "run has no projector (--preset baseline or --no-projector); the folder holds "
                "the backbone only"]
    if kind == "linear":
        return [f"{name} (clf.fc) is exported as cosine prototypes (its L2-normalised weight "
                "rows, without its bias): classify() may rank classes differently from it"]
    return []


def export_checkpoint(ckpt_path: PathLike, out_dir: PathLike, *, ema: bool = False,
                      name: Optional[str] = None,
                      note: Optional[Callable[[str], None]] = None) -> Path:
    """Write the zoo folder for a training checkpoint; returns the folder. ``note`` is called
    with each line of :func:`left_out`."""
    ckpt = read_checkpoint(ckpt_path, ema=ema)
    out = Path(out_dir)
    model = build_model(ckpt, projector=ckpt.has_projector, name=name or out.name)
    args = (ckpt.extra or {}).get("args") or {}
    training = {k: args[k] for k in _TRAINING_KEYS if k in args}
    training["epochs_done"] = (ckpt.extra or {}).get("epoch")
    training["weights"] = "EMA copy" if ema else "online network"
    extra = {"training": training, "source_checkpoint": os.path.basename(os.fspath(ckpt_path))}
    # the card (trex_hub.cards) says these are trained weights, not a released model, because
    # config.json names their source checkpoint
    folder = save_pretrained(model, out, extra_config=extra)
    for line in left_out(ckpt) if note is not None else ():
        note(line)
    return folder


__all__ = ["export_checkpoint", "left_out"]
