"""Hyper-parameter search over log-uniform ranges: Optuna TPE when importable, else a log grid."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

Space = Dict[str, Tuple[float, float]]
METHODS = ("auto", "optuna", "grid")


@dataclass
class SearchResult:
    best_params: Dict[str, float]
    best_score: float
    method: str
    trials: List[Dict[str, Any]] = field(default_factory=list)


def optuna_available() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_method(method: str) -> str:
    """``"auto"`` -> ``"optuna"`` when Optuna is importable, else ``"grid"``."""
    if method not in METHODS:
        raise ValueError(f"search method must be one of {METHODS}, not {method!r}")
    if method == "auto":
        return "optuna" if optuna_available() else "grid"
    if method == "optuna" and not optuna_available():
        raise ImportError("search method 'optuna' needs Optuna: pip install optuna "
                          "(or use the log grid: method 'grid')")
    return method


def _check_space(space: Space) -> None:
    if not space:
        raise ValueError("empty search space")
    for name, (lo, hi) in space.items():
        if not (0 < lo <= hi):
            raise ValueError(f"log-uniform range of '{name}' must satisfy 0 < low <= high, "
                             f"got [{lo}, {hi}]")


def log_grid(space: Space, n_trials: int) -> List[Dict[str, float]]:
    """Points of a log-spaced grid with at most ``n_trials`` points, both bounds included.

    One parameter: ``n_trials`` points. ``d`` parameters: ``m = floor(n_trials ** (1/d))``
    points per axis (at least 1), ``m ** d`` points in all. Points run from low to high, the
    first parameter varying slowest.
    """
    _check_space(space)
    if n_trials < 1:
        raise ValueError("n_trials must be >= 1")
    d = len(space)
    m = max(1, int(math.floor(n_trials ** (1.0 / d) + 1e-9)))
    axes = []
    for lo, hi in space.values():
        if m == 1:
            axes.append(np.array([math.sqrt(lo * hi)]))
        else:
            ax = np.logspace(math.log10(lo), math.log10(hi), m)
            ax[0], ax[-1] = lo, hi  # exact bounds (logspace can round just outside them)
            axes.append(np.clip(ax, lo, hi))
    mesh = np.meshgrid(*axes, indexing="ij")
    names = list(space)
    return [{n: float(v[idx]) for n, v in zip(names, mesh)} for idx in np.ndindex(*mesh[0].shape)]


def search(objective: Callable[[Dict[str, float]], float], space: Space, n_trials: int = 30,
           seed: int = 0, method: str = "auto",
           callback: Optional[Callable[[int, Dict[str, float], float], None]] = None,
           multivariate: bool = False) -> SearchResult:
    """Maximise ``objective(params)`` over log-uniform ranges ``space = {name: (low, high)}``.

    ``optuna``: a TPE sampler seeded with ``seed`` draws ``n_trials`` points log-uniformly,
    parameters suggested in the order of ``space``; ``multivariate=True`` makes it the
    published SGD probe's sampler, ``TPESampler(multivariate=True, group=True)`` (one joint
    density over all parameters), ``False`` the published logistic-regression one.
    ``grid``: :func:`log_grid`. Ties go to the earliest trial.
    """
    _check_space(space)
    chosen = resolve_method(method)
    trials: List[Dict[str, Any]] = []

    def run(params: Dict[str, float]) -> float:
        score = float(objective(params))
        trials.append({"params": dict(params), "score": score})
        if callback is not None:
            callback(len(trials) - 1, params, score)
        return score

    if chosen == "optuna":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(multivariate=bool(multivariate),
                                                 group=bool(multivariate), seed=seed)
        study = optuna.create_study(direction="maximize", sampler=sampler)

        def opt_objective(trial) -> float:
            params = {n: trial.suggest_float(n, lo, hi, log=True)
                      for n, (lo, hi) in space.items()}
            return run(params)

        study.optimize(opt_objective, n_trials=n_trials)
    else:
        for params in log_grid(space, n_trials):
            run(params)
    best = max(range(len(trials)), key=lambda i: (trials[i]["score"], -i))
    return SearchResult(dict(trials[best]["params"]), trials[best]["score"], chosen, trials)
