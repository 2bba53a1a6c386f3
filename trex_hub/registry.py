"""The released t-ReX models, as data.

One :class:`ModelEntry` per released model. Everything user-facing that lists models (the
``trex-download --list`` table, the torch.hub entrypoints, the model-card checks) is derived from
:data:`MODELS`; nothing else in the package repeats these facts.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .preprocess import PRESETS, PreprocessConfig

OFFICIAL_BASE_URL = "https://download.europe.naverlabs.com/ComputerVision/trex_models/"

LICENSE = "cc-by-nc-sa-4.0"
LICENSE_NAME = "CC BY-NC-SA 4.0"

CITATION = """@inproceedings{sariyildiz2023improving,
  title     = {No Reason for No Supervision: Improved Generalization in Supervised Models},
  author    = {Sariyildiz, Mert Bulent and Kalantidis, Yannis and Alahari, Karteek and Larlus, Diane},
  booktitle = {International Conference on Learning Representations},
  year      = {2023},
  url       = {https://arxiv.org/abs/2206.15369},
}"""

PAPER_URL = "https://arxiv.org/abs/2206.15369"


class UnknownModelError(KeyError):
    """Raised for a model name that is neither a registry name nor an alias."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


@dataclass(frozen=True)
class FileInfo:
    """One downloadable file. ``sha256``/``size`` are ``None`` where none is published."""

    filename: str
    kind: str  # "backbone" (bare torchvision state dict) or "full" (training checkpoint)
    sha256: Optional[str] = None
    size: Optional[int] = None


@dataclass(frozen=True)
class ProjectorConfig:
    num_layers: int
    hidden_dim: int = 2048
    out_dim: int = 256
    l2_norm: bool = True


@dataclass(frozen=True)
class ModelEntry:
    name: str
    title: str
    description: str
    aliases: Tuple[str, ...]
    backbone_file: FileInfo
    full_file: Optional[FileInfo]
    projector: ProjectorConfig
    imagenet_top1: float
    transfer_log_odds: float
    arch: str = "resnet50"
    num_classes: int = 1000
    tau: float = 0.1
    license: str = LICENSE
    hf_repo: Optional[str] = None
    training: Dict[str, object] = field(default_factory=dict)
    #: how images are prepared for these weights (the paper's transfer protocol)
    preprocess: PreprocessConfig = PRESETS["transfer"]

    @property
    def has_projector(self) -> bool:
        """Whether a released file carries the projector (and the OCM prototypes)."""
        return self.full_file is not None

    def files(self) -> List[FileInfo]:
        return [f for f in (self.backbone_file, self.full_file) if f is not None]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "aliases": list(self.aliases),
            "arch": self.arch,
            "files": [
                {"filename": f.filename, "kind": f.kind, "sha256": f.sha256, "size": f.size}
                for f in self.files()
            ],
            "projector": {
                "num_layers": self.projector.num_layers,
                "hidden_dim": self.projector.hidden_dim,
                "out_dim": self.projector.out_dim,
                "l2_norm": self.projector.l2_norm,
            },
            "has_projector": self.has_projector,
            "num_features": 2048,
            "num_classes": self.num_classes,
            "tau": self.tau,
            "metrics": {
                "imagenet_top1": self.imagenet_top1,
                "transfer_log_odds": self.transfer_log_odds,
            },
            "license": self.license,
            "hf_repo": self.hf_repo,
            "training": dict(self.training),
            "preprocess": self.preprocess.to_dict(),
            "paper": PAPER_URL,
            "citation": CITATION,
        }


_TREX_TRAINING = {
    "projector_layers": 3,
    "global_crop_scale": (0.25, 1.0),
    "local_crop_scale": (0.05, 0.25),
}
_TREX_STAR_TRAINING = {
    "projector_layers": 1,
    "global_crop_scale": (0.40, 1.0),
    "local_crop_scale": (0.05, 0.40),
}

_ENTRIES = (
    ModelEntry(
        name="trex",
        title="t-ReX (paper)",
        description="t-ReX ResNet-50 from the paper: best transfer, 3-layer expendable projector "
        "during training; released as backbone only.",
        aliases=("t-rex",),
        backbone_file=FileInfo("trex.pth", "backbone"),
        full_file=None,
        projector=ProjectorConfig(num_layers=3),
        imagenet_top1=78.0,
        transfer_log_odds=1.1704,
        training=_TREX_TRAINING,
    ),
    ModelEntry(
        name="trex_repro",
        title="t-ReX (reproduced)",
        description="t-ReX ResNet-50 retrained with the public code; released with its full "
        "training checkpoint (projector, OCM memory, EMA copy).",
        aliases=("trex_2", "t-rex_2", "t-rex-repro"),
        backbone_file=FileInfo("trex_2.pth", "backbone"),
        full_file=FileInfo("trex_2_checkpoint_full.pth", "full"),
        projector=ProjectorConfig(num_layers=3),
        imagenet_top1=77.9,
        transfer_log_odds=1.1664,
        training=_TREX_TRAINING,
    ),
    ModelEntry(
        name="trex_star",
        title="t-ReX* (paper)",
        description="t-ReX* ResNet-50 from the paper: best ImageNet top-1 with strong transfer, "
        "1-layer expendable projector during training; released as backbone only.",
        aliases=("t-rex*", "trexstar", "trex*", "t-rex-star"),
        backbone_file=FileInfo("trexstar.pth", "backbone"),
        full_file=None,
        projector=ProjectorConfig(num_layers=1),
        imagenet_top1=80.2,
        transfer_log_odds=0.8829,
        training=_TREX_STAR_TRAINING,
    ),
    ModelEntry(
        name="trex_star_repro",
        title="t-ReX* (reproduced)",
        description="t-ReX* ResNet-50 retrained with the public code; released with its full "
        "training checkpoint (projector, OCM memory, EMA copy).",
        aliases=("trexstar_2", "t-rex*_2", "trex*_2", "t-rex-star-repro"),
        backbone_file=FileInfo("trexstar_2.pth", "backbone"),
        full_file=FileInfo("trexstar_2_checkpoint_full.pth", "full"),
        projector=ProjectorConfig(num_layers=1),
        imagenet_top1=80.2,
        transfer_log_odds=0.8800,
        training=_TREX_STAR_TRAINING,
    ),
)

MODELS: Dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}

_LOOKUP: Dict[str, str] = {}
for _e in _ENTRIES:
    for _key in (_e.name, *_e.aliases):
        _LOOKUP[_key.lower()] = _e.name


def _normalise(name: str) -> str:
    return name.strip().lower()


def list_models() -> List[str]:
    """Names of the released models, sorted."""
    return sorted(MODELS)


def projector_models() -> List[str]:
    """Names of the models released with their projector (full training checkpoint)."""
    return [e.name for e in MODELS.values() if e.has_projector]


def is_known(name: str) -> bool:
    return isinstance(name, str) and _normalise(name) in _LOOKUP


def get_entry(name: str) -> ModelEntry:
    """The registry entry for a name or alias (case-insensitive).

    Raises :class:`UnknownModelError` listing the known names and the closest match.
    """
    key = _normalise(name)
    if key in _LOOKUP:
        return MODELS[_LOOKUP[key]]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.4)
    hint = f" Did you mean '{_LOOKUP[close[0]]}'?" if close else ""
    raise UnknownModelError(
        f"unknown model '{name}'.{hint} Known models: {', '.join(list_models())} "
        f"(aliases: {', '.join(sorted(a for e in _ENTRIES for a in e.aliases))}). "
        "A local checkpoint path or an 'hf-hub:org/repo' id also works."
    )


def model_info(name: str) -> dict:
    """Everything the registry knows about one model, as a plain dict (JSON-serialisable)."""
    return get_entry(name).to_dict()
