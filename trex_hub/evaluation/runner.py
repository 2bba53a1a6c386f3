"""``trex-eval run``: datasets -> features (once per model) -> protocol per seed -> result JSONs."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import datasets as dsets
from .features import TRANSFER_SIZE, compute_features
from .protocol import ProtocolConfig, evaluate_features
from .results import make_result, write_result
from ..fileio import PathLike
from ..featurefile import OUTPUT_FORMATS

IMAGE_FORMATS = ("imagefolder", "fashion-mnist")
FORMATS = IMAGE_FORMATS + ("features",) + tuple(dsets.TORCHVISION_DATASETS)
RANDOM_PREFIX = "random:"
RANDOM_INIT_SEED = 0


class EvalError(RuntimeError):
    """A run that cannot go on; the message says why."""


@dataclass
class DataOptions:
    format: str
    data: Optional[str]
    classes: Optional[str] = None
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    subset_seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    name: Optional[str] = None

    def describe(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class FeatureOptions:
    batch_size: int = 64
    image_size: int = TRANSFER_SIZE
    num_workers: int = 0
    device: str = "cpu"
    cache: Optional[str] = None  # folder of cached features (reused when everything matches)


def _model_fingerprint(spec: str) -> Dict[str, Any]:
    raw = spec[len(RANDOM_PREFIX):] if spec.startswith(RANDOM_PREFIX) else spec
    p = Path(raw).expanduser()
    if p.is_file():
        st = p.stat()
        return {"spec": spec, "path": str(p.resolve()), "size": st.st_size,
                "mtime_ns": st.st_mtime_ns}
    return {"spec": spec}


def _cache_key(spec: str, dname: str, data: "DataOptions", fopts: "FeatureOptions",
               parts: Dict[str, dsets.LabeledImages]) -> Tuple[str, Dict[str, Any]]:
    import hashlib
    import json

    h = hashlib.sha256()
    for key in ("train", "test"):
        h.update(np.asarray(parts[key].labels).tobytes())
        items = parts[key].items
        if isinstance(items, np.ndarray):
            h.update(items.tobytes())
        else:
            h.update("\n".join(map(str, items)).encode())
    desc = {"model": _model_fingerprint(spec), "dataset": dname, "data": data.describe(),
            "image_size": fopts.image_size, "inputs_sha256": h.hexdigest()}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20], desc


def _cached_features(spec, dname, data, fopts, parts, compute, log):
    """(Xtr, Xte) from ``fopts.cache`` when an identical run cached them, else computed+stored."""
    if not fopts.cache:
        return compute()
    import json

    from .results import slug

    key, desc = _cache_key(spec, dname, data, fopts, parts)
    folder = Path(fopts.cache)
    path = folder / f"{slug(display_name(spec))}__{slug(dname)}__{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            log(f"  features from cache {path}")
            return z["train"], z["test"]
    Xtr, Xte = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, train=Xtr, test=Xte, meta=np.array(json.dumps(desc, default=str)))
    os.replace(tmp, path)
    return Xtr, Xte


@dataclass
class RunSummary:
    files: List[Path] = field(default_factory=list)
    results: List[Dict[str, Any]] = field(default_factory=list)


def normalise_format(fmt: str) -> str:
    f = fmt.lower()
    if f in ("fashion_mnist", "fashionmnist", "fmnist"):
        return "fashion-mnist"
    if f in ("image-folder", "image_folder", "folder"):
        return "imagefolder"
    if f in IMAGE_FORMATS or f == "features":
        return f
    key = dsets.torchvision_dataset_name(f)
    if key is None:
        raise EvalError(f"unknown --format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return key


def dataset_name(opts: DataOptions) -> str:
    if opts.name:
        return opts.name
    if opts.format == "fashion-mnist":
        name = "fashion-mnist"
    elif opts.format in ("imagefolder", "features"):
        name = Path(opts.data or ".").expanduser().resolve().name or opts.format
    else:
        name = opts.format
    if opts.classes:
        name += f"[{opts.classes}]"
    return name


def load_image_dataset(opts: DataOptions) -> Dict[str, dsets.LabeledImages]:
    """{"train": trainval, "test": test} for the image formats, limits applied."""
    if opts.format == "fashion-mnist":
        parts = {s: dsets.load_fashion_mnist(opts.data, s, classes=opts.classes)
                 for s in ("train", "test")}
    elif opts.format == "imagefolder":
        if not opts.data:
            raise EvalError("--format imagefolder needs --data ROOT")
        parts = dsets.load_image_folder(opts.data, test_fraction=opts.test_fraction,
                                        seed=opts.split_seed, classes=opts.classes)
    else:
        if not opts.data:
            raise EvalError(f"--format {opts.format} needs --data ROOT (the torchvision root)")
        parts = dsets.load_torchvision_dataset(opts.format, opts.data,
                                               test_fraction=opts.test_fraction,
                                               seed=opts.split_seed)
        if opts.classes:
            sel = dsets.parse_classes(opts.classes, parts["train"].class_names)
            for key, part in list(parts.items()):
                keep, new = dsets.select_classes(part.labels, sel)
                sub = part.subset(keep)
                sub.labels = new
                sub.class_names = [part.class_names[c] for c in sel]  # type: ignore[index]
                parts[key] = sub
    for key, limit in (("train", opts.train_limit), ("test", opts.test_limit)):
        if limit:
            parts[key] = parts[key].subset(dsets.balanced_subset(parts[key].labels, limit,
                                                                 opts.subset_seed))
    if len(parts["train"]) < 2 or len(parts["test"]) < 1:
        raise EvalError(f"dataset too small: {len(parts['train'])} trainval and "
                        f"{len(parts['test'])} test images")
    return parts


# ---- pre-extracted features ---------------------------------------------------------------------
_TRAIN_NAMES = ("trainval", "train")
_TEST_NAMES = ("test", "val")




def _find_split(base: Path, names: Sequence[str]) -> Optional[Path]:
    for n in names:
        for suffix in OUTPUT_FORMATS:
            if (base / f"{n}{suffix}").is_file():
                return base / f"{n}{suffix}"
    return None


def _read_feature_split(path: Path) -> Tuple[np.ndarray, List[Any]]:
    from ..featurefile import read_features

    feats, rows = read_features(path)
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2:
        raise EvalError(f"{path}: features of shape {feats.shape}, expected [N, D]")
    # row i of the features belongs to the manifest row whose "index" is i; failed files have
    # no features (index None) and are left out
    rows = [r for r in rows if r.get("index") is not None and r.get("status", "ok") == "ok"]
    idx = [int(r["index"]) for r in rows]
    if any(i < 0 or i >= len(feats) for i in idx):
        raise EvalError(f"{path}: manifest indices outside the {len(feats)} feature rows")
    feats = feats[idx]
    labels = [r.get("label") for r in rows]
    missing = sum(1 for x in labels if x is None or x == "")
    if missing:
        raise EvalError(f"{path}: {missing} of {len(rows)} images have no label in the manifest; "
                        "extract an ImageFolder tree (class folders give the labels)")
    return feats, labels


def _label_order(values: Sequence[Any]) -> List[Any]:
    uniq = list(dict.fromkeys(values))
    try:
        return sorted(uniq, key=lambda v: (0, int(v)) if str(v).lstrip("-").isdigit()
                      else (1, str(v)))
    except (TypeError, ValueError):  # pragma: no cover
        return sorted(uniq, key=str)


def load_feature_sets(data: PathLike, model: Optional[str],
                      several: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                              List[str]]:
    """Trainval and test features + integer labels from trex-extract outputs.

    Layout: ``DATA/train*`` + ``DATA/test*`` (one model), or ``DATA/<model>/train*`` +
    ``DATA/<model>/test*`` (several; ``trainval`` / ``val`` are accepted too).
    """
    base = Path(data).expanduser()
    if not base.is_dir():
        raise dsets.DatasetNotFoundError(f"feature folder {base} does not exist")
    if model is not None and (several or (base / model).is_dir()):
        base = base / model
    tr, te = _find_split(base, _TRAIN_NAMES), _find_split(base, _TEST_NAMES)
    if tr is None or te is None:
        raise dsets.DatasetNotFoundError(
            f"{base}: expected trex-extract outputs named train* (or trainval*) and test* "
            f"(or val*){' for model ' + model if model else ''}; found "
            f"{sorted(p.name for p in base.iterdir()) if base.is_dir() else 'no folder'}")
    Xtr, ltr = _read_feature_split(tr)
    Xte, lte = _read_feature_split(te)
    classes = _label_order(ltr)
    index = {str(c): i for i, c in enumerate(classes)}
    unknown = sorted({str(x) for x in lte} - set(index))
    if unknown:
        raise EvalError(f"{te}: test labels {unknown[:5]} never occur in {tr}")
    ytr = np.asarray([index[str(x)] for x in ltr], dtype=np.int64)
    yte = np.asarray([index[str(x)] for x in lte], dtype=np.int64)
    return Xtr, ytr, Xte, yte, [str(c) for c in classes]


# ---- models -------------------------------------------------------------------------------------
def display_name(spec: str) -> str:
    if spec.startswith(RANDOM_PREFIX):
        return RANDOM_PREFIX + display_name(spec[len(RANDOM_PREFIX):])
    p = Path(spec).expanduser()
    if p.exists():
        return p.stem if p.is_file() else p.name
    return spec


def load_model(spec: str, device: str):
    import trex_hub

    if spec.startswith(RANDOM_PREFIX):
        import torch

        # deterministic random weights: the same random:NAME gives the same model every run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return trex_hub.load(spec[len(RANDOM_PREFIX):], pretrained=False, device=device)
    return trex_hub.load(spec, device=device)


def run(models: Sequence[str], data: DataOptions, out_dir: PathLike, *,
        seeds: Sequence[int] = (0,), protocol: Optional[ProtocolConfig] = None,
        features: Optional[FeatureOptions] = None, names: Optional[Sequence[str]] = None,
        log: Callable[[str], None] = lambda m: None, progress: bool = False) -> RunSummary:
    """Evaluate every model on one dataset for every seed; one result JSON per (model, seed).

    ``progress`` shows bars with an ETA on stderr for the feature extraction and for each
    seed's probe search (trials + refit).
    """
    from .progress import progress_bar

    protocol = protocol or ProtocolConfig()
    fopts = features or FeatureOptions()
    if names is not None and len(names) != len(models):
        raise EvalError(f"{len(names)} --names for {len(models)} --models")
    if not seeds:
        raise EvalError("no seeds given")
    dname = dataset_name(data)
    summary = RunSummary()
    parts = None
    if data.format != "features":
        parts = load_image_dataset(data)
        log(f"dataset {dname}: {len(parts['train'])} trainval / {len(parts['test'])} test "
            f"images, {parts['train'].num_classes} classes")
    model_list = list(models) or ([None] if data.format == "features" else [])
    if not model_list:
        raise EvalError("no --models given")
    for i, spec in enumerate(model_list):
        mname = (names[i] if names else None) or (display_name(spec) if spec else dataset_name(
            DataOptions("features", data.data)))
        t0 = time.time()
        if parts is None:
            Xtr, ytr, Xte, yte, classes = load_feature_sets(data.data or ".", spec,
                                                            several=len(model_list) > 1)
            feat_info: Dict[str, Any] = {"source": "trex-extract files",
                                         "data": str(Path(data.data or ".").resolve())}
            log(f"model {mname}: read {len(Xtr)} trainval / {len(Xte)} test features "
                f"(dim {Xtr.shape[1]})")
        else:
            log(f"model {mname}: loading {spec}")
            model = load_model(spec, fopts.device)

            def compute(model=model, parts=parts):
                kw = dict(batch_size=fopts.batch_size, image_size=fopts.image_size,
                          num_workers=fopts.num_workers, log=log, progress=progress)
                return (compute_features(model, parts["train"].items, what=f"{dname} trainval",
                                         **kw),
                        compute_features(model, parts["test"].items, what=f"{dname} test", **kw))

            Xtr, Xte = _cached_features(spec, dname, data, fopts, parts, compute, log)
            ytr, yte = parts["train"].labels, parts["test"].labels
            classes = parts["train"].class_names
            feat_info = {"source": "computed", "model_spec": spec, "arch": model.arch,
                         "head": "projector" if model.has_projector else "backbone",
                         "image_size": fopts.image_size,
                         "preprocess": (f"Resize({fopts.image_size}, bicubic) -> CenterCrop("
                                        f"{fopts.image_size}) -> ImageNet mean/std"),
                         "dtype": "float32", "mode": "eval", "batch_size": fopts.batch_size,
                         "device": fopts.device}
            del model
        feat_info["seconds"] = round(time.time() - t0, 2)
        if not np.isfinite(Xtr).all() or not np.isfinite(Xte).all():
            raise EvalError(f"model {mname}: features contain NaN or inf")
        for seed in seeds:
            log(f"model {mname}, dataset {dname}, seed {seed}: {protocol.trials} trials")
            bar = progress_bar(protocol.trials + 1, f"probe {mname} seed {seed}", "fit",
                               progress)
            try:
                res = evaluate_features(Xtr, ytr, Xte, yte, config=protocol, seed=int(seed),
                                        num_classes=len(classes), log=log,
                                        progress=bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            result = make_result(mname, dname, res, model_spec=spec, data=data.describe(),
                                 features=feat_info, class_names=list(classes))
            path = write_result(out_dir, result)
            summary.files.append(path)
            summary.results.append(result)
            log(f"  -> {path}: top-1 {res['top1']:.2f}")
    return summary
