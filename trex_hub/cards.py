"""Model cards (``README.md`` with Hugging Face metadata) for exported models: one renderer.

A card is a head followed by sections. The head depends on what the weights are:

* a released model (``name`` in the registry, ``config["arch"]`` the release's architecture and
  no ``derived_from`` in the config): its hand-written card from ``model_cards/`` (installed as
  ``trex_hub/model_cards/``), else one built from the registry facts (licence, metrics,
  citation);
* a model converted from a training checkpoint by ``trex-train export`` (``config.json`` has a
  ``source_checkpoint``): a card that says it is *not* a released model;
* anything else: a short generic card, with the licence ``config.json`` records and, for weights
  derived from a release or named after one they are not, a line that says so.

``derived_from`` is written by :func:`provenance`: the loader records the digest of a release's
weights when it loads them (``pretrained_cfg["release_digest"]``), and weights that no longer
match it when they are exported (fine-tuned, converted) are the release's derivatives.

A timm-format export (``save_pretrained(format="timm")``) gets :func:`render_timm_card`: the same
facts, told for a timm user.

The sections come from ``config.json``: the files of the export (architecture, preprocessing,
how to load it) and, when present, the training settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import registry
from .preprocess import PRESETS, preprocess_from_timm


def _cards_dir() -> Path:
    """``model_cards/``: inside the installed package (setup.cfg maps it there), or at the top of
    a source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "model_cards"
    return installed if installed.is_dir() else here.parent / "model_cards"


_CARDS_DIR = _cards_dir()
TAGS = ["image-feature-extraction", "transfer-learning", "resnet", "t-rex", "trex_hub"]


def files_section(config: Dict[str, Any], repo_id: Optional[str]) -> str:
    proj = config.get("projector")
    clf = config.get("classifier")
    parts = [f"- backbone: torchvision `{config['arch']}` (`fc` removed), "
             f"{config.get('num_features')}-d pooled features"]
    if proj:
        parts.append(f"- projector: {proj['num_layers']}-layer, {proj['hidden_dim']} -> "
                     f"{proj['out_dim']}-d embeddings (L2-normalised input: {proj['l2_norm']})")
    if clf:
        parts.append(f"- classifier: cosine prototypes, {clf['num_classes']} classes, "
                     f"tau = {clf['tau']}")
    pre = config.get("preprocess")
    if isinstance(pre, dict) and pre:
        parts.append(f"- preprocessing: resize {pre.get('resize')} ({pre.get('interpolation')}), "
                     f"centre crop {pre.get('crop')}, mean {pre.get('mean')}, std "
                     f"{pre.get('std')} (`trex_hub.get_transform(model)`)")
    target = f'"hf-hub:{repo_id}"' if repo_id else '"path/to/this/folder"'
    return (
        "\n## Files of this export\n\n"
        "Written by `trex_hub.save_pretrained`: `model.safetensors` (tensors only), "
        "`config.json` (architecture and preprocessing) and this card.\n\n"
        + "\n".join(parts) + "\n\n"
        "```python\nimport trex_hub\n"
        f"model = trex_hub.load({target}{', projector=True' if proj else ''})\n```\n")


def training_section(config: Dict[str, Any]) -> str:
    training = config.get("training")
    if not isinstance(training, dict) or not training:
        return ""
    return "\n## Training\n\n" + "\n".join(f"- {k}: {v}" for k, v in training.items()) + "\n"


def _released_head(entry: registry.ModelEntry) -> Tuple[Any, str]:
    from huggingface_hub import EvalResult, ModelCardData

    data = ModelCardData(
        license=entry.license, library_name="trex_hub", tags=TAGS,
        pipeline_tag="image-feature-extraction", datasets=["imagenet-1k"],
        metrics=["accuracy"], model_name=entry.name,
        eval_results=[
            EvalResult(task_type="image-classification", dataset_type="imagenet-1k",
                       dataset_name="ImageNet-1K", dataset_split="validation",
                       metric_type="accuracy", metric_name="top-1",
                       metric_value=entry.imagenet_top1),
            EvalResult(task_type="image-feature-extraction", dataset_type="trex-transfer-15",
                       dataset_name="15 transfer datasets", metric_type="log-odds",
                       metric_name="mean transfer log-odds",
                       metric_value=entry.transfer_log_odds),
        ])
    head = (f"# {entry.title}\n\n{entry.description}\n\n"
            f"- ImageNet-1K top-1: {entry.imagenet_top1} %\n"
            f"- mean transfer log-odds (15 datasets): {entry.transfer_log_odds}\n"
            f"- Licence of the weights: **{registry.LICENSE_NAME}** (non-commercial, "
            f"share-alike).\n- Paper: {registry.PAPER_URL}\n\n"
            f"```bibtex\n{registry.CITATION}\n```\n")
    return data, head


def _trained_head(title: str, license: Optional[str]) -> Tuple[Any, str]:
    from huggingface_hub import ModelCardData

    data = ModelCardData(license=license, library_name="trex_hub", tags=TAGS,
                         pipeline_tag="image-feature-extraction")
    head = (f"# {title}\n\nA model trained with `trex-train` (trex_hub), following the t-ReX "
            "recipe of Sariyildiz et al., *No Reason for No Supervision: Improved "
            "Generalization in Supervised Models*, ICLR 2023. It is **not** one of the released "
            f"t-ReX / t-ReX* checkpoints (those are licensed {registry.LICENSE_NAME} by their "
            "authors); the terms of these weights are those of the data they were trained on "
            "and of whoever trained them.\n")
    return data, head


def _entry(name: Any) -> Optional[registry.ModelEntry]:
    return registry.get_entry(name) if isinstance(name, str) and registry.is_known(name) else None


def provenance(model: Any, *, name: Optional[str] = None,
               license: Optional[str] = None) -> Dict[str, Any]:
    """What an export's ``config.json`` records about where ``model``'s weights come from:
    ``license`` (``license``, else the one the model was loaded with, else the release's for a
    model of its architecture named after it) and ``derived_from`` (the release the weights
    were loaded from when they no longer match the digest the loader recorded, or the
    ``derived_from`` they were loaded with). Absent values are left out."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    derived = cfg.get("derived_from")
    digest = cfg.get("release_digest")
    if derived is None and digest and cfg.get("release"):
        from .model import weights_digest  # ~0.06 s for a ResNet-50, only for a release

        if weights_digest(model) != digest:
            derived = cfg["release"]
    entry = _entry(name or cfg.get("name"))
    if license is None:
        license = cfg.get("license")
    if license is None and entry is not None and entry.arch == getattr(model, "arch", None):
        license = entry.license
    return {k: v for k, v in (("license", license), ("derived_from", derived)) if v}


#: what an export records about its weights (:func:`trex_hub.cards.provenance`): put into the
#: card and into ``pretrained_cfg`` by the loader, so short plain text only
_LICENSE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")


def check_provenance(config: Dict[str, Any]) -> Dict[str, Any]:
    """``config`` when its ``license`` / ``derived_from`` (untrusted, like the rest of a
    ``config.json``) are short plain text; else ``ConfigFieldError`` naming the field."""
    from .configschema import ConfigFieldError

    lic, derived = config.get("license"), config.get("derived_from")
    if lic is not None and not (isinstance(lic, str) and _LICENSE_RE.fullmatch(lic)):
        raise ConfigFieldError(f"config field 'license' must be a licence id such as "
                               f"'cc-by-nc-sa-4.0', found {lic!r}"[:300])
    if derived is not None and not (isinstance(derived, str) and 0 < len(derived) <= 200
                                    and derived.isprintable() and "`" not in derived):
        raise ConfigFieldError(f"config field 'derived_from' must be a model name, found "
                               f"{derived!r}"[:300])
    return config


def _release_note(entry: Optional[registry.ModelEntry], config: Dict[str, Any],
                  arch: Optional[str]) -> str:
    """Why a model named after a release, or derived from one, does not get its card."""
    derived = config.get("derived_from")
    if derived:
        return (f"\nDerived from the released t-ReX model `{derived}`: its weights changed after "
                "they were loaded (fine-tuned, converted or edited), so the release's card and "
                "metrics do not describe them. The licence of the release applies to "
                "derivatives.\n")
    if entry is not None and arch != entry.arch:
        return (f"\nExported under the name of the released model `{entry.name}`, but it is a "
                f"{arch}, not that release's {entry.arch}: the release's card and metrics do not "
                "describe it.\n")
    return ""


def _generic_head(title: str, license: Optional[str], note: str = "") -> Tuple[Any, str]:
    from huggingface_hub import ModelCardData

    data = ModelCardData(license=license, library_name="trex_hub", tags=TAGS,
                         pipeline_tag="image-feature-extraction")
    lic = f"\nLicence of the weights: {license}.\n" if license else ""
    return data, (f"# {title}\n\nA t-ReX-style model exported with trex_hub. Method: "
                  f"{registry.PAPER_URL}\n{note}{lic}")


def render_card(config: Dict[str, Any], *, name: Optional[str] = None,
                repo_id: Optional[str] = None, license: Optional[str] = None):
    """The :class:`huggingface_hub.ModelCard` of an exported model (see the module doc)."""
    from huggingface_hub import ModelCard

    entry = _entry(name)
    trained = bool(config.get("source_checkpoint"))
    sections = files_section(config, repo_id) + training_section(config)
    title = name or config.get("name") or config["arch"]
    license = license or config.get("license")
    released = entry is not None and entry.arch == config["arch"] \
        and not config.get("derived_from")
    if trained:
        data, head = _trained_head(title, license)
    elif released:
        assert entry is not None
        hand_written = _CARDS_DIR / f"{entry.name}.md"
        if hand_written.is_file():
            card = ModelCard.load(hand_written)
            card.text = card.text.rstrip() + "\n" + sections
            return card
        data, head = _released_head(entry)
    else:
        data, head = _generic_head(title, license, _release_note(entry, config, config["arch"]))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{head}{sections}")


def render_timm_card(config: Dict[str, Any], *, name: Optional[str] = None,
                     license: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """``README.md`` of a timm-format export: ``library_name: timm``, how ``timm.create_model``
    loads it, its preprocessing, the citation and, for a released model, its published figures.
    ``config`` is the timm ``config.json`` (``architecture``, ``num_features``,
    ``pretrained_cfg``)."""
    from huggingface_hub import ModelCardData

    entry = _entry(name)
    ours = config.get("trex_hub") if isinstance(config.get("trex_hub"), dict) else {}
    arch = ours.get("arch") or str(config["architecture"]).split(".")[0]
    release_note = _release_note(entry, ours, arch)
    if release_note:  # not the release's weights: not its figures
        entry = None
    data = ModelCardData(license=license, library_name="timm",
                         tags=["image-feature-extraction", "timm", "t-rex", "trex_hub"],
                         pipeline_tag="image-feature-extraction")
    target = f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/REPO"
    pre = config["pretrained_cfg"]
    geo = preprocess_from_timm(pre)
    steps = f"Resize {geo['resize']} {geo['interpolation']} + CenterCrop {geo['crop']}"
    t = PRESETS["transfer"]
    note = (" (the paper's transfer protocol)"
            if (geo["resize"], geo["crop"], geo["interpolation"]) == (t.resize, t.crop,
                                                                     t.interpolation) else "")
    paper = pre.get("paper_name") or registry.PAPER_URL
    ids = pre.get("paper_ids")
    facts = release_note
    if entry is not None:
        facts = (f"\n{entry.description}\n\n- ImageNet-1K top-1: {entry.imagenet_top1} %\n"
                 f"- mean transfer log-odds (15 datasets): {entry.transfer_log_odds}\n")
    return (
        f"---\n{data.to_yaml()}\n---\n\n# {name or config['architecture']} (t-ReX backbone, "
        f"timm format)\n\nA {config['architecture']} backbone trained with the t-ReX recipe "
        f"({paper}{', ' + ids if ids else ''}), exported by trex_hub in timm's layout: "
        "`model.safetensors` + `config.json`. It has no classifier (`num_classes = 0`); "
        f"the model returns {config['num_features']}-d pooled features.\n{facts}\n"
        "```python\nimport timm\n"
        f'model = timm.create_model("{target}", pretrained=True, num_classes=0).eval()\n'
        "cfg = timm.data.resolve_data_config({}, model=model)\n"
        f"transform = timm.data.create_transform(**cfg)   # {steps}\n"
        f"```\n\nPreprocessing{note}: resize the shorter side to {geo['resize']} "
        f"({geo['interpolation']}), centre-crop {geo['crop']}, normalise with mean "
        f"{pre['mean']} and std {pre['std']}.\n"
        + (f"\nLicence of the weights: {license}.\n" if license else "")
        + f"\n## Citation\n\n```bibtex\n{registry.CITATION}\n```\n")
