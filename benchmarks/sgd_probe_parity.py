"""Side by side: trex-eval's SGD probe and the published one, on a synthetic set large enough
that ``--probe auto`` picks SGD (>= 200,000 trainval features).

    python benchmarks/sgd_probe_parity.py --published /path/to/naver-trex/transfer --seeds 0 1 2

Both sides get the same float32 features and the same seed. trex-eval runs
``evaluate_features`` (published validation split, multivariate TPE, SGD probe). With
``--published DIR`` (a checkout of github.com/naver/trex, its ``transfer`` folder; not shipped
with trex_hub) the authors' ``split_trainval`` + ``LogregTorchTrainer`` + Optuna study run as their
``classifier_training.py`` runs them (``--features_norm l2 --clf_type logreg_torch``), and the
script reports whether the two searches tried the same (lr, wd) values with the same validation
scores, and the chosen values and test top-1 of each. Without ``--published`` only trex-eval runs.

The default sizes (200,000 x 128 features, 50 classes, 8 trials of 10 epochs) take minutes on a
laptop CPU; the paper's budget is 30 trials of 100 epochs on 2048-d features (``--trials 30
--epochs 100 --dim 2048``, for a GPU: ``--device cuda``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract_bench import cpu_model  # noqa: E402  (one home for the machine's description)


def synthetic(n: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """Gaussian classes with overlapping clouds (nearest-centroid top-1 about 70 %)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    ytv = rng.integers(0, classes, n)
    yte = np.repeat(np.arange(classes), n_test // classes)
    xtv = centers[ytv] + rng.normal(scale=4.0, size=(n, dim)).astype(np.float32)
    xte = centers[yte] + rng.normal(scale=4.0, size=(len(yte), dim)).astype(np.float32)
    return xtv.astype(np.float32), ytv, xte.astype(np.float32), yte


def run_trex_eval(data, seed, args):
    from trex_hub.evaluation.protocol import ProtocolConfig, evaluate_features

    xtv, ytv, xte, yte = data
    cfg = ProtocolConfig(probe="auto", trials=args.trials, search="optuna", epochs=args.epochs,
                         batch_size=args.batch_size, device=args.device, threads=args.threads)
    assert cfg.resolve_probe(len(xtv)) == "sgd", "set too small for --probe auto to pick SGD"
    t0 = time.time()
    res = evaluate_features(xtv, ytv, xte, yte, config=cfg, seed=seed)
    hist = [((t["params"]["lr"], t["params"]["weight_decay"]), t["score"])
            for t in res["search"]["history"]]
    return {"lr": res["hparams"]["lr"], "wd": res["hparams"]["weight_decay"],
            "val_top1": res["val_top1"], "test_top1": res["top1"],
            "diverged_trials": sum(bool(t.get("diverged")) for t in res["search"]["history"]),
            "seconds": time.time() - t0, "history": hist}


def run_published(data, seed, args):
    """The authors' classifier_training.main() for logreg_torch, minus feature extraction/plots."""
    import optuna
    import torch

    sys.path.insert(0, os.path.abspath(args.published))
    from data.utils import split_trainval  # noqa: E402  (the published modules)
    from logreg_trainer import LogregTorchTrainer  # noqa: E402

    xtv, ytv, xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in data)
    out = tempfile.mkdtemp(prefix="published-sgd-")
    hp = argparse.Namespace(features_norm="l2", clf_lr_min=0.1, clf_lr_max=100.0,
                            clf_wd_min=1e-12, clf_wd_max=1e-4, clf_mom=0.9,
                            clf_epochs=args.epochs, clf_batch_size=args.batch_size,
                            seed=seed, device=args.device, output_dir=out)
    t0 = time.time()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        (trx, try_), (vax, vay) = split_trainval(xtv, ytv, per_val=0.2)
        trainer = LogregTorchTrainer(trx, try_, vax, vay, hp)
        sampler = optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed)
        study = optuna.create_study(sampler=sampler, direction="maximize")
        study.optimize(trainer, n_trials=args.trials)
        final = LogregTorchTrainer(xtv, ytv, xte, yte, hp)
        final.set_hps(study.best_params)
        top1 = float(final())
    hist = [((t.params["lr"], t.params["wd"]), float(t.value)) for t in study.trials]
    return {"lr": study.best_params["lr"], "wd": study.best_params["wd"],
            "val_top1": float(study.best_value), "test_top1": top1,
            "seconds": time.time() - t0, "history": hist}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--published", metavar="DIR",
                    help="naver/trex's transfer/ folder (compare with the authors' code)")
    ap.add_argument("--n-trainval", type=int, default=200_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=None, help="torch/BLAS threads (both sides)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers here")
    args = ap.parse_args(argv)

    import torch
    import optuna

    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = synthetic(args.n_trainval, args.n_test, args.dim, args.classes)
    print(f"# SGD probe side by side: {len(data[0])} trainval / {len(data[2])} test features, "
          f"dim {args.dim}, {args.classes} classes; {args.trials} trials x {args.epochs} epochs, "
          f"batch {args.batch_size}, device {args.device}, threads {args.threads or 'default'}")
    print(f"# CPU: {cpu_model()} ({os.cpu_count()} logical cores); torch {torch.__version__}, "
          f"optuna {optuna.__version__}")
    print("\n| seed | side | best lr | best wd | val top-1 | test top-1 | time (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for seed in args.seeds:
        sides = {"trex-eval": run_trex_eval(data, seed, args)}
        if args.published:
            sides["published"] = run_published(data, seed, args)
        for name, r in sides.items():
            print(f"| {seed} | {name} | {r['lr']:.4g} | {r['wd']:.3g} | {r['val_top1']:.3f} | "
                  f"{r['test_top1']:.3f} | {r['seconds']:.1f} |")
        row = {"seed": seed, **{k: {kk: v for kk, v in r.items()} for k, r in sides.items()}}
        if args.published:
            a, b = sides["trex-eval"]["history"], sides["published"]["history"]
            row["same_trials"] = all(x[0] == y[0] for x, y in zip(a, b)) and len(a) == len(b)
            row["max_val_diff"] = max(abs(x[1] - y[1]) for x, y in zip(a, b))
            row["same_choice_and_top1"] = (
                sides["trex-eval"]["lr"] == sides["published"]["lr"]
                and abs(sides["trex-eval"]["test_top1"] - sides["published"]["test_top1"]) < 1e-3)
        rows.append(row)
    if args.published:
        print()
        for row in rows:
            print(f"seed {row['seed']}: same (lr, wd) tried in the same order: "
                  f"{row['same_trials']}; largest validation top-1 difference "
                  f"{row['max_val_diff']:.2g} points; same choice and test top-1: "
                  f"{row['same_choice_and_top1']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "cpu": cpu_model(), "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
