"""The paper's transfer protocol on frozen features (t-ReX, arXiv 2206.15369).

1. Split trainval into train / val: 20 % of every class (at least one image) goes to val,
   seeded, by the published rule or trex_hub's (:mod:`.splits`).
2. Search the probe's hyper-parameters log-uniformly on that split (Optuna TPE when
   installed, else a log grid): ``C`` in [1e-5, 1e6] for the logistic-regression probe (raw
   features, L-BFGS, max 2000 iterations); ``lr`` in [0.1, 100] and ``weight_decay`` in
   [1e-12, 1e-4] for the SGD probe (L2-normalised features, linear layer with bias, momentum 0.9,
   batch 1024, cosine schedule stepped per epoch, 100 epochs; multivariate TPE).
3. Refit on all of trainval with the best value(s) and report top-1, top-5 and the mean
   per-class accuracy on test.

Every fit of one call runs under the same thread limits (``threads``): the numeric libraries
are loaded before the limits are set, so the first seed is limited like the later ones.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .metrics import log_odds, mean_per_class_accuracy, topk_accuracy
from .probes import LinearProbe, TorchStreams, fit_logistic, fit_sgd_linear
from .search import search
from .splits import SPLITS, VAL_FRACTION, validation_split
C_RANGE = (1e-5, 1e6)
LR_RANGE = (0.1, 100.0)
WD_RANGE = (1e-12, 1e-4)
PROBES = ("auto", "logreg", "sgd")
# "auto" picks the SGD probe from this many trainval samples on (ImageNet-scale sets); the
# paper's small sets (Aircraft ... SUN397, Food101 with 75,750) stay below it.
LARGE_DATASET = 200_000


@dataclass
class ProtocolConfig:
    probe: str = "auto"
    trials: int = 30
    search: str = "auto"
    val_fraction: float = VAL_FRACTION
    c_range: Tuple[float, float] = C_RANGE
    max_iter: int = 2000
    lr_range: Tuple[float, float] = LR_RANGE
    wd_range: Tuple[float, float] = WD_RANGE
    epochs: int = 100
    batch_size: int = 1024
    momentum: float = 0.9
    device: str = "cpu"
    large_threshold: int = LARGE_DATASET
    threads: Optional[int] = None  # BLAS / OpenMP threads for the probe fits (None: default)
    # precision of the probe fits: float32 is what scikit-learn does with float32 features (as
    # extracted); float64 is slower but lets L-BFGS go further on badly scaled features
    dtype: str = "float32"
    # validation split rule: "published" (the authors' code, seed for seed) or "trex_hub"
    split: str = "published"

    def resolve_probe(self, n_trainval: int) -> str:
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}, not {self.probe!r}")
        if self.probe != "auto":
            return self.probe
        return "sgd" if n_trainval >= self.large_threshold else "logreg"


def load_numeric_libraries() -> None:
    """Import what loads BLAS/OpenMP for the probes: numpy, scipy, scikit-learn, torch.

    threadpoolctl limits only the libraries loaded when the limit is entered; scikit-learn and
    scipy's BLAS load on their first import, so they are imported first.
    """
    import numpy  # noqa: F401
    import torch  # noqa: F401

    for name in ("scipy.linalg", "scipy.optimize", "sklearn.linear_model"):
        try:
            __import__(name)
        except ImportError:  # only the probes that need them will complain
            pass


def thread_pools() -> List[Dict[str, Any]]:
    """The BLAS/OpenMP pools loaded now, with their thread counts (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return []
    import os

    def where(path: str) -> str:  # e.g. "scipy.libs/libscipy_openblas-....so"
        return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))

    return [{"api": i.get("internal_api"), "library": where(i.get("filepath") or ""),
             "version": i.get("version"), "num_threads": i.get("num_threads")}
            for i in threadpool_info()]


@contextlib.contextmanager
def _thread_limit(threads: Optional[int]):
    """Cap BLAS/OpenMP threads (threadpoolctl, a scikit-learn dependency) and torch's threads.

    On a busy machine one thread per fit is often several times faster than oversubscribed
    BLAS threads spinning against each other. The numeric libraries are loaded first
    (:func:`load_numeric_libraries`), so the limit covers every fit inside.
    """
    if not threads:
        yield
        return
    load_numeric_libraries()
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover
            yield
            return
        with threadpool_limits(limits=int(threads)):
            yield
    finally:
        torch.set_num_threads(old)


def search_split(labels: np.ndarray, seed: int,
                 config: Optional[ProtocolConfig] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of trainval for the search, refused when train is empty.

    When every class has a single trainval image, the validation split (at least one image per
    class) takes them all and the probes would fail deep inside scikit-learn or torch with a
    message that does not say why; this says why, and callers can ask before extracting
    features (the sizes depend on the class counts only, not on the seed).
    """
    cfg = config or ProtocolConfig()
    labels = np.asarray(labels, dtype=np.int64)
    tr_idx, val_idx = validation_split(labels, seed, cfg.val_fraction, rule=cfg.split)
    if len(tr_idx) == 0:
        raise ValueError(
            f"{len(labels)} trainval image(s) in {len(np.unique(labels))} class(es), one per "
            f"class: the validation split ({cfg.val_fraction:.0%} of each class, at least one "
            "image) takes them all and leaves the search nothing to fit; each class needs at "
            "least 2 trainval images")
    return tr_idx, val_idx


def _fit(kind: str, X: np.ndarray, y: np.ndarray, params: Dict[str, float], num_classes: int,
         cfg: ProtocolConfig, seed: int, streams: Optional[TorchStreams]) -> LinearProbe:
    if kind == "logreg":
        return fit_logistic(X, y, params["C"], num_classes=num_classes, max_iter=cfg.max_iter,
                            seed=seed)
    return fit_sgd_linear(X, y, params["lr"], params["weight_decay"], num_classes=num_classes,
                          epochs=cfg.epochs, batch_size=cfg.batch_size, momentum=cfg.momentum,
                          device=cfg.device, seed=seed, streams=streams)


def evaluate_features(train_features: np.ndarray, train_labels: np.ndarray,
                      test_features: np.ndarray, test_labels: np.ndarray, *,
                      config: Optional[ProtocolConfig] = None, seed: int = 0,
                      num_classes: Optional[int] = None,
                      log: Optional[Callable[[str], None]] = None,
                      progress: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Run the protocol on (trainval, test) features; returns a JSON-ready result dict.

    ``seed`` drives the validation split, the search sampler and the SGD probe's init/shuffle
    (one stream for the whole search and refit, as in the published code). ``progress(1)`` is
    called after every trial and after the refit (``trials + 1`` calls).
    """
    cfg = config or ProtocolConfig()
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', not {cfg.dtype!r}")
    if cfg.split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {cfg.split!r}")
    Xtv = np.asarray(train_features, dtype=cfg.dtype)
    ytv = np.asarray(train_labels, dtype=np.int64)
    Xte = np.asarray(test_features, dtype=cfg.dtype)
    yte = np.asarray(test_labels, dtype=np.int64)
    if Xtv.ndim != 2 or Xte.ndim != 2 or Xtv.shape[1] != Xte.shape[1]:
        raise ValueError(f"features must be [N, D] with one D; got {Xtv.shape} and {Xte.shape}")
    if len(Xtv) != len(ytv) or len(Xte) != len(yte):
        raise ValueError("features and labels differ in length")
    if len(Xtv) < 2 or len(Xte) < 1:
        raise ValueError(f"need at least 2 trainval and 1 test samples, got {len(Xtv)} and "
                         f"{len(Xte)}")
    if num_classes is None:
        num_classes = int(max(ytv.max(), yte.max())) + 1
    kind = cfg.resolve_probe(len(Xtv))
    say = log or (lambda msg: None)
    t0 = time.time()

    tr_idx, val_idx = search_split(ytv, seed, cfg)
    if kind == "logreg":
        space = {"C": tuple(cfg.c_range)}
    else:
        space = {"lr": tuple(cfg.lr_range), "weight_decay": tuple(cfg.wd_range)}

    fit_info: list = []
    tick = progress or (lambda n: None)
    Xtr, ytr, Xval, yval = Xtv[tr_idx], ytv[tr_idx], Xtv[val_idx], ytv[val_idx]

    with _thread_limit(cfg.threads):
        streams = TorchStreams(seed, cfg.device) if kind == "sgd" else None

        def objective(params: Dict[str, float]) -> float:
            probe = _fit(kind, Xtr, ytr, params, num_classes, cfg, seed, streams)
            fit_info.append({k: v for k, v in probe.info.items() if k not in params})
            return topk_accuracy(probe.scores(Xval), yval, 1)

        def report(i: int, params: Dict[str, float], score: float) -> None:
            shown = ", ".join(f"{k}={v:.3g}" for k, v in params.items())
            say(f"  trial {i + 1}/{cfg.trials}: {shown} -> val top-1 {score:.2f}")
            tick(1)

        pools = thread_pools() if cfg.threads else None
        found = search(objective, space, n_trials=cfg.trials, seed=seed, method=cfg.search,
                       callback=report, multivariate=kind == "sgd")
        t_search = time.time() - t0
        for trial, info in zip(found.trials, fit_info):
            trial.update(info)
        final = _fit(kind, Xtv, ytv, found.best_params, num_classes, cfg, seed, streams)
        tick(1)
    scores = final.scores(Xte)
    top1 = topk_accuracy(scores, yte, 1)
    top5 = topk_accuracy(scores, yte, 5)
    per_class = mean_per_class_accuracy(scores, yte)
    say(f"  best {found.best_params} (val top-1 {found.best_score:.2f}); refit on trainval -> "
        f"test top-1 {top1:.2f}, top-5 {top5:.2f}, mean per-class {per_class:.2f}")
    settings = asdict(cfg)
    settings["probe"] = kind
    settings["search"] = found.method
    settings["features"] = "raw" if kind == "logreg" else "l2-normalised"
    if kind == "logreg":
        for k in ("lr_range", "wd_range", "epochs", "batch_size", "momentum"):
            settings.pop(k)
    else:
        for k in ("c_range", "max_iter"):
            settings.pop(k)
    return {
        "probe": kind,
        "top1": top1,
        "top5": top5,
        "mean_per_class": per_class,
        "log_odds": log_odds(top1, len(Xte)),
        "hparams": found.best_params,
        "val_top1": found.best_score,
        "refit": {"on": "trainval", "n": int(len(Xtv)), **final.info},
        "search": {"method": found.method, "trials": len(found.trials),
                   "space": {k: list(v) for k, v in space.items()},
                   "history": found.trials},
        "settings": settings,
        "sizes": {"trainval": int(len(Xtv)), "train": int(len(tr_idx)),
                  "val": int(len(val_idx)), "test": int(len(Xte)),
                  "num_classes": int(num_classes), "feature_dim": int(Xtv.shape[1])},
        "seed": int(seed),
        "time_s": {"search": round(t_search, 3), "total": round(time.time() - t0, 3)},
        "runtime": {"precision": cfg.dtype, "threads": cfg.threads,
                    "torch_threads": _torch_threads(cfg.threads),
                    "thread_pools": pools if pools is not None else thread_pools()},
    }


def _torch_threads(threads: Optional[int]) -> int:
    if threads:
        return int(threads)
    import torch

    return int(torch.get_num_threads())
