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
from .preprocess import PRESETS, PreprocessConfig, preprocess_from_timm, timm_crop_pct


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
        "crop_pct": timm_crop_pct(pre),
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
                license: Optional[str] = None, derived_from: Optional[str] = None,
                **origin: str) -> Dict[str, Any]:
    """The ``config.json`` timm reads for ``model``'s backbone; ``origin``: ``release`` /
    ``release_digest`` (:func:`trex_hub.provenance.provenance`)."""
    arch = getattr(model, "arch", None)
    if arch not in TIMM_ARCHITECTURES:
        raise ValueError(f"format='timm' supports {', '.join(TIMM_ARCHITECTURES)} backbones; "
                         f"this model is a {arch!r}")
    ours: Dict[str, Any] = {"name": name, "arch": arch, "format": "timm"}
    if derived_from:
        ours["derived_from"] = derived_from
    ours.update(origin)
    return {
        "architecture": TIMM_ARCHITECTURES[arch],
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg(arch, name=name, license=license,
                                         preprocess=getattr(model, "preprocess_config", None)),
        # provenance for trex_hub itself; timm ignores keys it does not know
        "trex_hub": ours,
    }


def save_timm(model: Any, folder: PathLike, *, name: Optional[str] = None,
              license: Optional[str] = None, repo_id: Optional[str] = None) -> Path:
    """Write ``model``'s backbone as a timm folder (``model.safetensors``, ``config.json``,
    ``README.md``); ``timm.create_model("hf-hub:...")`` or ``local-dir:`` loads it.

    ``name`` (default: the model's own name) names the export. The licence is ``license``, else
    the one the model was loaded with (``pretrained_cfg["license"]``), else the registry's for a
    model of a release's architecture named after it (:func:`trex_hub.provenance.provenance`,
    which refuses a licence that would not load back, before anything is written). A
    projector or classifier is not exported: timm rebuilds the bare backbone.
    """
    from safetensors.torch import save

    from .provenance import provenance

    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("name")
    facts = provenance(model, name=name, license=license, backbone_only=True)
    license = facts.pop("license", None)
    config = timm_config(model, name=name, license=license, **facts)
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


# timm model_args that do not change what the network computes in eval mode (the classifier is
# dropped anyway; dropout and drop-path are identities in eval; zero_init_last is an init)
_HARMLESS_ARGS = {"num_classes", "drop_rate", "drop_path_rate", "drop_block_rate",
                  "zero_init_last"}


def _check_network_fields(config: Dict[str, Any]) -> None:
    """Refuse (``ValueError`` naming the field) what makes timm build another network than the
    plain ResNet trex_hub rebuilds: a pooling other than average, other input channels, or any
    other constructor argument (``output_stride``, ``block_args``...)."""
    fix = "trex_hub rebuilds the plain ResNet with average pooling; load it with timm"
    args = config.get("model_args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"timm config field 'model_args' must be an object, found "
                         f"{type(args).__name__}")
    for field, value in (("global_pool", config.get("global_pool")),
                         ("model_args.global_pool", args.get("global_pool"))):
        if value is not None and value != "avg":  # absent or null: timm's default, avg
            raise ValueError(f"timm config field '{field}' is {value!r}"[:200]
                             + f" (not 'avg'): {fix}")
    if args.get("in_chans", 3) != 3:
        raise ValueError(f"timm config field 'model_args.in_chans' is {args['in_chans']!r}"[:200]
                         + f" (not 3): {fix}")
    other = sorted(set(args) - _HARMLESS_ARGS - {"global_pool", "in_chans"})
    if other:
        raise ValueError(f"timm config field 'model_args.{other[0]}' changes the network "
                         f"(trex_hub accepts {', '.join(sorted(_HARMLESS_ARGS))}, "
                         f"in_chans 3, global_pool 'avg'): {fix}")


def config_from_timm(config: Dict[str, Any]) -> Dict[str, Any]:
    """A timm ``config.json`` -> the trex_hub config that rebuilds the same backbone (arch,
    features, name, licence, preprocessing from its ``pretrained_cfg``). Raises ``ValueError``
    (one line: what and how to fix) for another architecture, for fields that make timm build
    another network (``global_pool``, ``model_args``) and for a preprocessing trex_hub cannot
    reproduce."""
    arch_name = str(config.get("architecture"))
    base = arch_name.split(".")[0]  # "resnet50.a1_in1k" -> "resnet50"
    ours = {v: k for k, v in TIMM_ARCHITECTURES.items()}.get(base)
    if ours is None:
        raise ValueError(f"a timm '{arch_name}' model is not a t-ReX backbone; trex_hub loads "
                         f"timm folders of {', '.join(TIMM_ARCHITECTURES)} only (load other "
                         "timm models with timm.create_model)")
    _check_network_fields(config)
    pre = config.get("pretrained_cfg", {})
    if not isinstance(pre, dict):
        raise ValueError(f"timm config field 'pretrained_cfg' must be an object, found "
                         f"{type(pre).__name__}")
    extra = config.get("trex_hub") if isinstance(config.get("trex_hub"), dict) else {}
    cfg: Dict[str, Any] = {"arch": ours, "num_features": config.get("num_features"),
                           "projector": None, "classifier": None, "format": "timm",
                           "name": extra.get("name") or pre.get("tag"),
                           "preprocess": preprocess_from_timm(pre)}
    for key, value in (("license", pre.get("license")),
                       *((k, extra.get(k)) for k in ("derived_from", "release",
                                                     "release_digest"))):
        if value is not None:
            cfg[key] = value  # checked by read_config like our own config.json's
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
