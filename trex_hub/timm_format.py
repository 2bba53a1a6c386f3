"""timm interoperability: write a t-ReX backbone as a timm model folder, and read one back.

A timm folder (what ``timm.models.push_to_hf_hub`` publishes) holds ``model.safetensors`` with
timm's state-dict names, ``config.json`` with ``architecture``, ``num_classes``,
``num_features`` and a ``pretrained_cfg`` (preprocessing, licence, provenance) and a
``README.md``. For the ResNets t-ReX uses, timm's module names are torchvision's (``conv1``,
``bn1``, ``layerK.B.convN``, ``layerK.B.downsample.{0,1}``), so the tensors are the backbone's
own; the folder carries the backbone only (``num_classes = 0``: timm's classifier is an
identity, its pooled output is the 2048-d t-ReX feature).

The ``pretrained_cfg`` encodes the paper's transfer preprocessing (Resize 224 bicubic ->
CenterCrop 224) the way timm does: ``input_size = (3, 224, 224)``, ``crop_pct = 224 / 224 = 1.0``,
``crop_mode = "center"``, ``interpolation = "bicubic"``, so ``timm.data.resolve_data_config``
and ``timm.data.create_transform`` rebuild it.

Neither timm nor safetensors is imported at module level; writing needs safetensors and
huggingface_hub (the model card), reading needs neither timm nor this module's caller to know it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .cards import render_timm_card
from .fileio import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, PathLike, atomic_write
from .preprocess import PRESETS, PreprocessConfig, preprocess_from_timm


# our arch -> timm's architecture name (the same network and module names in both libraries)
TIMM_ARCHITECTURES = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
                      "resnet101": "resnet101", "resnet152": "resnet152"}
PAPER_NAME = "No Reason for No Supervision: Improved Generalization in Supervised Models"
PAPER_ID = "arXiv:2206.15369"
ORIGIN_URL = "https://github.com/naver/trex"


def is_timm_config(config: Any) -> bool:
    """A timm ``config.json`` (``architecture`` key) rather than a trex_hub one (``arch``)."""
    return isinstance(config, dict) and "architecture" in config and "arch" not in config


def pretrained_cfg(arch: str, *, name: Optional[str] = None, license: Optional[str] = None,
                   preprocess: Optional[PreprocessConfig] = None) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` for a t-ReX backbone with the given preprocessing (default:
    the transfer preset)."""
    pre = preprocess or PRESETS["transfer"]
    cfg: Dict[str, Any] = {
        "tag": name or "trex_hub",
        "custom_load": False,
        "input_size": [3, pre.crop, pre.crop],
        "fixed_input_size": False,
        "interpolation": pre.interpolation,
        "crop_pct": round(pre.crop / pre.resize, 6),
        "crop_mode": "center",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "num_classes": 0,
        "pool_size": [pre.crop // 32, pre.crop // 32],
        "first_conv": "conv1",
        "classifier": "fc",
        "origin_url": ORIGIN_URL,
        "paper_name": PAPER_NAME,
        "paper_ids": PAPER_ID,
        "description": "t-ReX backbone exported by trex_hub (pooled features, no classifier)",
    }
    if license:
        cfg["license"] = license
    return cfg


def timm_config(model: Any, *, name: Optional[str] = None,
                license: Optional[str] = None) -> Dict[str, Any]:
    """The ``config.json`` timm reads for ``model``'s backbone."""
    arch = getattr(model, "arch", None)
    if arch not in TIMM_ARCHITECTURES:
        raise ValueError(f"format='timm' supports {', '.join(TIMM_ARCHITECTURES)} backbones; "
                         f"this model is a {arch!r}")
    return {
        "architecture": TIMM_ARCHITECTURES[arch],
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg(arch, name=name, license=license,
                                         preprocess=getattr(model, "preprocess_config", None)),
        # provenance for trex_hub itself; timm ignores keys it does not know
        "trex_hub": {"name": name, "arch": arch, "format": "timm"},
    }


def _registry_facts(name: Optional[str]):
    from . import registry

    return registry.get_entry(name) if name and registry.is_known(name) else None


def save_timm(model: Any, folder: PathLike, *, name: Optional[str] = None,
              license: Optional[str] = None, repo_id: Optional[str] = None) -> Path:
    """Write ``model``'s backbone as a timm folder (``model.safetensors``, ``config.json``,
    ``README.md``); ``timm.create_model("hf-hub:...")`` or ``local-dir:`` loads it.

    ``name`` (default: the model's own name) picks the licence of a released model from the
    registry unless ``license`` is given. A projector or classifier is not exported: timm
    rebuilds the bare backbone.
    """
    from safetensors.torch import save

    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("name")
    entry = _registry_facts(name)
    license = license or (entry.license if entry is not None else None)
    config = timm_config(model, name=name, license=license)
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in model.backbone.state_dict().items() if not k.startswith("fc.")}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blob = save(tensors, metadata={"format": "pt"})
    atomic_write(folder / WEIGHTS_NAME, lambda fh: fh.write(blob))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda fh: fh.write(text.encode()))
    card = render_timm_card(config, name=name, license=license, repo_id=repo_id)
    atomic_write(folder / CARD_NAME, lambda fh: fh.write(card.encode()))
    return folder


# timm's (= torchvision's) plain ResNet names; deep-stem or avg-down variants (resnet50d...) differ
_PLAIN_RESNET_KEY = re.compile(
    r"(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|"
    r"downsample\.[01]\.\w+)|fc\.(weight|bias))$")


def config_from_timm(config: Dict[str, Any]) -> Dict[str, Any]:
    """A timm ``config.json`` -> the trex_hub config that rebuilds the same backbone (arch,
    features, name, preprocessing from its ``pretrained_cfg``). Raises ``ValueError`` (one line:
    what and how to fix) for another architecture."""
    arch_name = str(config.get("architecture"))
    base = arch_name.split(".")[0]  # "resnet50.a1_in1k" -> "resnet50"
    ours = {v: k for k, v in TIMM_ARCHITECTURES.items()}.get(base)
    if ours is None:
        raise ValueError(f"a timm '{arch_name}' model is not a t-ReX backbone; trex_hub loads "
                         f"timm folders of {', '.join(TIMM_ARCHITECTURES)} only (load other "
                         "timm models with timm.create_model)")
    pre = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    extra = config.get("trex_hub") if isinstance(config.get("trex_hub"), dict) else {}
    cfg: Dict[str, Any] = {"arch": ours, "num_features": config.get("num_features"),
                           "projector": None, "classifier": None,
                           "name": extra.get("name") or pre.get("tag")}
    preprocess = preprocess_from_timm(pre)
    if preprocess is not None:
        cfg["preprocess"] = preprocess
    return cfg


def from_timm(state: Dict[str, Any], config: Dict[str, Any]) -> Tuple[Dict[str, Any],
                                                                       Dict[str, Any]]:
    """A timm folder's state dict + config -> (canonical ``backbone.*`` state dict, trex_hub
    config). Raises ``ValueError`` (one line: what and how to fix) for another architecture."""
    cfg = config_from_timm(config)
    base = str(config.get("architecture")).split(".")[0]
    stray = sorted(k for k in state if not _PLAIN_RESNET_KEY.match(k))
    if stray:
        raise ValueError(f"the weights are not timm's plain {base} layout (unexpected "
                         f"{stray[:5]}); re-export them with timm or trex_hub")
    canonical = {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    return canonical, cfg


__all__ = ["save_timm", "from_timm", "config_from_timm", "timm_config", "pretrained_cfg",
           "is_timm_config", "TIMM_ARCHITECTURES"]
