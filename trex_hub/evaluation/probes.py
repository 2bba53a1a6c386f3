"""Linear probes on frozen features.

* :func:`fit_logistic` - L2-regularised multinomial logistic regression, L-BFGS (scikit-learn),
  used on raw features for the small transfer sets.
* :func:`fit_sgd_linear` - a linear layer with bias trained by SGD (momentum 0.9, cosine
  schedule) on L2-normalised features, on CPU or CUDA, used for the large sets.

Both return a :class:`LinearProbe` that scores features with ``probe.scores(X)`` -> ``[N, C]``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import numpy as np


@dataclass
class LinearProbe:
    """``scores = f(X) @ weight.T + bias`` with ``f`` = identity or L2 normalisation."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    normalize: bool
    info: Dict[str, Any] = field(default_factory=dict)

    def scores(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if self.normalize:
            x = l2_normalize(x)
        return x @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, eps)


def _full_class_params(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
                       num_classes: int) -> tuple:
    """Place per-seen-class parameters into [num_classes, D]; unseen classes score -inf-ish."""
    d = coef.shape[1]
    weight = np.zeros((num_classes, d), dtype=np.float64)
    bias = np.full(num_classes, -1e30, dtype=np.float64)
    weight[classes] = coef
    bias[classes] = intercept
    return weight, bias


def fit_logistic(features: np.ndarray, labels: np.ndarray, C: float, *,
                 num_classes: Optional[int] = None, max_iter: int = 2000,
                 tol: float = 1e-4, seed: int = 0) -> LinearProbe:
    """Multinomial logistic regression with an L2 penalty (``C`` = inverse strength), L-BFGS.

    Features are used raw (no normalisation, no standardisation). ``info`` records the number of
    L-BFGS iterations and whether it converged within ``max_iter``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # float32 features stay float32: scikit-learn's L-BFGS works in the input precision (as it
    # does for features saved as float32); pass float64 features for a float64 fit
    X = np.asarray(features)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    classes = np.unique(y)
    if len(classes) == 1:  # nothing to separate: a constant predictor
        weight = np.zeros((num_classes, X.shape[1]))
        bias = np.full(num_classes, -1e30)
        bias[classes[0]] = 0.0
        return LinearProbe(weight, bias, False, {"C": C, "n_iter": 0, "converged": True})
    clf = LogisticRegression(C=float(C), solver="lbfgs", max_iter=int(max_iter), tol=tol,
                             random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(X, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1 and len(clf.classes_) == 2:
        # binary case: sklearn keeps one row w for class 1; softmax over (-w/2, w/2) is the same
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    weight, bias = _full_class_params(coef, intercept, clf.classes_, num_classes)
    n_iter = int(np.max(clf.n_iter_))
    return LinearProbe(weight, bias, False, {"C": float(C), "n_iter": n_iter,
                                             "converged": converged})


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` at step 0 towards 0 at ``total_steps``."""
    if total_steps <= 0:
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def fit_sgd_linear(features: np.ndarray, labels: np.ndarray, lr: float, weight_decay: float, *,
                   num_classes: Optional[int] = None, epochs: int = 100, batch_size: int = 1024,
                   momentum: float = 0.9, device: Union[str, Any] = "cpu",
                   seed: int = 0) -> LinearProbe:
    """Linear layer with bias on L2-normalised features, SGD with momentum, cosine schedule.

    The learning rate is set every iteration: ``lr * 0.5 * (1 + cos(pi * t / T))`` over the
    ``T = epochs * ceil(N / batch_size)`` iterations. Weights start at N(0, 0.01^2), bias at 0.
    The data is reshuffled every epoch from a generator seeded with ``seed``.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    X = torch.as_tensor(np.asarray(features, dtype=np.float32), device=dev)
    X = F.normalize(X, dim=1)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=dev)
    if num_classes is None:
        num_classes = int(y.max().item()) + 1
    n, d = X.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    layer = torch.nn.Linear(d, num_classes, bias=True).to(dev)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, d, generator=gen) * 0.01)
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    last_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, step, total)
            loss = F.cross_entropy(layer(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        last_loss = float(loss.detach())
    weight = layer.weight.detach().double().cpu().numpy()
    bias = layer.bias.detach().double().cpu().numpy()
    finite = bool(np.isfinite(weight).all() and np.isfinite(bias).all())
    if not finite:  # diverged (huge lr): a probe that predicts nothing useful, not a crash
        weight = np.zeros_like(weight)
        bias = np.zeros_like(bias)
    return LinearProbe(weight, bias, True, {"lr": float(lr), "weight_decay": float(weight_decay),
                                            "epochs": epochs, "steps": step,
                                            "final_loss": last_loss, "diverged": not finite})
