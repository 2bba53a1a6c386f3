"""Model cards (``README.md`` with Hugging Face metadata) for exported models: one renderer.

A card is a head followed by sections. The head depends on what the weights are:

* a release's weights, unchanged: ``config["release"]`` names a registry model of
  ``config["arch"]`` and there is no ``derived_from``. Its hand-written card from
  ``model_cards/`` (installed as ``trex_hub/model_cards/``), else one built from the registry
  facts (licence, metrics, citation);
* a model converted from a training checkpoint by ``trex-train export`` (``config.json`` has a
  ``source_checkpoint``): a card that says it is *not* a released model;
* anything else: a short generic card, with the licence ``config.json`` records and, for weights
  derived from a release or merely named after one, a line that says so.

The rule: a release's card, and its metrics, only for weights known to be the release's.
``config.json`` records ``release`` (with ``release_digest``, the digest of the tensors written)
only when the model's ``pretrained_cfg`` carries a release's digest and the weights still match
it; that digest is recorded when a release's file is loaded (``trex_hub.load("trex_star")``,
``trex-download trex_star --to-*``), and when a folder recording a release is loaded and its
weights match (:func:`trex_hub.provenance.loaded_facts`). A release changed after it was loaded
(fine-tuned, converted, edited: the digest differs), also when saved, reloaded from the folder
and saved again, records ``derived_from``. Weights merely named after a release (``name=``, no
digest: random or someone else's) get the generic card saying so. See :mod:`trex_hub.provenance`.

A timm-format export (``save_pretrained(format="timm")``) gets :func:`render_timm_card`: the same
facts, told for a timm user.

The sections come from ``config.json``: the files of the export (architecture, preprocessing,
how to load it) and, when present, the training settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import registry
from .preprocess import PRESETS, preprocess_from_timm
from .provenance import card_license
from .provenance import entry as _entry


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

    data = ModelCardData(**card_license(license), library_name="trex_hub", tags=TAGS,
                         pipeline_tag="image-feature-extraction")
    head = (f"# {title}\n\nA model trained with `trex-train` (trex_hub), following the t-ReX "
            "recipe of Sariyildiz et al., *No Reason for No Supervision: Improved "
            "Generalization in Supervised Models*, ICLR 2023. It is **not** one of the released "
            f"t-ReX / t-ReX* checkpoints (those are licensed {registry.LICENSE_NAME} by their "
            "authors); the terms of these weights are those of the data they were trained on "
            "and of whoever trained them.\n")
    return data, head


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
    if entry is not None and config.get("release") != entry.name:
        return (f"\nExported under the name of the released model `{entry.name}`, but these "
                "weights were not loaded from that release unchanged (random, trained or someone "
                "else's), so the release's card and metrics do not describe them.\n")
    return ""


def _generic_head(title: str, license: Optional[str], note: str = "") -> Tuple[Any, str]:
    from huggingface_hub import ModelCardData

    data = ModelCardData(**card_license(license), library_name="trex_hub", tags=TAGS,
                         pipeline_tag="image-feature-extraction")
    lic = f"\nLicence of the weights: {license}.\n" if license else ""
    return data, (f"# {title}\n\nA t-ReX-style model exported with trex_hub. Method: "
                  f"{registry.PAPER_URL}\n{note}{lic}")


def render_card(config: Dict[str, Any], *, name: Optional[str] = None,
                repo_id: Optional[str] = None, license: Optional[str] = None):
    """The :class:`huggingface_hub.ModelCard` of an exported model (see the module doc)."""
    from huggingface_hub import ModelCard

    named, release = _entry(name), _entry(config.get("release"))
    trained = bool(config.get("source_checkpoint"))
    sections = files_section(config, repo_id) + training_section(config)
    title = name or config.get("name") or config["arch"]
    license = license or config.get("license")
    if trained:
        data, head = _trained_head(title, license)
    elif release is not None and release.arch == config["arch"] \
            and not config.get("derived_from"):  # the release's weights (module doc)
        entry = release
        hand_written = _CARDS_DIR / f"{entry.name}.md"
        if hand_written.is_file():
            card = ModelCard.load(hand_written)
            card.text = card.text.rstrip() + "\n" + sections
            return card
        data, head = _released_head(entry)
    else:
        data, head = _generic_head(title, license, _release_note(named, config, config["arch"]))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{head}{sections}")


def render_timm_card(config: Dict[str, Any], *, name: Optional[str] = None,
                     license: Optional[str] = None, repo_id: Optional[str] = None) -> str:
    """``README.md`` of a timm-format export: ``library_name: timm``, how ``timm.create_model``
    loads it, its preprocessing, the citation and, for a released model, its published figures.
    ``config`` is the timm ``config.json`` (``architecture``, ``num_features``,
    ``pretrained_cfg``)."""
    from huggingface_hub import ModelCardData

    ours = config.get("trex_hub") if isinstance(config.get("trex_hub"), dict) else {}
    arch = ours.get("arch") or str(config["architecture"]).split(".")[0]
    entry = _entry(ours.get("release"))
    if entry is None or entry.arch != arch or ours.get("derived_from"):
        entry = None  # not the release's weights: not its figures (module doc)
    release_note = "" if entry is not None else _release_note(_entry(name), ours, arch)
    data = ModelCardData(**card_license(license), library_name="timm",
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
