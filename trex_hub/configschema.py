"""The schema of ``config.json`` (an exported folder or an ``hf-hub:`` repository), with bounds.

A config rebuilds an architecture before any weight is read, so it is untrusted input: a
``projector.num_layers`` of ten million or a ``hidden_dim`` of 10**12 would allocate until memory
runs out. :func:`validate_config` checks every field the model is built from (type, allowed
values, bounds, and a budget on the parameters the heads would allocate) and names the field and
the file in its error. Keys it does not know are left alone (``save_pretrained(extra_config=)``
writes them).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from .model import BACKBONE_DIMS
from .preprocess import PreprocessConfig

MAX_PROJECTOR_LAYERS = 16
MAX_WIDTH = 16384               # projector hidden_dim / out_dim
MAX_CLASSES = 100_000
MAX_IMAGE_SIDE = 4096           # preprocess resize / crop
MAX_HEAD_PARAMS = 200_000_000   # projector + prototypes (the released projector has ~13 M)
PROJECTOR_KEYS = {"num_layers", "hidden_dim", "out_dim", "l2_norm"}
CLASSIFIER_KEYS = {"type", "num_classes", "tau", "class_names", "from"}


class ConfigFieldError(ValueError):
    """One field of a config is invalid (``CheckpointError`` wraps it with the file name and
    ``fix``, what to do about it)."""

    fix = "fix the file or export the model again with trex_hub.save_pretrained"


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigFieldError(f"config field '{field}' must be an integer from {low} to {high}, "
                               f"found {value!r}"[:300])
    return value


def _mapping(value: Any, field: str, known: set) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigFieldError(f"config field '{field}' must be an object or null, found "
                               f"{type(value).__name__} {value!r}"[:300])
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigFieldError(f"config field '{field}' has unknown keys {unknown}; known: "
                               f"{sorted(known)}")
    return value


def _projector(value: Any) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    proj = _mapping(value, "projector", PROJECTOR_KEYS)
    for key in ("num_layers", "out_dim"):
        if key not in proj:
            raise ConfigFieldError(f"config field 'projector.{key}' is missing")
    layers = _int(proj["num_layers"], "projector.num_layers", 0, MAX_PROJECTOR_LAYERS)
    hidden = _int(proj.get("hidden_dim", 2048), "projector.hidden_dim", 1, MAX_WIDTH)
    out = _int(proj["out_dim"], "projector.out_dim", 1, MAX_WIDTH)
    if not isinstance(proj.get("l2_norm", True), bool):
        raise ConfigFieldError(f"config field 'projector.l2_norm' must be true or false, found "
                               f"{proj['l2_norm']!r}"[:300])
    return {"num_layers": layers, "hidden_dim": hidden, "out_dim": out}


def _classifier(value: Any, out_dim: int) -> int:
    """Checks ``classifier``; returns how many prototype parameters it allocates."""
    if value is None:
        return 0
    clf = _mapping(value, "classifier", CLASSIFIER_KEYS)
    if clf.get("type", "prototypes") != "prototypes":
        raise ConfigFieldError(f"config field 'classifier.type' must be 'prototypes', found "
                               f"{clf['type']!r}"[:300])
    if "num_classes" not in clf:
        raise ConfigFieldError("config field 'classifier.num_classes' is missing")
    n = _int(clf["num_classes"], "classifier.num_classes", 1, MAX_CLASSES)
    tau = clf.get("tau", 0.1)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) \
            or tau <= 0:
        raise ConfigFieldError(f"config field 'classifier.tau' must be a positive number, found "
                               f"{tau!r}"[:300])
    names = clf.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != n
                              or not all(isinstance(x, str) for x in names)):
        raise ConfigFieldError(f"config field 'classifier.class_names' must be a list of {n} "
                               "strings (one per class)")
    return n * out_dim


def _preprocess(value: Any) -> None:
    if value is None:
        return
    pre = _mapping(value, "preprocess", {"resize", "crop", "interpolation", "mean", "std"})
    for key in ("resize", "crop"):
        if key in pre:
            _int(pre[key], f"preprocess.{key}", 1, MAX_IMAGE_SIDE)
    for key in ("mean", "std"):
        if key in pre and not (isinstance(pre[key], list) and len(pre[key]) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in pre[key])):
            raise ConfigFieldError(f"config field 'preprocess.{key}' must be a list of 3 "
                                   f"numbers, found {pre[key]!r}"[:300])
    try:
        PreprocessConfig.from_dict(pre)
    except (TypeError, ValueError) as exc:
        raise ConfigFieldError(f"config field 'preprocess': {exc}") from None


def validate_config(config: Any) -> Dict[str, Any]:
    """``config`` when every field that builds the model is valid; else :class:`ConfigFieldError`
    naming the field, what it must be, and what was found."""
    if not isinstance(config, dict):
        raise ConfigFieldError(f"a config must be a JSON object, found {type(config).__name__}")
    if "arch" not in config:
        raise ConfigFieldError("config field 'arch' is missing (not a trex_hub config)")
    arch = config["arch"]
    if not isinstance(arch, str) or arch not in BACKBONE_DIMS:
        raise ConfigFieldError(f"config field 'arch' must be one of {', '.join(BACKBONE_DIMS)}, "
                               f"found {arch!r}"[:300])
    dim = BACKBONE_DIMS[arch]
    if "num_features" in config and (isinstance(config["num_features"], bool)
                                     or config["num_features"] != dim):
        raise ConfigFieldError(f"config field 'num_features' must be {dim} for {arch}, found "
                               f"{config['num_features']!r}"[:300])
    proj = _projector(config.get("projector"))
    params, out_dim = 0, dim
    if proj is not None:
        widths = [dim] + [proj["hidden_dim"]] * proj["num_layers"] + [proj["out_dim"]]
        params = sum(a * b for a, b in zip(widths, widths[1:]))
        out_dim = proj["out_dim"]
    params += _classifier(config.get("classifier"), out_dim)
    if params > MAX_HEAD_PARAMS:
        raise ConfigFieldError(f"config fields 'projector' / 'classifier' describe heads with "
                               f"{params:,} parameters, over the limit of {MAX_HEAD_PARAMS:,}")
    name = config.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigFieldError(f"config field 'name' must be a string or null, found {name!r}"
                               [:300])
    _preprocess(config.get("preprocess"))
    return config
