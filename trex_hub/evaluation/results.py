"""One JSON file per (model, dataset, seed), and reading folders of them back."""
from __future__ import annotations

import json
import math
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from ..fileio import PathLike, atomic_write

SCHEMA = "trex_hub.eval.result/1"


def slug(text: str) -> str:
    """A file-name-safe version of a model or dataset name."""
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-.")
    return s or "x"


def result_filename(model: str, dataset: str, seed: int) -> str:
    return f"{slug(model)}__{slug(dataset)}__seed{int(seed)}.json"


def result_pattern(dataset: str, model: str = "*") -> str:
    """The glob of :func:`result_filename` for every seed (and, by default, every model)."""
    return f"{model if model == '*' else slug(model)}__{slug(dataset)}__seed*.json"


# the libraries whose versions can change a result; recorded in every result file
VERSIONED = ("numpy", "scipy", "scikit-learn", "torch", "optuna", "threadpoolctl")
_MODULES = {"scikit-learn": "sklearn"}


def versions() -> Dict[str, str]:
    """Python, trex_hub and the numeric libraries' versions (those importable)."""
    import importlib

    from .. import __version__

    out: Dict[str, str] = {"python": sys.version.split()[0], "trex_hub": __version__}
    for name in VERSIONED:
        try:
            mod = importlib.import_module(_MODULES.get(name, name))
        except ImportError:
            continue
        out[name] = str(getattr(mod, "__version__", "?"))
    return out


def make_result(model: str, dataset: str, protocol_result: Dict[str, Any],
                **extra: Any) -> Dict[str, Any]:
    """Wrap a :func:`~trex_hub.evaluation.protocol.evaluate_features` result with its context."""
    res: Dict[str, Any] = {"schema": SCHEMA, "model": model, "dataset": dataset}
    res.update(protocol_result)
    res.update(extra)
    res["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    res["versions"] = versions()
    return res


def write_result(out_dir: PathLike, result: Dict[str, Any]) -> Path:
    """Write atomically to ``out_dir/<model>__<dataset>__seed<seed>.json``; returns the path.

    The file gets the permissions of any file the user creates (the umask), so colleagues can
    read a shared results folder, as they read the rest of the outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / result_filename(result["model"], result["dataset"], result["seed"])

    def write(fh) -> None:
        json.dump(result, fh, indent=2, sort_keys=False, default=_jsonable)
        fh.write("\n")

    atomic_write(path, write, mode="w")
    return path


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class ResultsError(ValueError):
    """No usable result files."""


def find_result_files(paths: Iterable[PathLike]) -> List[Path]:
    files: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*.json") if not q.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise ResultsError(f"{p}: no such file or folder")
    return files


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _percent_problem(data: Dict[str, Any], key: str, required: bool) -> Optional[str]:
    if key not in data:
        return f"'{key}' is missing" if required else None
    value = data[key]
    if not _is_number(value):
        return f"'{key}' must be a number, not {_show(value)}"
    if math.isnan(value) and not required:  # an optional metric that could not be measured
        return None
    if not 0.0 <= value <= 100.0:
        return f"'{key}' must lie in [0, 100], not {_show(value)}"
    return None


def result_problem(data: Dict[str, Any]) -> Optional[str]:
    """What makes a dict tagged with :data:`SCHEMA` unusable by the report, or ``None``.

    The schema tag alone is trusted by nothing: a hand-edited or truncated file would otherwise
    end the report in a bare ``KeyError`` or ``could not convert`` that names no file.
    """
    for key in ("model", "dataset"):
        if key not in data:
            return f"'{key}' is missing"
        if not isinstance(data[key], str) or not data[key]:
            return f"'{key}' must be a non-empty string, not {_show(data[key])}"
    if "seed" not in data:
        return "'seed' is missing"
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
        return f"'seed' must be an integer, not {_show(data['seed'])}"
    for key, required in (("top1", True), ("top5", False), ("mean_per_class", False)):
        problem = _percent_problem(data, key, required)
        if problem:
            return problem
    sizes = data.get("sizes", {})
    if not isinstance(sizes, dict):
        return f"'sizes' must be an object, not {_show(sizes)}"
    n_test = sizes.get("test", 1)
    if not isinstance(n_test, int) or isinstance(n_test, bool) or n_test < 1:
        return f"'sizes' must give 'test' as a positive integer, not {_show(n_test)}"
    if not isinstance(data.get("created", ""), str):
        return f"'created' must be a date string, not {_show(data['created'])}"
    return None


def _check_dataset_source(data: Dict[str, Any], seen: Dict[str, Dict[str, Any]]) -> None:
    """Refuse a result whose dataset folder differs from an earlier one's of the same dataset
    name; ``seen`` maps a dataset name to the first result that recorded its folder."""
    source = data.get("dataset_source")
    if not isinstance(source, str):  # written before the folder was recorded
        return
    first = seen.setdefault(data["dataset"], data)
    if first["dataset_source"] != source:
        raise ResultsError(
            f"{first['_file']} and {data['_file']}: the dataset '{data['dataset']}' was "
            f"computed on two folders, {first['dataset_source']} and {source}; the report "
            "would show them as one dataset: report their folders separately, or rerun one "
            "with its own --dataset-name")


def load_results(paths: Iterable[PathLike], warn=None) -> List[Dict[str, Any]]:
    """Every result JSON below ``paths`` (files or folders, recursive).

    Files that are not results (other JSON) are skipped with a warning; a file tagged as a
    result whose fields are missing or of the wrong type (:func:`result_problem`) stops the load
    with a :class:`ResultsError` naming it, since leaving it out would change the report. When the
    same (model, dataset, seed) appears more than once, the most recently created one wins. Two
    results of one dataset name computed on different dataset folders (their recorded
    ``dataset_source``) are two datasets under one name: a :class:`ResultsError`, not one column.
    """
    say = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    best: Dict[tuple, Dict[str, Any]] = {}
    order: List[tuple] = []
    sources: Dict[str, Dict[str, Any]] = {}
    for f in find_result_files(paths):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            say(f"{f}: skipped, unreadable JSON ({exc})")
            continue
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            say(f"{f}: skipped, not a trex-eval result")
            continue
        problem = result_problem(data)
        if problem:
            raise ResultsError(f"{f}: a broken trex-eval result: {problem}; repair the file or "
                               "move it out of the folder (trex-eval run writes it again)")
        data["_file"] = str(f)
        _check_dataset_source(data, sources)
        key = (data["model"], data["dataset"], data["seed"])
        if key in best:
            say(f"{f}: duplicate of {best[key]['_file']} for {key}; keeping the newer one")
            if data.get("created", "") < best[key].get("created", ""):
                continue
        else:
            order.append(key)
        best[key] = data
    return [best[k] for k in order]
