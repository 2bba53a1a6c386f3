"""What an export records about its weights: their licence and where they come from.

``config.json`` (a timm folder: ``pretrained_cfg.license`` and the ``trex_hub`` object) records

* ``license``: any short line of printable text (``cc-by-nc-sa-4.0``, ``CC BY-NC-SA 4.0``,
  ``MIT OR Apache-2.0``); checked when saving (:func:`check_license`, before any file is
  written) and when loading (:func:`check_provenance`), by the same rule;
* ``release`` + ``release_digest``: the weights are a release's, unchanged. Written only when the
  model's ``pretrained_cfg`` has a release's digest (:func:`loaded_facts` records it for a
  release's file and for a folder whose recorded digest its weights match) and the weights
  still have it; the digest is that of the tensors written;
* ``derived_from``: the weights were a release's and changed since (the digest no longer
  matches), or were loaded with a ``derived_from``.

:mod:`trex_hub.cards` gives a release's card only to a config with ``release`` (see there).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional

from . import registry

MAX_LICENSE_CHARS = 100
#: a licence the Hub's ``license:`` metadata takes as it is (an id); other text is shown as
#: ``license: other`` + ``license_name`` (:func:`card_license`)
LICENSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
REQUIREMENT = (f"a licence name on one line of at most {MAX_LICENSE_CHARS} printable characters "
               "without backticks, such as 'cc-by-nc-sa-4.0' or 'CC BY-NC-SA 4.0'")


def _field_error(message: str) -> ValueError:
    """A ``ConfigFieldError`` whose fix is to correct the file: exporting again would write
    the same value (configschema, which imports torch, only when there is an error)."""
    from .configschema import ConfigFieldError

    exc = ConfigFieldError(message[:300])
    exc.fix = "correct or remove that field in the file"
    return exc


def license_ok(value: Any) -> bool:
    """``value`` is :data:`REQUIREMENT`: what the card, ``pretrained_cfg`` and the ONNX metadata
    can carry as it is (the card's YAML quotes it as needed)."""
    return isinstance(value, str) and bool(value.strip()) and len(value) <= MAX_LICENSE_CHARS \
        and value.isprintable() and "`" not in value


def check_license(value: Any, what: str = "license") -> None:
    """``ValueError`` naming ``what`` (a parameter) for a licence that would not load back."""
    if value is not None and not license_ok(value):
        raise ValueError(f"{what}={value!r}"[:160] + f" must be {REQUIREMENT}")


def _text(value: Any, limit: int = 200) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable() \
        and "`" not in value


def check_provenance(config: Dict[str, Any], *, timm: bool = False) -> Dict[str, Any]:
    """``config`` when its ``license``, ``derived_from``, ``release`` and ``release_digest``
    (untrusted, like the rest of a ``config.json``) are short plain text; else
    ``ConfigFieldError`` naming the field as the file spells it (``timm``: a timm
    folder's, where they sit in ``pretrained_cfg`` and ``trex_hub``)."""
    def field(key: str) -> str:
        return key if not timm else "pretrained_cfg.license" if key == "license" \
            else f"trex_hub.{key}"

    lic = config.get("license")
    if lic is not None and not license_ok(lic):
        raise _field_error(f"config field '{field('license')}' must be {REQUIREMENT}; found "
                           f"{lic!r}")
    for key in ("derived_from", "release"):
        if config.get(key) is not None and not _text(config[key]):
            raise _field_error(f"config field '{field(key)}' must be a model name, found "
                               f"{config[key]!r}")
    digest = config.get("release_digest")
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise _field_error(f"config field '{field('release_digest')}' must be 64 hex digits, "
                           f"found {digest!r}")
    return config


def card_license(license: Optional[str]) -> Dict[str, str]:
    """The card metadata for ``license``: ``license`` itself for an id; ``license: other`` and
    an id-like ``license_name`` for other text (the Hub checks ``license`` against its list)."""
    if not license:
        return {}
    if LICENSE_ID.fullmatch(license):
        return {"license": license}
    slug = re.sub(r"[^a-z0-9.]+", "-", license.lower()).strip("-.") or "custom"
    return {"license": "other", "license_name": slug[:64]}


def entry(name: Any) -> Optional[registry.ModelEntry]:
    return registry.get_entry(name) if isinstance(name, str) and registry.is_known(name) else None


def _digest(model: Any, backbone_only: bool = False) -> str:
    """:func:`~trex_hub.model.weights_digest` of ``model`` (``backbone_only``: of the backbone
    tensors alone, as the backbone-only model loaded from a timm folder has them)."""
    from .model import weights_digest  # ~0.06 s for a ResNet-50, only for a release

    if not backbone_only:
        return weights_digest(model)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}

    class _View:  # weights_digest hashes state_dict(): the same bytes for the same tensors
        def state_dict(self) -> Dict[str, Any]:
            return state

    return weights_digest(_View())  # type: ignore[arg-type]


def provenance(model: Any, *, name: Optional[str] = None, license: Optional[str] = None,
               backbone_only: bool = False) -> Dict[str, Any]:
    """What an export's ``config.json`` records about ``model``'s weights (module doc):
    ``license`` (``license``, else the one the model was loaded with, else the release's for a
    model of its architecture named after it), and ``release`` + ``release_digest`` (of the
    tensors written: all, or ``backbone_only``) or ``derived_from``. Absent values are left out.
    A licence that would not load back is a ``ValueError`` naming where it came from."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    out: Dict[str, Any] = {}
    derived, release, digest = (cfg.get(k) for k in ("derived_from", "release",
                                                     "release_digest"))
    if derived is None and release and digest:
        now = _digest(model)
        if now == digest:
            out.update(release=release,
                       release_digest=_digest(model, True) if backbone_only else now)
        else:
            derived = release
    check_license(license)
    if license is None:
        license = cfg.get("license")
        check_license(license, "model.pretrained_cfg['license']")
    named = entry(name or cfg.get("name"))
    if license is None and named is not None and named.arch == getattr(model, "arch", None):
        license = named.license
    out.update((k, v) for k, v in (("license", license), ("derived_from", derived)) if v)
    return out


def _released_file(name: Optional[str], source: str, arch: str) -> Optional[registry.ModelEntry]:
    """The release whose file ``source`` is: a file of the download cache named as one of its
    files, that the cache's manifest vouches for (the check the cache runs on every use)."""
    from .hub.cache import read_manifest

    release = entry(name)
    if release is None or release.arch != arch or not source:
        return None
    path = Path(source)
    files = [f for f in (release.backbone_file, release.full_file)
             if f is not None and f.filename == path.name]
    man = read_manifest(path) if files and path.is_file() else None
    if man is None or man.get("size") != path.stat().st_size:
        return None
    if files[0].sha256 is not None and man.get("sha256") != files[0].sha256:
        return None
    return release


def loaded_facts(model: Any, config: Dict[str, Any], source: str, name: Optional[str],
                 whole: Any = None) -> Dict[str, Any]:
    """What ``pretrained_cfg`` records about weights just loaded into ``model`` from a checkpoint
    with ``config`` read from ``source``: its ``license`` / ``derived_from``; ``release`` and
    ``release_digest`` (of ``model``) when the config records a release whose digest the
    weights have (``whole``: the model with every tensor of the checkpoint, when ``model``
    left its heads out), else ``derived_from`` that release; the same for a release's own
    file, recognised by :func:`_released_file` when ``name`` is that release's."""
    facts = {k: config[k] for k in ("license", "derived_from") if config.get(k)}
    release = config.get("release")
    if release and config.get("release_digest") and not facts.get("derived_from"):
        mine = _digest(model)
        if (_digest(whole) if whole is not None else mine) == config["release_digest"]:
            facts.update(release=release, release_digest=mine)
        else:  # not the weights that were recorded: changed since
            facts["derived_from"] = release
        return facts
    released = None if config.get("derived_from") else \
        _released_file(name, source, config.get("arch", ""))
    if released is not None:
        facts.update(license=released.license, release=released.name,
                     release_digest=_digest(model))
    return facts
