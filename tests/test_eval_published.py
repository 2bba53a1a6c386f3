"""trex-eval against the published transfer protocol (naver/trex ``transfer/``), seed for seed.

The reference rules are transcribed here from the published code's behaviour in a few lines each
(split, Optuna study, scikit-learn fit, SGD loop), independently of trex_hub's implementation.
"""
import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from trex_hub.evaluation import protocol, search
from trex_hub.evaluation.probes import TorchStreams, fit_sgd_linear, linear_default_init
from trex_hub.evaluation.protocol import ProtocolConfig, evaluate_features
from trex_hub.evaluation.splits import published_split, validation_split

ROOT = Path(__file__).resolve().parents[1]

# 29 labels: class 0 x6, class 1 x11, class 2 x9, class 3 x3, interleaved
LABELS = [0, 3, 2, 1, 3, 1, 0, 2, 1, 1, 2, 0, 1, 0, 1, 2, 3, 2, 1, 2, 1, 1, 2, 0, 1, 2, 0, 2, 1]
# written out from the rule for this fixture (the published split_trainval gives the same lists)
EXPECTED = {
    0: ([23, 11, 6, 0, 26, 8, 3, 9, 21, 28, 5, 24, 14, 20, 10, 2, 15, 27, 22, 19, 25, 17, 4, 1],
        [13, 12, 18, 7, 16]),
    1: ([11, 13, 26, 0, 23, 8, 14, 12, 9, 3, 5, 21, 18, 24, 27, 25, 17, 7, 10, 15, 19, 2, 16, 1],
        [6, 28, 20, 22, 4]),
    22: ([13, 23, 11, 0, 26, 18, 12, 9, 21, 3, 28, 20, 24, 14, 15, 7, 10, 25, 17, 2, 19, 22, 1,
          16],
         [6, 5, 8, 27, 4]),
}


def reference_split(labels, seed, fraction=0.2):
    """The rule in words: Python random seeded once, classes in np.unique order, each class's
    indices shuffled, n_val = int(n * fraction) but at least 1, the last n_val to validation."""
    random.seed(seed)
    train, val = [], []
    for c in np.unique(labels):
        inds = np.where(np.asarray(labels) == c)[0]
        random.shuffle(inds)
        n_val = max(1, int(len(inds) * fraction))
        train += inds[:-n_val].tolist()
        val += inds[-n_val:].tolist()
    return train, val


@pytest.mark.parametrize("seed", sorted(EXPECTED))
def test_published_split_by_hand(seed):
    tr, va = published_split(np.array(LABELS), seed)
    assert (tr.tolist(), va.tolist()) == EXPECTED[seed]
    assert (tr.tolist(), va.tolist()) == reference_split(LABELS, seed)
    # int(0.2 n) >= 1 per class: 6 -> 1, 11 -> 2, 9 -> 1 (trex_hub's rule: 2), 3 -> 1
    assert np.bincount(np.array(LABELS)[va]).tolist() == [1, 2, 1, 1]
    tr2, va2 = validation_split(np.array(LABELS), seed, rule="trex_hub")
    assert np.bincount(np.array(LABELS)[va2]).tolist() == [1, 2, 2, 1]


def test_published_split_keeps_the_small_class_fix():
    # a 3-image class first: the published code would then use 1/3 for every later class
    # (10 -> 3 val images); trex-eval keeps 0.2 for each class (10 -> 2)
    y = np.array([0] * 3 + [1] * 10 + [2] * 10)
    tr, va = published_split(y, 5)
    assert np.bincount(y[va]).tolist() == [1, 2, 2]
    assert (tr.tolist(), va.tolist()) == reference_split(y, 5)
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(y)))
    with pytest.raises(ValueError, match="split rule"):
        validation_split(y, 0, rule="sklearn")


def test_n_63_gives_12_validation_images():
    _, va = published_split(np.zeros(63, dtype=int), 0)
    assert len(va) == 12  # int(12.6); trex_hub's floor(12.6 + 0.5) = 13
    assert len(validation_split(np.zeros(63, dtype=int), 0, rule="trex_hub")[1]) == 13


def features(n=240, classes=6, dim=24, seed=0, test=120):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 0.7
    ytv = np.repeat(np.arange(classes), n // classes)
    rng.shuffle(ytv)
    yte = np.repeat(np.arange(classes), test // classes)
    xtv = (centers[ytv] + rng.normal(size=(len(ytv), dim)) * 1.3 + 2).astype(np.float32) * 5
    xte = (centers[yte] + rng.normal(size=(len(yte), dim)) * 1.3 + 2).astype(np.float32) * 5
    return xtv, ytv, xte, yte


@pytest.mark.parametrize("seed", [0, 1])
def test_same_c_and_test_top1_as_the_published_protocol(seed):
    optuna = pytest.importorskip("optuna")
    from sklearn.linear_model import LogisticRegression

    xtv, ytv, xte, yte = features(n=120, classes=4, dim=12, test=60, seed=3)
    trials, max_iter = 5, 200
    # the published pipeline: split, TPE study over C, fit on train, predict val; refit, test
    tr, va = reference_split(ytv, seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))

    def fit(C, X, y):
        return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter,
                                  random_state=seed).fit(X, y)

    def objective(trial):
        clf = fit(trial.suggest_float("C", 1e-5, 1e6, log=True), xtv[tr], ytv[tr])
        return float(np.mean(clf.predict(xtv[va]) == ytv[va]) * 100)

    study.optimize(objective, n_trials=trials)
    test_top1 = float(np.mean(fit(study.best_params["C"], xtv, ytv).predict(xte) == yte) * 100)

    cfg = ProtocolConfig(probe="logreg", trials=trials, search="optuna", max_iter=max_iter,
                         threads=1)
    res = evaluate_features(xtv, ytv, xte, yte, config=cfg, seed=seed)
    assert [t["params"]["C"] for t in res["search"]["history"]] == [t.params["C"]
                                                                   for t in study.trials]
    assert [t["score"] for t in res["search"]["history"]] == pytest.approx(
        [t.value for t in study.trials])
    assert res["hparams"]["C"] == study.best_params["C"]
    assert res["top1"] == pytest.approx(test_top1)


def published_sgd(x, y, lr, wd, epochs, batch_size):
    """The published LogregTorchTrainer loop on CPU, drawing from torch's global generator."""
    x = torch.nn.functional.normalize(torch.as_tensor(x), dim=1)
    y = torch.as_tensor(y)
    n = len(x)
    order = torch.zeros(n, dtype=torch.long)
    torch.randperm(n, out=order)
    clf = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    for epoch in range(epochs):
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            loss = torch.nn.functional.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.randperm(n, out=order)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return clf.weight.detach().double().numpy(), clf.bias.detach().double().numpy()


def test_sgd_probe_follows_the_published_loop_exactly():
    xtv, ytv, _, _ = features(n=90, classes=3, dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        ref = [published_sgd(xtv, ytv, lr, wd, 5, 32) for lr, wd in ((3.0, 1e-6), (0.5, 1e-9))]
    streams = TorchStreams(7)  # one stream for both fits, as the published search has
    ours = [fit_sgd_linear(xtv, ytv, lr, wd, epochs=5, batch_size=32, streams=streams)
            for lr, wd in ((3.0, 1e-6), (0.5, 1e-9))]
    for (w, b), probe in zip(ref, ours):
        np.testing.assert_allclose(probe.weight, w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(probe.bias, b, rtol=1e-6, atol=1e-7)
        assert probe.info["steps"] == 5 * 3 and not probe.info["diverged"]


def test_sgd_init_is_nn_linear_default():
    w, b = torch.empty(5, 40), torch.empty(5)
    linear_default_init(w, b, torch.Generator().manual_seed(3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        ref = torch.nn.Linear(40, 5)
    assert torch.equal(w, ref.weight.detach()) and torch.equal(b, ref.bias.detach())


def test_sgd_divergence_keeps_the_last_finite_epoch():
    xtv, ytv, _, _ = features(n=60, classes=3, dim=8)
    # lr * weight_decay far above the stable range: the weights grow geometrically until the
    # loss overflows (after a few epochs of 8 steps)
    probe = fit_sgd_linear(xtv, ytv, 100.0, 0.2, epochs=20, batch_size=8, seed=0)
    assert probe.info["diverged"] and 1 <= probe.info["diverged_epoch"] < 20
    assert probe.info["kept_epoch"] == probe.info["diverged_epoch"] - 1
    assert probe.info["steps"] < 20 * 8
    assert np.isfinite(probe.weight).all() and np.isfinite(probe.bias).all()
    assert np.abs(probe.weight).max() > 1.0  # trained weights, not the initial ones
    assert np.isfinite(probe.scores(xtv)).all()
    fine = fit_sgd_linear(xtv, ytv, 1.0, 0.0, epochs=3, batch_size=8, seed=0)
    assert not fine.info["diverged"] and "kept_epoch" not in fine.info


def test_sgd_search_uses_the_multivariate_group_tpe_sampler(monkeypatch):
    optuna = pytest.importorskip("optuna")
    made = []
    real = optuna.samplers.TPESampler

    def spy(**kw):
        made.append(kw)
        return real(**kw)

    monkeypatch.setattr(optuna.samplers, "TPESampler", spy)
    xtv, ytv, _, _ = features(n=60, classes=3, dim=8)
    evaluate_features(xtv, ytv, xtv, ytv, seed=4, config=ProtocolConfig(
        probe="sgd", trials=2, search="optuna", epochs=2, batch_size=16, threads=1))
    evaluate_features(xtv, ytv, xtv, ytv, seed=4, config=ProtocolConfig(
        probe="logreg", trials=2, search="optuna", max_iter=50, threads=1))
    assert made == [{"multivariate": True, "group": True, "seed": 4},
                    {"multivariate": False, "group": False, "seed": 4}]
    assert search.METHODS == ("auto", "optuna", "grid")


THREAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from threadpoolctl import threadpool_info
    from trex_hub.evaluation import protocol
    assert "sklearn" not in sys.modules and "scipy" not in sys.modules
    real, seen = protocol.fit_logistic, []

    def spy(*args, **kw):  # the thread pools in force at every fit
        seen.append([(i["filepath"], i["num_threads"]) for i in threadpool_info()])
        return real(*args, **kw)

    protocol.fit_logistic = spy
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(120, 24)) * 40 + 5).astype(np.float32)
    y = rng.integers(0, 4, 120)
    cfg = protocol.ProtocolConfig(trials=4, search="grid", threads=1, max_iter=60)
    hist = [protocol.evaluate_features(x, y, x[:50], y[:50], config=cfg, seed=0)
            for _ in range(2)]
    print(json.dumps({"seen": seen, "hist": [h["search"]["history"] for h in hist],
                      "top1": [h["top1"] for h in hist], "runtime": hist[0]["runtime"]}))
""")


def test_threads_1_limits_the_first_search_too_and_repeats_exactly():
    """A fresh process (scikit-learn not imported yet): the first fit is limited as well."""
    proc = subprocess.run([sys.executable, "-c", THREAD_SCRIPT], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                            "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["seen"]) == 2 * 5  # 4 trials + refit, twice
    for pools in out["seen"]:  # scipy's BLAS and scikit-learn's OpenMP are loaded and limited
        assert any("scipy" in path for path, _ in pools), pools
        assert any("scikit_learn" in path or "sklearn" in path for path, _ in pools), pools
        assert all(n == 1 for _, n in pools), pools
    assert out["hist"][0] == out["hist"][1] and out["top1"][0] == out["top1"][1]
    assert out["runtime"]["threads"] == 1 and out["runtime"]["precision"] == "float32"
    assert all(p["num_threads"] == 1 for p in out["runtime"]["thread_pools"])


def test_protocol_rejects_an_unknown_split():
    xtv, ytv, _, _ = features(n=30, classes=3, dim=4)
    with pytest.raises(ValueError, match="split"):
        evaluate_features(xtv, ytv, xtv, ytv, config=ProtocolConfig(split="random"))
    assert protocol.ProtocolConfig().split == "published"
