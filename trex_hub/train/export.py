"""``trex-train export CKPT OUT``: a training checkpoint -> the zoo's folder format.

The folder holds ``model.safetensors`` + ``config.json`` (+ a model card ``README.md``) and loads
with ``trex_hub.load(OUT, projector=True)``; an OCM checkpoint's prototypes (computed from its
memory) and class names come along, so ``classify`` works on the exported model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..checkpoint import build_model, read_checkpoint, save_safetensors

_TRAINING_KEYS = ("preset", "arch", "epochs", "batch_size", "world_size", "lr", "peak_lr",
                  "weight_decay", "tau", "memory_size", "ema_momentum", "global_crops",
                  "global_size", "global_scale", "local_crops", "local_size", "local_scale",
                  "dataset", "classes", "train_limit", "seed", "amp")


def _card(name: str, config: Dict[str, Any], training: Dict[str, Any]) -> str:
    clf = config.get("classifier") or {}
    proj = config.get("projector")
    lines = [
        "---",
        "library_name: trex_hub",
        "tags:",
        "- image-feature-extraction",
        "- t-ReX",
        "---",
        "",
        f"# {name}",
        "",
        "A model trained with `trex-train` (trex_hub), following the t-ReX recipe of Sariyildiz "
        "et al., *No Reason for No Supervision: Improved Generalization in Supervised Models*, "
        "ICLR 2023. It is **not** one of the released t-ReX / t-ReX* checkpoints (those are "
        "licensed CC BY-NC-SA 4.0 by their authors); the terms of these weights are those of "
        "the data they were trained on and of whoever trained them.",
        "",
        f"- backbone: torchvision `{config.get('arch')}`, {config.get('num_features')}-d pooled "
        "features",
        f"- projector: {proj if proj else 'none'}",
        f"- classifier: {clf.get('num_classes', 'none')} classes, cosine prototypes, "
        f"tau {clf.get('tau', '-')}" if clf else "- classifier: none",
        "",
        "## Training",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in training.items()]
    lines += ["", "## Use", "", "```python", "import trex_hub",
              f"model = trex_hub.load('{name}', projector={bool(proj)})",
              "feats = model.extract(['image.jpg'])", "```", ""]
    return "\n".join(lines)


def export_checkpoint(ckpt_path: Union[str, "os.PathLike[str]"],
                      out_dir: Union[str, "os.PathLike[str]"], *, ema: bool = False,
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
    from .. import registry

    # the Hub writer (model card from huggingface_hub), except under a released model's name,
    # whose card would describe the released weights
    save_pretrained = None
    if not registry.is_known(model_name):
        try:
            from ..hub.hf import save_pretrained
        except ImportError:
            save_pretrained = None
    if save_pretrained is not None:
        save_pretrained(model, out, extra_config=extra)
        card = out / "README.md"
        section = _card(model_name, model.config(), training).split("## Training", 1)[1]
        section = section.split("## Use", 1)[0]
        card.write_text(card.read_text().rstrip() + "\n\n## Training (trex-train)\n\nTrained with "
                        "`trex-train`; not one of the released t-ReX checkpoints.\n" + section)
        return out
    save_safetensors(model, out, extra_config=extra)
    (out / "README.md").write_text(_card(model_name, model.config(), training))
    return out


__all__ = ["export_checkpoint"]
