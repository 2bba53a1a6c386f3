"""``trex-eval run``: datasets -> features (once per model) -> protocol per seed -> result JSONs."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import datasets as dsets
from .feature_cache import CACHE_KEY_VERSION, _cached_features
from .feature_check import check_feature_model
from .feature_sets import feature_files, feature_folder, load_feature_sets, subset_features
from .features import compute_features
from .image_sets import load_image_dataset
from .models import RANDOM_INIT_SEED, RANDOM_PREFIX, display_name, load_model, model_source
from .options import DataOptions, EvalError, EvalUsageError, FeatureOptions
from .protocol import ProtocolConfig, evaluate_features, search_split
from .results import make_result, write_result
from ..fileio import PathLike

__all__ = ["run", "RunSummary", "DataOptions", "FeatureOptions", "EvalError", "EvalUsageError",
           "IMAGE_FORMATS", "FORMATS", "RANDOM_PREFIX", "RANDOM_INIT_SEED", "CACHE_KEY_VERSION",
           "normalise_format", "dataset_name", "load_image_dataset", "feature_folder",
           "feature_files", "load_feature_sets", "subset_features", "display_name", "load_model",
           "model_source", "dataset_source", "check_seeds", "plan_models", "prepare_folders",
           "check_earlier_results"]

IMAGE_FORMATS = ("imagefolder", "fashion-mnist")
FORMATS = IMAGE_FORMATS + ("features",) + tuple(dsets.TORCHVISION_DATASETS)


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

    ``--names`` or :func:`display_name`, with the parent folder in front where two stems are
    alike (``runs/a/checkpoint.pth``: ``a-checkpoint``); the features format without
    ``--models`` evaluates the folder itself (spec ``None``), named after it.
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
    if not names:  # runs/a/checkpoint.pth and runs/b/checkpoint.pth: a-checkpoint, b-checkpoint
        stems = [slug(name) for _, name in plan]
        plan = [(spec, _qualified_name(spec) if spec and stems.count(slug(name)) > 1 else name)
                for spec, name in plan]
    first: Dict[str, int] = {}
    for i, (_, name) in enumerate(plan):
        j = first.setdefault(slug(name), i)
        if j != i:
            raise EvalUsageError(_name_clash(plan, [j, i], bool(names)))
    return plan


def prepare_folders(*folders: Tuple[Optional[PathLike], str]) -> None:
    """Prove the folders of ``(path, flag)`` pairs writable, before any work, creating none.

    Otherwise a file in the way or a missing permission surfaces only when the first result is
    written, after the feature extraction and the whole search. A folder that does not exist
    yet is judged by its nearest existing parent, and made when the first file is written: a
    run that fails first (a mistyped model, an unreadable image) leaves nothing behind.
    """
    import tempfile

    for path, flag in folders:
        if path is None:
            continue
        here = Path(path).expanduser().absolute()
        while not here.exists() and here != here.parent:
            here = here.parent
        if not here.is_dir():
            what = "is a file" if here == Path(path).expanduser().absolute() else \
                f"is inside {here}, which is a file"
            raise EvalUsageError(f"{flag} {path} {what}, not a folder; give a folder (it is "
                                 "created when missing)")
        try:
            with tempfile.TemporaryFile(dir=here):
                pass
        except OSError as exc:
            raise EvalUsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); "
                                 "give a folder you can write to") from None


def dataset_source(opts: DataOptions) -> Optional[str]:
    """What a result's dataset is read from, recorded as its ``dataset_source``: the absolute
    path of the image folder or torchvision root, or of the folder the Fashion-MNIST files were
    found in. ``None`` for ``--format features``: a feature folder holds one model's features of
    some images, so two models' folders of one dataset differ, and the images themselves are
    not known here.

    Unlike the dataset name (the folder's name, or the format) it tells ``/data/a/flowers`` and
    ``/data/b/flowers`` apart, so a later run can see that the results it is about to replace,
    or to be averaged with in a report, were computed on another dataset.
    """
    if opts.format == "features":
        return None
    if opts.format == "fashion-mnist":
        return str(dsets.fashion_mnist_files(opts.data, "train")[0].parent.resolve())
    return str(Path(opts.data or ".").expanduser().resolve())


def _qualified_dataset_name(dname: str, source: str) -> Optional[str]:
    """``b-flowers`` for ``/data/b/flowers`` (and for the torchvision root ``/data/b``)."""
    p = Path(source)
    folder = p.parent.name if dname.startswith(p.name) else p.name
    return f"{folder}-{dname}" if folder else None


def _earlier_sources(out: Path, dname: str) -> List[Tuple[Path, str, Dict[str, Any]]]:
    """The results in ``out`` on dataset ``dname`` (every model and seed): path, model name and
    the recorded ``model_source`` / ``dataset_source`` (missing when not recorded)."""
    import json

    from .results import result_pattern, slug

    found = []
    for path in sorted(out.glob(result_pattern(dname))):
        try:
            data = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("model"), str) \
                or slug(data.get("dataset", "")) != slug(dname):
            continue
        found.append((path, data["model"], {k: data[k] for k in ("model_source",
                                                                   "dataset_source")
                                            if isinstance(data.get(k), str)}))
    return found


def check_earlier_results(out: Path, plan: List[Tuple[Optional[str], str]],
                          sources: Sequence[str], dname: str,
                          data_source: Optional[str] = None) -> None:
    """Refuse to replace, or to add to, results another model or dataset wrote under the same
    names.

    Two ``runs/*/checkpoint.pth`` evaluated one after the other into one ``--out`` are both
    named ``checkpoint``, and ``/data/a/flowers`` and ``/data/b/flowers`` are both ``flowers``;
    the second would silently replace the first's files, or add seeds (or, for a dataset,
    models) that the report shows as one model or dataset. A rerun of the same model on the
    same data replaces its own results (the log says so); results written before
    ``model_source`` / ``dataset_source`` were recorded cannot be told apart and are replaced
    as before.
    """
    from .results import result_pattern, slug

    earlier = _earlier_sources(out, dname)
    for path, _, recorded in earlier:
        data_was = recorded.get("dataset_source", data_source)
        if data_source is not None and data_was != data_source:
            hint = _qualified_dataset_name(dname, data_source)
            example = f" {hint}" if hint and hint != dname else ""
            raise EvalUsageError(
                f"--out {out} already holds {path}, computed on {data_was} under the dataset "
                f"name '{dname}'; this run's {data_source} would replace it or be reported as "
                f"the same dataset: give this dataset its own name with --dataset-name{example} "
                f"or use another --out (delete the {result_pattern(dname)} files there to "
                "replace them on purpose)")
    for (spec, name), source in zip(plan, sources):
        for path, model, recorded in earlier:
            model_was = recorded.get("model_source", source)
            if slug(model) == slug(name) and model_was != source:
                raise EvalUsageError(
                    f"--out {out} already holds {path}, the result of {model_was} under the "
                    f"name '{name}'; this run's {spec or source} would replace it or be "
                    "reported as more seeds of that model: give it another name with --names "
                    f"or use another --out (delete {result_pattern(dname, name)} "
                    "there to replace them on purpose)")


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

    Everything that can be checked before a feature is computed or a probe fitted is checked
    first: unique names and seeds, the dataset (or every model's feature files, and that they
    were extracted with the weights ``--models`` names where that can be told offline:
    :mod:`.feature_check`), a trainval the search can use, writable ``--out`` / cache folders,
    and no other model's or dataset's result in the way.
    ``progress`` shows bars with an ETA on stderr for the feature extraction and for each seed's
    probe search (trials + refit).
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
    else:  # every model's files, and that they are that model's features (feature_check)
        files = [feature_files(data.data or ".", spec, several) for spec, _ in plan]
        for (spec, _), pair in zip(plan, files):
            check_feature_model(spec, pair, several, log)
    prepare_folders((out_dir, "--out"), (fopts.cache or None, "--cache"))
    out = Path(out_dir)
    sources = [model_source(spec, data, several) for spec, _ in plan]
    data_src = dataset_source(data)
    check_earlier_results(out, plan, sources, dname, data_src)
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
                                 dataset_source=data_src, data=data.describe(),
                                 features=feat_info, class_names=list(classes))
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
