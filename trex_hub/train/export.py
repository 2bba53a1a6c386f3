"""``trex-train export CKPT OUT``: a training checkpoint -> the zoo's folder format.

The folder holds ``model.safetensors`` + ``config.json`` + a model card ``README.md`` (written by
:func:`trex_hub.publish.save_pretrained`) and loads with ``trex_hub.load(OUT, projector=True)``; an OCM checkpoint's prototypes (computed from its
memory) and class names come along, so ``classify`` works on the exported model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..checkpoint import build_model, read_checkpoint
from ..fileio import PathLike
from ..publish import save_pretrained

_TRAINING_KEYS = ("preset", "arch", "epochs", "batch_size", "world_size", "lr", "peak_lr",
                  "weight_decay", "tau", "memory_size", "ema_momentum", "global_crops",
                  "global_size", "global_scale", "local_crops", "local_size", "local_scale",
                  "dataset", "classes", "train_limit", "seed", "amp")


def export_checkpoint(ckpt_path: PathLike, out_dir: PathLike, *, ema: bool = False,
                      name: Optional[str] = None) -> Path:
    """Write the zoo folder for a training checkpoint; returns the folder."""
    ckpt = read_checkpoint(ckpt_path, ema=ema)
    out = Path(out_dir)
    model_name = name or out.name
    model = build_model(ckpt, projector=ckpt.has_projector, name=model_name)
    args = (ckpt.extra or {}).get("args") or {}
    names = args.get("class_names")
    if model.classifier is not None and names and len(names) == model.classifier.num_classes:
        model.classifier.class_names = [str(n) for n in names]
    training = {k: args[k] for k in _TRAINING_KEYS if k in args}
    training["epochs_done"] = (ckpt.extra or {}).get("epoch")
    training["weights"] = "EMA copy" if ema else "online network"
    extra = {"training": training, "source_checkpoint": os.path.basename(os.fspath(ckpt_path))}
    # the card (trex_hub.cards) says these are trained weights, not a released model, because
    # config.json names their source checkpoint
    return save_pretrained(model, out, extra_config=extra)


__all__ = ["export_checkpoint"]
