"""Aggregate result files: mean and std over seeds per (model, dataset), mean log-odds per model.

The mean log-odds of a model follows the published aggregation (naver/trex
``transfer/scripts/print_results.py``): for each dataset ``p`` = top-1 / 100 with top-1 averaged
over the seeds, then the mean of ``log(p / (1 - p))`` over the model's datasets, **leaving
ImageNet-1K out** (``include_in1k=True`` puts it back). ``p`` is clipped to half a test image
from 0 and 1 (:func:`~trex_hub.evaluation.metrics.log_odds`).
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .metrics import log_odds, log_odds_clipped, mean_std
from .results import VERSIONED
from ..fileio import PathLike

# dataset names (lower case, letters and digits only) that mean ImageNet-1K: the published
# code's "in1k" / "IN-1K", and the usual spellings of ImageNet-1K / ILSVRC-2012
IN1K_NAMES = frozenset({"in1k", "imagenet", "imagenet1k", "ilsvrc2012", "ilsvrc12", "ilsvrc"})


def is_in1k(dataset: str) -> bool:
    """Whether ``dataset`` names ImageNet-1K (``in1k``, ``IN-1K``, ``imagenet-1k``, ...)."""
    return re.sub(r"[^a-z0-9]", "", str(dataset).lower()) in IN1K_NAMES


@dataclass
class Cell:
    model: str
    dataset: str
    seeds: List[int]
    top1_mean: float
    top1_std: float
    top5_mean: float
    top5_std: float
    log_odds: float
    probe: str
    hparams: List[Dict[str, float]] = field(default_factory=list)
    mpc_mean: float = float("nan")  # mean per-class accuracy
    mpc_std: float = float("nan")
    n_test: Optional[int] = None
    clipped: bool = False  # top-1 moved to the log-odds bound


@dataclass
class Report:
    models: List[str]
    datasets: List[str]
    cells: Dict[tuple, Cell]
    mean_log_odds: Dict[str, float]
    n_datasets: Dict[str, int]
    excluded: List[str] = field(default_factory=list)  # datasets left out of the mean log-odds
    include_in1k: bool = False
    mixed: Dict[str, List[str]] = field(default_factory=dict)  # setting -> the values seen

    def cell(self, model: str, dataset: str) -> Optional[Cell]:
        return self.cells.get((model, dataset))


def run_settings(result: Dict[str, Any]) -> Dict[str, str]:
    """The settings of one result that can change its numbers, as strings.

    Precision, threads, validation split, search method and budget, and the library versions.
    A result written before ``--split`` existed used trex_hub's rule.
    """
    out: Dict[str, str] = {}
    st = result.get("settings")
    if isinstance(st, dict):
        out["precision"] = str(st.get("dtype", "float32"))
        out["threads"] = str(st.get("threads"))
        out["split"] = str(st.get("split", "trex_hub"))
        for key in ("search", "trials", "max_iter", "epochs"):
            if key in st:
                out[key] = str(st[key])
    vers = result.get("versions")
    if isinstance(vers, dict):
        for name in VERSIONED:
            if name in vers:
                out[name] = str(vers[name])
    return out


def mixed_settings(results: Sequence[Dict[str, Any]]) -> Dict[str, List[str]]:
    """Settings (of :func:`run_settings`) that take more than one value across ``results``."""
    seen: Dict[str, set] = {}
    for r in results:
        for k, v in run_settings(r).items():
            seen.setdefault(k, set()).add(v)
    return {k: sorted(v) for k, v in seen.items() if len(v) > 1}


def _n_test(rs: Sequence[Dict[str, Any]]) -> Optional[int]:
    sizes = {r.get("sizes", {}).get("test") for r in rs} - {None}
    return int(min(sizes)) if sizes else None


def aggregate(results: Sequence[Dict[str, Any]], include_in1k: bool = False) -> Report:
    """Group results by (model, dataset); models and datasets keep their first-seen order."""
    if not results:
        raise ValueError("no results to aggregate")
    models: List[str] = []
    datasets: List[str] = []
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results:
        if r["model"] not in models:
            models.append(r["model"])
        if r["dataset"] not in datasets:
            datasets.append(r["dataset"])
        groups.setdefault((r["model"], r["dataset"]), []).append(r)
    cells: Dict[tuple, Cell] = {}
    for (m, d), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        t1m, t1s = mean_std([r["top1"] for r in rs])
        t5m, t5s = mean_std([r.get("top5", float("nan")) for r in rs])
        pcm, pcs = mean_std([r.get("mean_per_class", float("nan")) for r in rs])
        probes = sorted({r.get("probe", "?") for r in rs})
        n_test = _n_test(rs)
        cells[(m, d)] = Cell(m, d, [r["seed"] for r in rs], t1m, t1s, t5m, t5s,
                             log_odds(t1m, n_test), "/".join(probes),
                             [r.get("hparams", {}) for r in rs], pcm, pcs, n_test,
                             log_odds_clipped(t1m, n_test))
    excluded = [] if include_in1k else [d for d in datasets if is_in1k(d)]
    mlo: Dict[str, float] = {}
    nds: Dict[str, int] = {}
    for m in models:
        vals = [cells[(m, d)].log_odds for d in datasets
                if (m, d) in cells and d not in excluded]
        mlo[m] = sum(vals) / len(vals) if vals else float("nan")
        nds[m] = len(vals)
    return Report(models, datasets, cells, mlo, nds, excluded, include_in1k,
                  mixed_settings(results))


def _fmt(mean: float, std: float, several: bool) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if several else f"{mean:.2f}"


def _fmt_cell(c: Optional[Cell]) -> str:
    if c is None:
        return "-"
    return _fmt(c.top1_mean, c.top1_std, len(c.seeds) > 1) + (" †" if c.clipped else "")


def mixed_warning(rep: Report) -> Optional[str]:
    """One line naming the settings that differ between the results, or None."""
    if not rep.mixed:
        return None
    what = "; ".join(f"{k}: {', '.join(v)}" for k, v in rep.mixed.items())
    return f"these results mix runs with different settings ({what}); compare them with care"


def _notes(rep: Report, n_sets: int) -> List[str]:
    seeds = sorted({len(c.seeds) for c in rep.cells.values()})
    probes = sorted({c.probe for c in rep.cells.values()})
    notes = [f"Top-1 accuracy (%) on test, {'/'.join(map(str, seeds))} seed(s) per cell "
             f"(mean ± sample std when several); probe: {', '.join(probes)}."]
    rule = ("Mean log-odds: mean over datasets of log(p / (1 - p)), p = mean top-1 / 100, "
            "p clipped to [0.5 / n_test, 1 - 0.5 / n_test] (half a test image)")
    if rep.excluded:
        rule += (f"; {', '.join(rep.excluded)} (ImageNet-1K) left out as in the published "
                 "aggregation (trex-eval report --include-in1k puts it in)")
    elif rep.include_in1k:
        rule += "; ImageNet-1K included (--include-in1k; the published aggregation leaves it out)"
    else:
        rule += "; ImageNet-1K, when present, is left out as in the published aggregation"
    notes.append(rule + f"; {n_sets} dataset(s) averaged.")
    clipped = [f"{c.model}/{c.dataset}" for c in rep.cells.values() if c.clipped]
    if clipped:
        notes.append(f"† top-1 at 0 or 100 %: its log-odds uses the clipped p "
                     f"({', '.join(clipped)}).")
    warn = mixed_warning(rep)
    if warn:
        notes.append("Warning: " + warn + ".")
    return notes


def to_markdown(rep: Report) -> str:
    """Top-1 (%) per model and dataset, the mean log-odds, then top-5 and mean per-class."""
    head = ["model"] + rep.datasets + ["mean log-odds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    n_sets = len([d for d in rep.datasets if d not in rep.excluded])
    for m in rep.models:
        row = [m] + [_fmt_cell(rep.cell(m, d)) for d in rep.datasets]
        lo = "-" if math.isnan(rep.mean_log_odds[m]) else f"{rep.mean_log_odds[m]:.4f}"
        if rep.n_datasets[m] != n_sets:
            lo += f" ({rep.n_datasets[m]} of {n_sets} sets)"
        lines.append("| " + " | ".join(row + [lo]) + " |")
    lines += ["", "| model | dataset | seeds | top-1 | top-5 | mean per-class | probe |",
              "|---|---|---:|---:|---:|---:|---|"]
    for m in rep.models:
        for d in rep.datasets:
            c = rep.cell(m, d)
            if c is None:
                continue
            several = len(c.seeds) > 1
            lines.append(f"| {m} | {d} | {len(c.seeds)} | "
                         f"{_fmt(c.top1_mean, c.top1_std, several)} | "
                         f"{_fmt(c.top5_mean, c.top5_std, several)} | "
                         f"{_fmt(c.mpc_mean, c.mpc_std, several)} | {c.probe} |")
    return "\n".join(lines) + "\n\n" + "\n\n".join(_notes(rep, n_sets)) + "\n"


CSV_FIELDS = ["model", "dataset", "n_seeds", "seeds", "probe", "top1_mean", "top1_std",
              "top5_mean", "top5_std", "mean_per_class_mean", "mean_per_class_std", "n_test",
              "log_odds", "log_odds_clipped", "in_mean_log_odds", "model_mean_log_odds",
              "model_n_datasets"]


def to_csv(rep: Report) -> str:
    """One row per (model, dataset), with the model's mean log-odds repeated on each row."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for m in rep.models:
        for d in rep.datasets:
            c = rep.cell(m, d)
            if c is None:
                continue
            w.writerow({"model": m, "dataset": d, "n_seeds": len(c.seeds),
                        "seeds": " ".join(map(str, c.seeds)), "probe": c.probe,
                        "top1_mean": f"{c.top1_mean:.4f}", "top1_std": f"{c.top1_std:.4f}",
                        "top5_mean": f"{c.top5_mean:.4f}", "top5_std": f"{c.top5_std:.4f}",
                        "mean_per_class_mean": f"{c.mpc_mean:.4f}",
                        "mean_per_class_std": f"{c.mpc_std:.4f}",
                        "n_test": "" if c.n_test is None else c.n_test,
                        "log_odds": f"{c.log_odds:.6f}", "log_odds_clipped": int(c.clipped),
                        "in_mean_log_odds": int(d not in rep.excluded),
                        "model_mean_log_odds": f"{rep.mean_log_odds[m]:.6f}",
                        "model_n_datasets": rep.n_datasets[m]})
    return buf.getvalue()


def figure(rep: Report) -> Tuple[Any, Any, Any]:
    """(figure, bar axes, log-odds axes): grouped top-1 bars (error bars = std over seeds) and
    a mean log-odds panel; the legend sits below both panels, clear of every bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    n_m, n_d = len(rep.models), len(rep.datasets)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * n_d * max(1, n_m) / 2 + 4), 4),
                                   gridspec_kw={"width_ratios": [max(n_d, 1) * 1.5, 1.2]})
    width = 0.8 / max(n_m, 1)
    x = np.arange(n_d)
    handles = []
    for i, m in enumerate(rep.models):
        cells = [rep.cell(m, d) for d in rep.datasets]
        means = [c.top1_mean if c else np.nan for c in cells]
        stds = [c.top1_std if c else 0.0 for c in cells]
        handles.append(ax1.bar(x + (i - (n_m - 1) / 2) * width, means, width, yerr=stds,
                               capsize=3, label=m, color=f"C{i}"))
    ax1.set_xticks(x)
    ax1.set_xticklabels(rep.datasets, rotation=20, ha="right")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title("Linear-probe transfer")
    ax2.bar(np.arange(n_m), [rep.mean_log_odds[m] for m in rep.models],
            color=[f"C{i}" for i in range(n_m)])
    ax2.set_xticks(np.arange(n_m))
    ax2.set_xticklabels(rep.models, rotation=20, ha="right")
    ax2.axhline(0.0, color="black", linewidth=0.5)
    ax2.set_title("mean log-odds" + ("" if rep.include_in1k or not rep.excluded
                                     else " (without IN-1K)"))
    fig.tight_layout()
    # below the panels and their tick labels, outside every axes: it never covers a bar
    fig.legend(handles, rep.models, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(n_m, 4), fontsize="small", frameon=False)
    return fig, ax1, ax2


def plot(rep: Report, path: PathLike) -> Path:
    """Write :func:`figure` as a PNG (the saved image is cropped around everything drawn)."""
    import matplotlib.pyplot as plt

    fig, _, _ = figure(rep)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
