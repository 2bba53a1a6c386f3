"""The Hugging Face Hub: ``hf-hub:org/repo[@revision]`` ids, ``save_pretrained``, ``push_to_hub``.

A trex_hub model on the Hub is a folder of three files: ``model.safetensors`` (tensors only),
``config.json`` (what rebuilds the architecture: arch, projector, classifier) and ``README.md``
(the model card with Hugging Face metadata). Downloads go through the real ``huggingface_hub``
client, so its cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and tokens apply as usual.

``huggingface_hub`` is imported inside the functions: ``import trex_hub`` does not need it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from . import download
from ..fileio import PathLike


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)

_CARDS_DIR = Path(__file__).resolve().parents[2] / "model_cards"  # present in a source checkout


def parse_repo_spec(spec: str, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``"org/repo@rev"`` -> ``("org/repo", "rev")``; ``revision=`` must agree when both given."""
    spec = spec.strip()
    if spec.startswith("hf-hub:"):
        spec = spec[len("hf-hub:"):]
    repo_id, _, rev = spec.partition("@")
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise ValueError(f"'{spec}' is not a Hub model id: use 'hf-hub:org/repo' or "
                         "'hf-hub:org/repo@revision'")
    if rev and revision and rev != revision:
        raise ValueError(f"'{spec}' names revision '{rev}' but revision='{revision}' was also "
                         "given; use one")
    return repo_id, (rev or revision or None)


def _endpoint(endpoint: Optional[str] = None) -> Optional[str]:
    # read at call time: huggingface_hub reads HF_ENDPOINT once, when it is first imported
    value = endpoint or os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def hf_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The Hugging Face cache used: ``cache_dir``, else ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, or the
    huggingface_hub default (``~/.cache/huggingface/hub``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def download_model(repo_spec: str, cache_dir: Optional[PathLike] = None,
                   revision: Optional[str] = None, token: Union[str, bool, None] = None, *,
                   force_download: bool = False, offline: Optional[bool] = None,
                   endpoint: Optional[str] = None, progress: bool = True) -> Path:
    """Fetch ``config.json`` + ``model.safetensors`` of a Hub repo; returns their (snapshot) folder.

    ``repo_spec`` is ``"org/repo"`` or ``"org/repo@revision"`` (branch, tag or commit). Offline mode
    (``TREX_HUB_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``offline=True``) only looks in the cache.
    Both files come from the same commit.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, \
        enable_progress_bars

    repo_id, rev = parse_repo_spec(repo_spec, revision)
    offline = download.is_offline() if offline is None else offline
    cache = hf_cache_dir(cache_dir)
    ep = _endpoint(endpoint)
    where = f"hf-hub:{repo_id}" + (f"@{rev}" if rev else "")
    silence = not progress and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        paths = []
        pinned = rev
        for name in MODEL_FILES:
            local = hf_hub_download(repo_id, name, revision=pinned, cache_dir=str(cache),
                                    token=token, endpoint=ep, local_files_only=offline,
                                    force_download=force_download, library_name="trex_hub",
                                    library_version=_version())
            paths.append(Path(local))
            pinned = Path(local).parent.name if not offline else pinned  # same commit for both
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            raise download.OfflineError(
                f"offline mode is on and {where} is not in the Hugging Face cache ({cache}). On "
                f"a connected machine run `trex-download hf-hub:{repo_id}"
                f"{'@' + rev if rev else ''} --cache-dir {cache}` and copy that folder here, or "
                "unset TREX_HUB_OFFLINE / HF_HUB_OFFLINE.") from None
        raise download.DownloadError(
            f"{where}: the Hub at {ep or 'https://huggingface.co'} could not be reached and the "
            f"files are not cached in {cache}; check the network or HF_ENDPOINT.") from None
    except hf_errors.RepositoryNotFoundError:
        raise download.NotFoundError(
            f"{where}: repository not found at {ep or 'https://huggingface.co'} (private or "
            "gated? pass token= or run `hf auth login`; check the id and HF_ENDPOINT).") from None
    except hf_errors.RevisionNotFoundError:
        raise download.NotFoundError(f"{where}: revision '{rev}' does not exist; use a branch, "
                                     "tag or commit of the repository.") from None
    except hf_errors.EntryNotFoundError:
        raise download.NotFoundError(
            f"{where}: the repository has no {' + '.join(MODEL_FILES)}, so it is not a trex_hub "
            "model; publish one with trex_hub.push_to_hub(model, repo_id).") from None
    except hf_errors.HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise download.DownloadError(f"{where}: {first}; check the network, token and "
                                     "HF_ENDPOINT.") from None
    finally:
        if silence:
            enable_progress_bars()
    folder = paths[0].parent
    if paths[1].parent != folder:  # pragma: no cover - pinned above
        raise download.DownloadError(f"{where}: config.json and model.safetensors come from "
                                     "different commits; retry")
    return folder


def _version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
def _registry_entry(name: Optional[str]):
    from .. import registry

    return registry.get_entry(name) if name and registry.is_known(name) else None


def _export_section(config: Dict[str, Any], repo_id: Optional[str]) -> str:
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
    training = config.get("training")
    if isinstance(training, dict) and training:
        parts.append("- training: " + ", ".join(f"{k} = {v}" for k, v in training.items()))
    target = f'"hf-hub:{repo_id}"' if repo_id else '"path/to/this/folder"'
    return (
        "\n## Files of this export\n\n"
        "Written by `trex_hub.save_pretrained`: `model.safetensors` (tensors only), "
        "`config.json` (architecture) and this card.\n\n" + "\n".join(parts) + "\n\n"
        "```python\nimport trex_hub\n"
        f"model = trex_hub.load({target}{', projector=True' if proj else ''})\n```\n")


def render_card(config: Dict[str, Any], *, name: Optional[str] = None,
                repo_id: Optional[str] = None, license: Optional[str] = None):
    """The :class:`huggingface_hub.ModelCard` of an exported model.

    A released model (``name`` in the registry) gets its hand-written card when the source
    checkout has one, else one built from the registry facts (licence CC BY-NC-SA 4.0, metrics,
    citation); any other model gets a card built from its config.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .. import registry

    entry = _registry_entry(name)
    section = _export_section(config, repo_id)
    if entry is not None and (_CARDS_DIR / f"{entry.name}.md").is_file():
        card = ModelCard.load(_CARDS_DIR / f"{entry.name}.md")
        card.text = card.text.rstrip() + "\n" + section
        return card
    tags = ["image-feature-extraction", "transfer-learning", "resnet", "t-rex", "trex_hub"]
    if entry is not None:
        data = ModelCardData(
            license=entry.license, library_name="trex_hub", tags=tags,
            pipeline_tag="image-feature-extraction", datasets=["imagenet-1k"],
            metrics=["accuracy"], model_name=entry.name,
            eval_results=[
                EvalResult(task_type="image-classification", dataset_type="imagenet-1k",
                           dataset_name="ImageNet-1K", dataset_split="validation",
                           metric_type="accuracy", metric_name="top-1",
                           metric_value=entry.imagenet_top1),
                EvalResult(task_type="image-feature-extraction",
                           dataset_type="trex-transfer-15",
                           dataset_name="15 transfer datasets", metric_type="log-odds",
                           metric_name="mean transfer log-odds",
                           metric_value=entry.transfer_log_odds),
            ])
        body = (f"# {entry.title}\n\n{entry.description}\n\n"
                f"- ImageNet-1K top-1: {entry.imagenet_top1} %\n"
                f"- mean transfer log-odds (15 datasets): {entry.transfer_log_odds}\n"
                f"- Licence of the weights: **{registry.LICENSE_NAME}** (non-commercial, "
                "share-alike).\n- Paper: "
                f"{registry.PAPER_URL}\n\n```bibtex\n{registry.CITATION}\n```\n")
    else:
        title = config.get("name") or config["arch"]
        data = ModelCardData(license=license, library_name="trex_hub", tags=tags,
                             pipeline_tag="image-feature-extraction")
        body = (f"# {title}\n\nA t-ReX-style model exported with trex_hub. Method: "
                f"{registry.PAPER_URL}\n")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}{section}")


def save_pretrained(model: Any, folder: PathLike, *, name: Optional[str] = None,
                    repo_id: Optional[str] = None, license: Optional[str] = None,
                    extra_config: Optional[Dict[str, Any]] = None,
                    format: str = "trex_hub") -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (model card) into ``folder``.

    ``trex_hub.load(folder)`` (or ``load("hf-hub:...")`` once pushed) rebuilds the same model with
    bit-identical outputs. ``name`` picks the registry facts for the card (default: the model's
    own name). ``format="timm"`` writes the backbone in timm's layout instead
    (:mod:`trex_hub.timm_format`), for ``timm.create_model("hf-hub:...")``.
    """
    if format == "timm":
        from ..timm_format import save_timm

        return save_timm(model, folder, name=name, license=license, repo_id=repo_id)
    if format != "trex_hub":
        raise ValueError(f"format={format!r}: use 'trex_hub' (default) or 'timm'")
    from ..checkpoint import save_safetensors

    folder = Path(folder)
    save_safetensors(model, folder, extra_config=extra_config)
    import json

    config = json.loads((folder / CONFIG_NAME).read_text())
    card = render_card(config, name=name or config.get("name"), repo_id=repo_id,
                       license=license)
    tmp = folder / f".{CARD_NAME}.{os.getpid()}.tmp"
    try:
        card.save(tmp)
        os.replace(tmp, folder / CARD_NAME)
    finally:
        if tmp.exists():
            tmp.unlink()
    return folder


def push_to_hub(model: Any, repo_id: str, *, token: Union[str, bool, None] = None,
                private: Optional[bool] = None, revision: Optional[str] = None,
                commit_message: str = "Upload t-ReX model (trex_hub)",
                create_repo: bool = True, endpoint: Optional[str] = None,
                name: Optional[str] = None, license: Optional[str] = None) -> str:
    """Export ``model`` with :func:`save_pretrained` and upload it to ``repo_id``; returns the
    commit URL. ``trex_hub.load(f"hf-hub:{repo_id}")`` loads it back."""
    from huggingface_hub import HfApi

    parse_repo_spec(repo_id)
    api = HfApi(endpoint=_endpoint(endpoint), token=token, library_name="trex_hub",
                library_version=_version())
    with tempfile.TemporaryDirectory(prefix="trex_hub_push_") as tmp:
        save_pretrained(model, tmp, name=name, repo_id=repo_id, license=license)
        if create_repo:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                 commit_message=commit_message, repo_type="model")
    return str(info)
