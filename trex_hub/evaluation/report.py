"""Aggregate result files: mean and std over seeds per (model, dataset), mean log-odds per model.

The mean log-odds of a model is the spec's aggregate: for each dataset ``p`` = top-1 / 100 with
top-1 averaged over the seeds, then the mean of ``log(p / (1 - p))`` over the model's datasets.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .metrics import log_odds, mean_std
from ..fileio import PathLike


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


@dataclass
class Report:
    models: List[str]
    datasets: List[str]
    cells: Dict[tuple, Cell]
    mean_log_odds: Dict[str, float]
    n_datasets: Dict[str, int]

    def cell(self, model: str, dataset: str) -> Optional[Cell]:
        return self.cells.get((model, dataset))


def aggregate(results: Sequence[Dict[str, Any]]) -> Report:
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
        probes = sorted({r.get("probe", "?") for r in rs})
        cells[(m, d)] = Cell(m, d, [r["seed"] for r in rs], t1m, t1s, t5m, t5s, log_odds(t1m),
                             "/".join(probes), [r.get("hparams", {}) for r in rs])
    mlo: Dict[str, float] = {}
    nds: Dict[str, int] = {}
    for m in models:
        vals = [cells[(m, d)].log_odds for d in datasets if (m, d) in cells]
        mlo[m] = sum(vals) / len(vals)
        nds[m] = len(vals)
    return Report(models, datasets, cells, mlo, nds)


def _fmt_cell(c: Optional[Cell]) -> str:
    if c is None:
        return "-"
    if len(c.seeds) > 1:
        return f"{c.top1_mean:.2f} ± {c.top1_std:.2f}"
    return f"{c.top1_mean:.2f}"


def to_markdown(rep: Report) -> str:
    """Top-1 (%) per model and dataset (mean ± std over seeds) and the mean log-odds."""
    head = ["model"] + rep.datasets + ["mean log-odds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    for m in rep.models:
        row = [m] + [_fmt_cell(rep.cell(m, d)) for d in rep.datasets]
        lo = f"{rep.mean_log_odds[m]:.4f}"
        if rep.n_datasets[m] != len(rep.datasets):
            lo += f" ({rep.n_datasets[m]} of {len(rep.datasets)} sets)"
        lines.append("| " + " | ".join(row + [lo]) + " |")
    seeds = sorted({len(c.seeds) for c in rep.cells.values()})
    probes = sorted({c.probe for c in rep.cells.values()})
    note = (f"\nTop-1 accuracy (%) on test, {'/'.join(map(str, seeds))} seed(s) per cell "
            f"(mean ± sample std when several); probe: {', '.join(probes)}. Mean log-odds: mean "
            "over datasets of log(p / (1 - p)), p = mean top-1 / 100.\n")
    return "\n".join(lines) + "\n" + note


CSV_FIELDS = ["model", "dataset", "n_seeds", "seeds", "probe", "top1_mean", "top1_std",
              "top5_mean", "top5_std", "log_odds", "model_mean_log_odds", "model_n_datasets"]


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
                        "log_odds": f"{c.log_odds:.6f}",
                        "model_mean_log_odds": f"{rep.mean_log_odds[m]:.6f}",
                        "model_n_datasets": rep.n_datasets[m]})
    return buf.getvalue()


def plot(rep: Report, path: PathLike) -> Path:
    """Grouped bars of top-1 per dataset (error bars = std over seeds) and a mean log-odds panel."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    n_m, n_d = len(rep.models), len(rep.datasets)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * n_d * max(1, n_m) / 2 + 4), 4),
                                   gridspec_kw={"width_ratios": [max(n_d, 1) * 1.5, 1.2]})
    width = 0.8 / max(n_m, 1)
    x = np.arange(n_d)
    for i, m in enumerate(rep.models):
        cells = [rep.cell(m, d) for d in rep.datasets]
        means = [c.top1_mean if c else np.nan for c in cells]
        stds = [c.top1_std if c else 0.0 for c in cells]
        ax1.bar(x + (i - (n_m - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=m)
    ax1.set_xticks(x)
    ax1.set_xticklabels(rep.datasets, rotation=20, ha="right")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title("Linear-probe transfer")
    ax1.legend(fontsize="small")
    ax2.bar(np.arange(n_m), [rep.mean_log_odds[m] for m in rep.models],
            color=[f"C{i}" for i in range(n_m)])
    ax2.set_xticks(np.arange(n_m))
    ax2.set_xticklabels(rep.models, rotation=20, ha="right")
    ax2.axhline(0.0, color="black", linewidth=0.5)
    ax2.set_title("mean log-odds")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
