"""The t-ReX network: torchvision ResNet backbone, expendable projector, cosine prototype classifier.

Pure modules: nothing here reads files or touches the network. ``TReX.extract`` and
``TReX.classify`` hand the work to :mod:`trex_hub.extract`, imported when first called.
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .preprocess import PreprocessConfig, PreprocessLike, as_preprocess_config, timm_crop_pct

# Backbones we can rebuild, with the width of their pooled feature.
BACKBONE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                 "resnet152": 2048}


def build_backbone(arch: str = "resnet50") -> nn.Module:
    """A randomly initialised torchvision ResNet whose ``fc`` is an identity.

    Its state-dict names are exactly torchvision's (minus ``fc.*``).
    """
    if arch not in BACKBONE_DIMS:
        raise ValueError(f"unsupported arch '{arch}'; choose one of {', '.join(BACKBONE_DIMS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    return net


# what set_preprocess writes into pretrained_cfg (timm's keys and ours)
_PREPROCESS_KEYS = ("input_size", "resize", "crop", "interpolation", "mean", "std", "crop_pct",
                    "crop_mode")


class L2Norm(nn.Module):
    """Parameter-free L2 normalisation over the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class ProjectorBlock(nn.Module):
    """``Linear(bias) -> BatchNorm1d -> GELU``; names ``fc``/``bn`` match the released files."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=True)
        self.bn = nn.BatchNorm1d(out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.fc(x)))


class Projector(nn.Module):
    """The expendable head: optional L2 norm, ``num_layers`` hidden blocks, linear bottleneck.

    ``layers.0`` is the (parameter-free) normalisation, ``layers.1..L`` the hidden blocks and
    ``layers.{L+1}`` the bias-free bottleneck, which is the layout of the released checkpoints.
    """

    def __init__(self, in_dim: int = 2048, num_layers: int = 3, hidden_dim: int = 2048,
                 out_dim: int = 256, l2_norm: bool = True):
        super().__init__()
        if num_layers < 0:
            raise ValueError("num_layers must be >= 0")
        self.in_dim, self.num_layers, self.hidden_dim = in_dim, num_layers, hidden_dim
        self.out_dim, self.l2_norm = out_dim, l2_norm
        layers: List[nn.Module] = [L2Norm() if l2_norm else nn.Identity()]
        dim = in_dim
        for _ in range(num_layers):
            layers.append(ProjectorBlock(dim, hidden_dim))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=False))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def config(self) -> Dict[str, Any]:
        return {"num_layers": self.num_layers, "hidden_dim": self.hidden_dim,
                "out_dim": self.out_dim, "l2_norm": self.l2_norm}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def cosine_logits(z: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
    """``l2(z) @ l2(weight).T / tau``."""
    return F.normalize(z, dim=-1) @ F.normalize(weight, dim=-1).t() / tau


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` (names, dtypes, shapes, bytes): the
    weights themselves, not the argument that named them. A resumed extraction must use the
    same ones, and trex-eval's feature cache reuses features of the same ones only (an
    exported folder re-exported in place changes it). About 0.06 s for ResNet-50 on 2 cores."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prototypes_from_memory(features: torch.Tensor, labels: torch.Tensor,
                           num_classes: int) -> torch.Tensor:
    """OCM class prototypes: the L2-normalised per-class sum of memory entries.

    A class with no entry in the memory gets a zero row (so its cosine logit is 0).
    """
    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"memory features {tuple(features.shape)} and labels "
                         f"{tuple(labels.shape)} do not match")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"memory labels must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float32,
                       device=features.device)
    sums.index_add_(0, labels.long(), features.float())
    return F.normalize(sums, dim=-1)


class PrototypeClassifier(nn.Module):
    """Cosine-softmax classifier over fixed class prototypes (temperature ``tau``)."""

    def __init__(self, dim: int, num_classes: int, tau: float = 0.1,
                 class_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # prototypes are stored normalised; a zero row stays zero (logit 0)
        return F.normalize(z, dim=-1) @ self.prototypes.t().to(z.dtype) / self.tau


def build_head(in_dim: int, projector: Any) -> Tuple[nn.Module, int]:
    """The projector for a config (dict or dataclass), or an identity when it is ``None``;
    returned with the width of its output."""
    cfg = _as_dict(projector)
    if cfg is None:
        return nn.Identity(), in_dim
    head = Projector(in_dim=in_dim, **cfg)
    return head, head.out_dim


class Prediction(NamedTuple):
    index: int
    label: str
    prob: float


def imagenet_categories() -> List[str]:
    """The 1000 ImageNet-1K class names, in index order (torchvision's list; no download)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _as_dict(cfg: Any) -> Optional[Dict[str, Any]]:
    if cfg is None or cfg is False:
        return None
    if is_dataclass(cfg):
        return asdict(cfg)
    return dict(cfg)


class TReX(nn.Module):
    """A t-ReX model: ResNet backbone (+ projector) (+ OCM prototype classifier).

    Attributes:
        backbone: a torchvision ResNet with ``fc = Identity``; ``backbone.state_dict()`` uses
            exactly torchvision's names.
        head: the :class:`Projector`, or ``nn.Identity`` when the model is backbone-only.
        classifier: a :class:`PrototypeClassifier`, or ``None``.
        num_features: width of the pooled backbone feature (2048 for ResNet-50).
        out_dim: width of :meth:`forward`'s output (``num_features`` or the projector's 256).
    """

    def __init__(self, arch: str = "resnet50", projector: Any = None,
                 num_classes: Optional[int] = None, tau: float = 0.1,
                 class_names: Optional[Sequence[str]] = None, name: Optional[str] = None,
                 preprocess: PreprocessLike = None):
        super().__init__()
        self.arch = arch
        self.backbone = build_backbone(arch)
        self.num_features = BACKBONE_DIMS[arch]
        proj_cfg = _as_dict(projector)
        self.head, self.out_dim = build_head(self.num_features, proj_cfg)
        self.classifier: Optional[PrototypeClassifier] = None
        if num_classes:
            if proj_cfg is None:
                raise ValueError("a prototype classifier needs the projector (it scores "
                                 "projector outputs)")
            if class_names is None and num_classes == 1000:
                class_names = imagenet_categories()
            self.classifier = PrototypeClassifier(self.out_dim, num_classes, tau, class_names)
        self.set_preprocess(preprocess)
        self.pretrained_cfg["name"] = name

    # -- configuration ------------------------------------------------------------------------
    @property
    def has_projector(self) -> bool:
        return isinstance(self.head, Projector)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        """How images must be prepared for these weights (``trex_hub.get_transform(model)``)."""
        return PreprocessConfig.from_dict(
            {k: self.pretrained_cfg[k] for k in ("resize", "crop", "interpolation", "mean",
                                                 "std")})

    def set_preprocess(self, preprocess: PreprocessLike) -> None:
        """Attach a preprocessing config (a :class:`PreprocessConfig`, its dict, a preset name,
        or ``None`` for the ``"transfer"`` preset) to the model's ``pretrained_cfg``."""
        cfg = as_preprocess_config(preprocess)
        # the rest (name, licence...) stays; crop_pct / crop_mode make timm's
        # resolve_data_config(model=...) build this preprocessing, not its 0.875 default
        keep = {k: v for k, v in getattr(self, "pretrained_cfg", {"name": None}).items()
                if k not in _PREPROCESS_KEYS}
        self.pretrained_cfg: Dict[str, Any] = {
            **keep, "input_size": (3, cfg.crop, cfg.crop), **asdict(cfg),
            "crop_pct": timm_crop_pct(cfg), "crop_mode": "center"}

    def config(self) -> Dict[str, Any]:
        """What is needed to rebuild this architecture (written to ``config.json``)."""
        cfg: Dict[str, Any] = {
            "arch": self.arch,
            "num_features": self.num_features,
            "projector": self.head.config() if self.has_projector else None,
            "classifier": None,
            "name": self.pretrained_cfg.get("name"),
            "preprocess": self.preprocess_config.to_dict(),
        }
        if self.classifier is not None:
            cfg["classifier"] = {"type": "prototypes", "num_classes": self.classifier.num_classes,
                                 "tau": self.classifier.tau}
            names = self.classifier.class_names
            if names is not None and not (len(names) == 1000 and names == imagenet_categories()):
                cfg["classifier"]["class_names"] = names
        return cfg

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "TReX":
        clf = cfg.get("classifier") or {}
        return cls(arch=cfg.get("arch", "resnet50"), projector=cfg.get("projector"),
                   num_classes=clf.get("num_classes"), tau=clf.get("tau", 0.1),
                   class_names=clf.get("class_names"), name=cfg.get("name"),
                   preprocess=cfg.get("preprocess"))

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[N, num_features]`` of a normalised image batch."""
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The active head's output: backbone features, or projector embeddings."""
        return self.forward_head(self.forward_features(x))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._require_classifier()(self.forward(x))

    def _require_classifier(self) -> PrototypeClassifier:
        if self.classifier is None:
            from .registry import projector_models

            carriers = projector_models()
            raise RuntimeError(
                "this model carries no class prototypes, so it cannot classify. Prototypes come "
                "with the full training checkpoints of " + ", ".join(carriers) + ": load one with "
                f"trex_hub.load('{carriers[-1]}', projector=True).")
        return self.classifier

    # -- convenience (work done in trex_hub.extract) ----------------------------------------------
    def extract(self, images: Any, **kwargs: Any):
        """Features of images (paths, PIL images, arrays, tensors): see
        :func:`trex_hub.extract.extract_features` for the options."""
        from .extract import extract_features

        return extract_features(self, images, **kwargs)

    def classify(self, images: Any, topk: int = 5, **kwargs: Any) -> List[List[Prediction]]:
        """Top-``topk`` :class:`Prediction` (index, label, prob) per image, from the prototypes."""
        clf = self._require_classifier()
        if not self.has_projector:  # pragma: no cover - guarded by the constructor
            raise RuntimeError("classification needs the projector")
        from .extract import extract_features

        emb = extract_features(self, images, **kwargs)
        emb_t = torch.as_tensor(emb)
        with torch.inference_mode():
            probs = clf(emb_t.to(clf.prototypes.device)).float().softmax(-1).cpu()
        k = min(int(topk), clf.num_classes)
        values, indices = probs.topk(k, dim=-1)
        names = clf.class_names
        return [[Prediction(int(i), names[int(i)] if names else str(int(i)), float(v))
                 for v, i in zip(vs, ids)] for vs, ids in zip(values, indices)]


# the dense-features wrap (``load(..., features_only=True)``) lives in trex_hub.dense; its
# first documented path was trex_hub.model.FeatureMaps
from .dense import FeatureInfo, FeatureMaps  # noqa: E402,F401
