"""Linear probes on frozen features.

* :func:`fit_logistic` - L2-regularised multinomial logistic regression, L-BFGS (scikit-learn),
  used on raw features for the small transfer sets.
* :func:`fit_sgd_linear` - a linear layer with bias trained by SGD (momentum 0.9, cosine
  schedule stepped per epoch) on L2-normalised features, on CPU or CUDA, used for the large
  sets; it follows the published ``LogregTorchTrainer``.

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


class TorchStreams:
    """The random streams of the SGD probe, as the published code draws them.

    There, ``torch.manual_seed(seed)`` runs once at start-up and every trial of the search, then
    the refit, keeps drawing from the global generators: the linear layer's initialisation from
    the CPU generator, the per-epoch shuffles from the generator of the features' device (the
    same CPU generator on CPU, the CUDA one on a GPU). One ``TorchStreams`` per search plays that
    role here without touching torch's global state.
    """

    def __init__(self, seed: int, device: Union[str, Any] = "cpu"):
        import torch

        dev = torch.device(device)
        self.init = torch.Generator(device="cpu").manual_seed(int(seed))
        if dev.type == "cpu":
            self.perm = self.init
        else:
            self.perm = torch.Generator(device=dev).manual_seed(int(seed))


def linear_default_init(weight, bias, generator) -> None:
    """``torch.nn.Linear``'s own initialisation (``reset_parameters``), drawn from ``generator``:
    weight ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(D), 1/sqrt(D)), then bias likewise."""
    import torch

    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
    torch.nn.init.uniform_(bias, -bound, bound, generator=generator)


def fit_sgd_linear(features: np.ndarray, labels: np.ndarray, lr: float, weight_decay: float, *,
                   num_classes: Optional[int] = None, epochs: int = 100, batch_size: int = 1024,
                   momentum: float = 0.9, device: Union[str, Any] = "cpu",
                   seed: int = 0, streams: Optional[TorchStreams] = None) -> LinearProbe:
    """Linear layer with bias on L2-normalised features, SGD with momentum, cosine schedule.

    As in the published ``LogregTorchTrainer``: ``nn.Linear``'s default initialisation; each
    epoch shuffles the data (one permutation, drawn when the previous epoch ends) and steps
    through batches of ``batch_size``; the learning rate is set *after* each epoch ``e`` to
    ``lr * 0.5 * (1 + cos(pi * e / epochs))``, so epochs 0 and 1 both run at ``lr``. A non-finite
    loss stops training (divergence); the probe then keeps the weights of the last epoch that
    ended with finite weights (the initial ones if none did) - the published code predicts with
    the non-finite weights instead, see docs/evaluation.md. ``streams`` carries the random
    generators across the fits of one search; without it they are seeded with ``seed``.
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
    rng = streams or TorchStreams(seed, dev)
    order = torch.randperm(n, generator=rng.perm, device=rng.perm.device)
    layer = torch.nn.Linear(d, num_classes, bias=True)  # its own init is replaced just below
    with torch.no_grad():
        linear_default_init(layer.weight, layer.bias, rng.init)
    layer = layer.to(dev)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    bs = min(int(batch_size), n)
    kept = (layer.weight.detach().clone(), layer.bias.detach().clone())
    kept_epoch = -1
    step = 0
    last_loss = float("nan")
    diverged_at: Optional[int] = None
    for epoch in range(epochs):
        for s in range(0, n, bs):
            idx = order[s:s + bs]
            loss = F.cross_entropy(layer(X[idx]), y[idx])
            if not torch.isfinite(loss):
                diverged_at = epoch
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            last_loss = float(loss.detach())
        if diverged_at is not None:
            break
        order = torch.randperm(n, generator=rng.perm, device=rng.perm.device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, epoch, epochs)
        w, b = layer.weight.detach(), layer.bias.detach()
        if bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all()):
            kept = (w.clone(), b.clone())
            kept_epoch = epoch
        else:  # the next loss cannot be finite: the published loop stops there
            diverged_at = epoch + 1
            break
    weight = kept[0].double().cpu().numpy()
    bias = kept[1].double().cpu().numpy()
    info: Dict[str, Any] = {"lr": float(lr), "weight_decay": float(weight_decay),
                            "epochs": epochs, "steps": step, "final_loss": last_loss,
                            "diverged": diverged_at is not None}
    if diverged_at is not None:
        info["diverged_epoch"] = diverged_at
        info["kept_epoch"] = kept_epoch
    return LinearProbe(weight, bias, True, info)
