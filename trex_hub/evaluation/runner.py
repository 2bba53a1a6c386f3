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
from .protocol import ProtocolConfig, evaluate_features, search_split
from .results import make_result, write_result
from ..fileio import PathLike
from ..featurefile import OUTPUT_FORMATS

IMAGE_FORMATS = ("imagefolder", "fashion-mnist")
FORMATS = IMAGE_FORMATS + ("features",) + tuple(dsets.TORCHVISION_DATASETS)
RANDOM_PREFIX = "random:"
RANDOM_INIT_SEED = 0


class EvalError(RuntimeError):
    """A run that cannot go on; the message says why."""


class EvalUsageError(EvalError):
    """The arguments ask for something impossible (clashing names, an --out that is a file...);
    ``trex-eval`` exits 2 on it, as on any usage error. Raised before any model is loaded."""


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


CACHE_KEY_VERSION = 2  # 2: weights by content, images by size and modification time


def _weights_sha256(model: Any) -> str:
    """sha256 of every parameter and buffer of the loaded model.

    The weights themselves, not the argument that named them: an exported folder re-exported in
    place, a checkpoint copied over another, an ``hf-hub:`` id whose repository moved on or a
    registry file replaced in the download cache all change the key. Hashing ResNet-50's 100 MB
    takes a fraction of a second, next to minutes of feature extraction.
    """
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_stamp(item: Any) -> str:
    """``size:mtime_ns`` of an image file: a rewritten image changes the key without reading
    every image; a missing one gets a stamp of its own (its read fails with a clear error)."""
    try:
        st = os.stat(item)
    except (OSError, TypeError, ValueError):
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _inputs_sha256(parts: Dict[str, dsets.LabeledImages]) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in ("train", "test"):
        h.update(np.asarray(parts[key].labels).tobytes())
        items = parts[key].items
        if isinstance(items, np.ndarray):  # decoded images (Fashion-MNIST): the pixels
            h.update(items.tobytes())
        else:
            for item in items:
                h.update(f"{item}\t{_file_stamp(item)}\n".encode())
    return h.hexdigest()


def _cache_key(model: Any, spec: str, dname: str, data: "DataOptions", fopts: "FeatureOptions",
               parts: Dict[str, dsets.LabeledImages]) -> Tuple[str, Dict[str, Any]]:
    import hashlib
    import json

    preprocess = getattr(model, "preprocess_config", None)
    desc = {"version": CACHE_KEY_VERSION,
            "model": {"spec": spec, "weights_sha256": _weights_sha256(model),
                      "head": "projector" if getattr(model, "has_projector", False)
                      else "backbone",
                      "preprocess": preprocess.to_dict() if preprocess is not None else None},
            "dataset": dname, "data": data.describe(), "image_size": fopts.image_size,
            "inputs_sha256": _inputs_sha256(parts)}
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:20], desc


def _cached_features(model, spec, dname, data, fopts, parts, compute, log):
    """(Xtr, Xte) from ``fopts.cache`` when an identical run cached them, else computed+stored.

    Identical means the same weights (by content), the same images (paths, labels, sizes and
    modification times; the pixels for decoded sets), dataset options and image size.
    """
    if not fopts.cache:
        return compute()
    import json

    from .results import slug

    key, desc = _cache_key(model, spec, dname, data, fopts, parts)
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


def _select_classes(parts: Dict[str, dsets.LabeledImages],
                    spec: Optional[str]) -> Dict[str, dsets.LabeledImages]:
    """Keep the ``--classes`` of both sides, relabelled in the order given."""
    if not spec:
        return parts
    sel = dsets.parse_classes(spec, parts["train"].class_names) or []
    out = {}
    for key, part in parts.items():
        keep, new = dsets.select_classes(part.labels, sel)
        sub = part.subset(keep)
        sub.labels = new
        sub.class_names = [part.class_names[c] for c in sel]  # type: ignore[index]
        out[key] = sub
    return out


def _apply_limits(parts: Dict[str, dsets.LabeledImages],
                  opts: DataOptions) -> Dict[str, dsets.LabeledImages]:
    """The class-balanced ``--train-limit`` / ``--test-limit`` subsets, then the size check."""
    parts = dict(parts)
    for key, limit in (("train", opts.train_limit), ("test", opts.test_limit)):
        if limit:
            parts[key] = parts[key].subset(dsets.balanced_subset(parts[key].labels, limit,
                                                                 opts.subset_seed))
    if len(parts["train"]) < 2 or len(parts["test"]) < 1:
        raise EvalError(f"dataset too small: {len(parts['train'])} trainval and "
                        f"{len(parts['test'])} test images")
    return parts


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
        parts = _select_classes(parts, opts.classes)
    return _apply_limits(parts, opts)


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


def feature_folder(data: PathLike, model: Optional[str], several: bool) -> Path:
    """Where the trex-extract outputs of ``model`` are: ``DATA`` or ``DATA/<model>``."""
    base = Path(data).expanduser()
    if model is not None and (several or (base / model).is_dir()):
        return base / model
    return base


def feature_files(data: PathLike, model: Optional[str], several: bool) -> Tuple[Path, Path]:
    """(trainval file, test file) of ``model``; a missing one is an error naming the folder.

    Cheap (a few ``stat`` calls), so a run checks every model's files before the first search.
    """
    root = Path(data).expanduser()
    if not root.is_dir():
        raise dsets.DatasetNotFoundError(f"feature folder {root} does not exist")
    base = feature_folder(data, model, several)
    tr, te = _find_split(base, _TRAIN_NAMES), _find_split(base, _TEST_NAMES)
    if tr is None or te is None:
        raise dsets.DatasetNotFoundError(
            f"{base}: expected trex-extract outputs named train* (or trainval*) and test* "
            f"(or val*){' for model ' + model if model else ''}; found "
            f"{sorted(p.name for p in base.iterdir()) if base.is_dir() else 'no folder'}")
    return tr, te


def load_feature_sets(data: PathLike, model: Optional[str],
                      several: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                              List[str]]:
    """Trainval and test features + integer labels from trex-extract outputs.

    Layout: ``DATA/train*`` + ``DATA/test*`` (one model), or ``DATA/<model>/train*`` +
    ``DATA/<model>/test*`` (several; ``trainval`` / ``val`` are accepted too). Classes are
    numbered in the order of the sorted labels (numbers numerically); :func:`subset_features`
    applies ``--classes`` and the limits.
    """
    tr, te = feature_files(data, model, several)
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


def subset_features(sets: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, List[str]],
                    opts: DataOptions) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                List[str]]:
    """``--classes``, ``--train-limit`` and ``--test-limit`` on feature arrays.

    The rows go through the very code that subsets images (:func:`_select_classes`,
    :func:`_apply_limits`), so features extracted from an ImageFolder tree keep the rows of the
    images ``--format imagefolder`` keeps, and a result named ``feats[0,1]`` was evaluated on
    classes 0 and 1. Without these options the arrays come back untouched.
    """
    Xtr, ytr, Xte, yte, classes = sets
    parts = {"train": dsets.LabeledImages(Xtr, ytr, list(classes)),
             "test": dsets.LabeledImages(Xte, yte, list(classes))}
    try:
        parts = _select_classes(parts, opts.classes)
    except ValueError as exc:
        raise EvalError(f"--classes {opts.classes}: {exc}") from None
    parts = _apply_limits(parts, opts)
    return (parts["train"].items, parts["train"].labels, parts["test"].items,
            parts["test"].labels, parts["train"].class_names)


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


def _spec_source(spec: str) -> str:
    if spec.startswith(RANDOM_PREFIX):
        return RANDOM_PREFIX + _spec_source(spec[len(RANDOM_PREFIX):])
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def model_source(spec: Optional[str], data: DataOptions, several: bool) -> str:
    """What a result is computed from, recorded as its ``model_source``: the absolute path of a
    local checkpoint, exported folder or feature folder, else the registry name or hf-hub id.

    Unlike the display name it tells two ``runs/*/checkpoint.pth`` apart, so a later run can
    see that the result file it is about to replace belongs to another model.
    """
    if data.format == "features":
        return str(feature_folder(data.data or ".", spec, several).resolve())
    return _spec_source(str(spec))


def check_seeds(seeds: Sequence[int]) -> List[int]:
    """The seeds as ints; a repeated seed is refused (it would write its file twice and count
    twice in the run's table, as two seeds of one model)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise EvalError("no seeds given")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise EvalUsageError(f"--seeds {' '.join(map(str, seeds))} repeats "
                             f"{', '.join(map(str, repeated))}: give each seed once")
    return seeds


def _qualified_name(spec: str) -> str:
    """``r0-checkpoint`` for ``runs/r0/checkpoint.pth``: the name with its parent folder."""
    if spec.startswith(RANDOM_PREFIX):
        return RANDOM_PREFIX + _qualified_name(spec[len(RANDOM_PREFIX):])
    p = Path(spec).expanduser()
    parent = p.resolve().parent.name if p.exists() else ""
    return f"{parent}-{display_name(spec)}" if parent else display_name(spec)


def _name_clash(plan: List[Tuple[Optional[str], str]], clash: List[int], given: bool) -> str:
    import shlex

    from .results import slug

    (a, na), (b, nb) = plan[clash[0]], plan[clash[1]]
    if a == b and not given:
        return f"--models gives {a} twice; give each model once"
    if given and na == nb:
        return (f"--names gives '{na}' to both {a} and {b}; their result files would replace "
                "each other: give every model its own name")
    if given:
        return (f"--names '{na}' ({a}) and '{nb}' ({b}) give the same result file name "
                f"'{slug(na)}': use names that differ in letters, digits or ._+-")
    clashing = {slug(plan[i][1]) for i in clash}
    hint = [_qualified_name(spec) if spec and slug(name) in clashing else name
            for spec, name in plan]
    example = (f", e.g. --names {' '.join(shlex.quote(h) for h in hint)}"
               if len({slug(h) for h in hint}) == len(hint) else "")
    return (f"--models {a} and {b} are both named '{na}', so their result files would replace "
            f"each other and the report would show them as seeds of one model; give each its "
            f"own name with --names{example}")


def plan_models(models: Sequence[str], data: DataOptions,
                names: Optional[Sequence[str]] = None) -> List[Tuple[Optional[str], str]]:
    """(spec, display name) of every model; two names that give one result file are refused.

    ``--names`` or :func:`display_name`; the features format without ``--models`` evaluates the
    folder itself (spec ``None``), named after it.
    """
    if names is not None and len(names) != len(models):
        raise EvalError(f"{len(names)} --names for {len(models)} --models")
    if not models:
        if data.format != "features":
            raise EvalError("no --models given")
        return [(None, dataset_name(DataOptions("features", data.data)))]
    from .results import slug

    plan = [(spec, (names[i] if names else None) or display_name(spec))
            for i, spec in enumerate(models)]
    first: Dict[str, int] = {}
    for i, (_, name) in enumerate(plan):
        j = first.setdefault(slug(name), i)
        if j != i:
            raise EvalUsageError(_name_clash(plan, [j, i], bool(names)))
    return plan


def prepare_folders(*folders: Tuple[Optional[PathLike], str]) -> None:
    """Create the folders of ``(path, flag)`` pairs and prove them writable, before any work.

    Otherwise a file in the way or a missing permission surfaces only when the first result is
    written, after the feature extraction and the whole search. Files in the way are looked for
    first, so that a refused run creates no folder.
    """
    import tempfile

    for path, flag in folders:
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise EvalUsageError(f"{flag} {path} is a file, not a folder; give a folder (it is "
                                 "created when missing)")
    for path, flag in folders:
        if path is None:
            continue
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise EvalUsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); "
                                 "give a folder you can write to") from None


def _earlier_source(path: Path) -> Optional[str]:
    """``model_source`` of the result already at ``path`` (``None``: none, or not recorded)."""
    import json

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    source = data.get("model_source") if isinstance(data, dict) else None
    return source if isinstance(source, str) else None


def check_earlier_results(out: Path, plan: List[Tuple[Optional[str], str]],
                          sources: Sequence[str], dname: str, seeds: Sequence[int]) -> None:
    """Refuse to replace a result another model wrote under the same name.

    Two ``runs/*/checkpoint.pth`` evaluated one after the other into one ``--out`` are both
    named ``checkpoint``; the second would silently replace the first's files. A rerun of the
    same model replaces its own results (the log says so); results written before
    ``model_source`` was recorded cannot be told apart and are replaced as before.
    """
    from .results import result_filename

    for (spec, name), source in zip(plan, sources):
        for seed in seeds:
            path = out / result_filename(name, dname, seed)
            earlier = _earlier_source(path)
            if earlier is not None and earlier != source:
                raise EvalUsageError(
                    f"--out {out} already holds {path}, the result of {earlier} under the name "
                    f"'{name}'; this run's {spec or source} would replace it: give it another "
                    f"name with --names or use another --out (delete {path.name} to replace it "
                    "on purpose)")


def _check_trainval(labels: np.ndarray, seed: int, protocol: ProtocolConfig, dname: str,
                    data: DataOptions) -> None:
    """The search's train part must not be empty; asked before features are extracted."""
    try:
        search_split(labels, seed, protocol)
    except ValueError as exc:
        hint = ""
        if data.train_limit:
            k = len(np.unique(labels))
            hint = f" (with --train-limit {data.train_limit}: at least {2 * k} for {k} classes)"
        raise EvalError(f"dataset {dname}: {exc}{hint}") from None


def _read_features(spec: Optional[str], mname: str, data: DataOptions, several: bool, log):
    """Features, labels and class names of ``spec`` from trex-extract files, subset as asked."""
    Xtr, ytr, Xte, yte, classes = subset_features(
        load_feature_sets(data.data or ".", spec, several=several), data)
    log(f"model {mname}: read {len(Xtr)} trainval / {len(Xte)} test features "
        f"(dim {Xtr.shape[1]})")
    info: Dict[str, Any] = {"source": "trex-extract files",
                            "data": str(Path(data.data or ".").resolve())}
    return Xtr, ytr, Xte, yte, classes, info


def _extract(spec: str, mname: str, dname: str, data: DataOptions, fopts: FeatureOptions,
             parts: Dict[str, dsets.LabeledImages], log, progress: bool):
    """(trainval features, test features, feature info) of model ``spec``, cache permitting."""
    log(f"model {mname}: loading {spec}")
    model = load_model(spec, fopts.device)

    def compute():
        kw = dict(batch_size=fopts.batch_size, image_size=fopts.image_size,
                  num_workers=fopts.num_workers, log=log, progress=progress)
        return (compute_features(model, parts["train"].items, what=f"{dname} trainval", **kw),
                compute_features(model, parts["test"].items, what=f"{dname} test", **kw))

    Xtr, Xte = _cached_features(model, spec, dname, data, fopts, parts, compute, log)
    info = {"source": "computed", "model_spec": spec, "arch": model.arch,
            "head": "projector" if model.has_projector else "backbone",
            "image_size": fopts.image_size,
            "preprocess": (f"Resize({fopts.image_size}, bicubic) -> CenterCrop("
                           f"{fopts.image_size}) -> ImageNet mean/std"),
            "dtype": "float32", "mode": "eval", "batch_size": fopts.batch_size,
            "device": fopts.device}
    return Xtr, Xte, info


def run(models: Sequence[str], data: DataOptions, out_dir: PathLike, *,
        seeds: Sequence[int] = (0,), protocol: Optional[ProtocolConfig] = None,
        features: Optional[FeatureOptions] = None, names: Optional[Sequence[str]] = None,
        log: Callable[[str], None] = lambda m: None, progress: bool = False) -> RunSummary:
    """Evaluate every model on one dataset for every seed; one result JSON per (model, seed).

    Everything that can be checked without a model is checked first: unique names and seeds,
    the dataset (or every model's feature files), a trainval the search can use, writable
    ``--out`` / cache folders, and no other model's result in the way. ``progress`` shows bars
    with an ETA on stderr for the feature extraction and for each seed's probe search (trials +
    refit).
    """
    from .results import result_filename

    protocol = protocol or ProtocolConfig()
    fopts = features or FeatureOptions()
    seeds = check_seeds(seeds)
    plan = plan_models(models, data, names)
    several = len(plan) > 1
    dname = dataset_name(data)
    parts = None
    if data.format != "features":
        parts = load_image_dataset(data)
        _check_trainval(parts["train"].labels, seeds[0], protocol, dname, data)
        log(f"dataset {dname}: {len(parts['train'])} trainval / {len(parts['test'])} test "
            f"images, {parts['train'].num_classes} classes")
    else:
        for spec, _ in plan:
            feature_files(data.data or ".", spec, several)
    prepare_folders((out_dir, "--out"), (fopts.cache or None, "--cache"))
    out = Path(out_dir)
    sources = [model_source(spec, data, several) for spec, _ in plan]
    check_earlier_results(out, plan, sources, dname, seeds)
    summary = RunSummary()
    for (spec, mname), source in zip(plan, sources):
        t0 = time.time()
        if parts is None:
            Xtr, ytr, Xte, yte, classes, feat_info = _read_features(spec, mname, data, several,
                                                                    log)
            _check_trainval(ytr, seeds[0], protocol, dname, data)
        else:
            Xtr, Xte, feat_info = _extract(str(spec), mname, dname, data, fopts, parts, log,
                                           progress)
            ytr, yte = parts["train"].labels, parts["test"].labels
            classes = parts["train"].class_names
        feat_info["seconds"] = round(time.time() - t0, 2)
        if not np.isfinite(Xtr).all() or not np.isfinite(Xte).all():
            raise EvalError(f"model {mname}: features contain NaN or inf")
        for seed in seeds:
            res = _evaluate_seed(Xtr, ytr, Xte, yte, len(classes), mname, dname, seed, protocol,
                                 log, progress)
            result = make_result(mname, dname, res, model_spec=spec, model_source=source,
                                 data=data.describe(), features=feat_info,
                                 class_names=list(classes))
            target = out / result_filename(mname, dname, seed)
            if target.exists():
                log(f"  replacing {target}")
            path = write_result(out_dir, result)
            summary.files.append(path)
            summary.results.append(result)
            log(f"  -> {path}: top-1 {res['top1']:.2f}")
    return summary


def _evaluate_seed(Xtr, ytr, Xte, yte, num_classes: int, mname: str, dname: str, seed: int,
                   protocol: ProtocolConfig, log, progress: bool) -> Dict[str, Any]:
    """The protocol for one seed, with its progress bar (trials + refit)."""
    from .progress import progress_bar

    log(f"model {mname}, dataset {dname}, seed {seed}: {protocol.trials} trials")
    bar = progress_bar(protocol.trials + 1, f"probe {mname} seed {seed}", "fit", progress)
    try:
        return evaluate_features(Xtr, ytr, Xte, yte, config=protocol, seed=int(seed),
                                 num_classes=num_classes, log=log,
                                 progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
