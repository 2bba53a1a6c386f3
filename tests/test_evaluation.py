"""The transfer protocol (the t-ReX paper, arXiv 2206.15369) on tiny synthetic features."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trex_hub.evaluation import metrics, protocol, report, results, search
from trex_hub.evaluation.probes import cosine_lr, fit_logistic, fit_sgd_linear
from trex_hub.evaluation.protocol import ProtocolConfig, evaluate_features, validation_split


def blobs(n_per_class=20, classes=4, dim=16, sep=6.0, seed=0):
    """Well separated Gaussian blobs: (features float32, labels)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))
    centers *= sep / np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(classes), n_per_class)
    x = centers[y] + rng.normal(scale=0.5, size=(len(y), dim))
    return x.astype(np.float32), y


# ---- split ---------------------------------------------------------------------------------------
def test_validation_split_is_20_percent_per_class_at_least_one_and_seeded():
    y = np.repeat(np.arange(4), [10, 7, 1, 3])
    tr, va = validation_split(y, seed=0)
    assert np.bincount(y[va], minlength=4).tolist() == [2, 1, 1, 1]
    assert set(tr) | set(va) == set(range(len(y))) and not set(tr) & set(va)
    np.testing.assert_array_equal(va, validation_split(y, seed=0)[1])
    assert any(not np.array_equal(va, validation_split(y, seed=s)[1]) for s in range(1, 6))
    assert protocol.VAL_FRACTION == 0.2


# ---- search --------------------------------------------------------------------------------------
def test_log_grid_covers_the_c_range_log_uniformly():
    pts = search.log_grid({"C": protocol.C_RANGE}, 30)
    cs = np.array([p["C"] for p in pts])
    assert len(cs) == 30 and protocol.C_RANGE == (1e-5, 1e6)
    assert cs[0] == pytest.approx(1e-5) and cs[-1] == pytest.approx(1e6)
    np.testing.assert_allclose(np.diff(np.log(cs)), np.log(1e11) / 29)
    two = search.log_grid({"lr": protocol.LR_RANGE, "weight_decay": protocol.WD_RANGE}, 30)
    assert len(two) == 25  # 5 x 5 <= 30
    assert min(p["lr"] for p in two) == pytest.approx(0.1)
    assert max(p["weight_decay"] for p in two) == pytest.approx(1e-4)


def test_search_ties_go_to_the_first_trial_and_bad_ranges_fail():
    res = search.search(lambda p: 1.0, {"C": (1e-2, 1e2)}, n_trials=5, method="grid")
    assert res.best_params["C"] == pytest.approx(1e-2) and len(res.trials) == 5
    with pytest.raises(ValueError):
        search.search(lambda p: 0, {"C": (0.0, 1.0)}, 3, method="grid")
    with pytest.raises(ValueError):
        search.resolve_method("random")


def test_optuna_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(search, "optuna_available", lambda: False)
    assert search.resolve_method("auto") == "grid"
    with pytest.raises(ImportError, match="pip install optuna"):
        search.resolve_method("optuna")


def test_optuna_tpe_stays_in_bounds_and_is_seeded():
    pytest.importorskip("optuna")

    def f(p):
        return -abs(math.log10(p["C"]) - 1.0)

    a = search.search(f, {"C": (1e-5, 1e6)}, n_trials=12, seed=3, method="optuna")
    b = search.search(f, {"C": (1e-5, 1e6)}, n_trials=12, seed=3, method="optuna")
    assert a.method == "optuna" and [t["params"] for t in a.trials] == [t["params"]
                                                                       for t in b.trials]
    assert all(1e-5 <= t["params"]["C"] <= 1e6 for t in a.trials)


# ---- protocol ------------------------------------------------------------------------------------
def test_separable_features_reach_99_percent():
    x, y = blobs(seed=0)
    xt, yt = blobs(n_per_class=25, seed=0)[0][::-1].copy(), blobs(n_per_class=25, seed=0)[1][::-1]
    cfg = ProtocolConfig(trials=6, search="grid")
    res = evaluate_features(x, y, xt, yt, config=cfg, seed=0)
    assert res["probe"] == "logreg" and res["top1"] >= 99.0 and res["top5"] == 100.0
    assert res["sizes"] == {"trainval": 80, "train": 64, "val": 16, "test": 100,
                            "num_classes": 4, "feature_dim": 16}
    assert res["settings"]["features"] == "raw" and res["settings"]["max_iter"] == 2000
    assert res["log_odds"] == pytest.approx(metrics.log_odds(res["top1"], 100))
    assert res["mean_per_class"] >= 99.0 and res["settings"]["split"] == "published"


def test_shuffled_labels_stay_at_chance():
    x, y = blobs(n_per_class=40, classes=4, seed=1)
    xt, yt = blobs(n_per_class=100, classes=4, seed=1)
    rng = np.random.default_rng(0)
    res = evaluate_features(x, rng.permutation(y), xt, rng.permutation(yt),
                            config=ProtocolConfig(trials=4, search="grid", threads=1), seed=0)
    assert abs(res["top1"] - 25.0) < 10.0


def test_c_search_bounds_trial_count_and_refit_on_trainval(monkeypatch):
    calls = []
    real = protocol.fit_logistic

    def spy(X, y, C, **kw):
        calls.append((len(X), C))
        return real(X, y, C, **kw)

    monkeypatch.setattr(protocol, "fit_logistic", spy)
    x, y = blobs(n_per_class=10, classes=3)
    res = evaluate_features(x, y, x, y, config=ProtocolConfig(trials=7, search="grid"), seed=2)
    search_calls, refit = calls[:-1], calls[-1]
    assert len(search_calls) == 7 == res["search"]["trials"]
    assert all(1e-5 <= c <= 1e6 for _, c in search_calls)
    assert {n for n, _ in search_calls} == {24}  # train part only: 30 - 3 x 2 val
    assert refit == (30, res["hparams"]["C"])  # refit on train + val with the best C
    assert res["refit"]["on"] == "trainval" and res["refit"]["n"] == 30
    assert res["search"]["space"] == {"C": [1e-5, 1e6]}
    best = max(res["search"]["history"], key=lambda t: t["score"])
    assert res["val_top1"] == best["score"]


def test_logistic_probe_uses_raw_features_and_handles_two_classes():
    x, y = blobs(n_per_class=15, classes=2, dim=5)
    probe = fit_logistic(x, y, C=1.0)
    assert probe.normalize is False and probe.weight.shape == (2, 5)
    assert metrics.topk_accuracy(probe.scores(x), y) >= 99.0
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression(C=1.0, max_iter=2000).fit(x.astype(np.float64), y)
    np.testing.assert_allclose(probe.scores(x).argmax(1), ref.predict(x))
    # scaling the features changes a raw-feature probe's decision (no hidden normalisation)
    assert fit_logistic(x * 100, y, C=1e-4).info["C"] == 1e-4


def test_sgd_probe_separable_and_searched_in_its_ranges():
    x, y = blobs(n_per_class=30, classes=3, dim=8, seed=4)
    cfg = ProtocolConfig(probe="sgd", trials=4, search="grid", epochs=15, batch_size=32,
                         threads=1)
    res = evaluate_features(x, y, x, y, config=cfg, seed=0)
    assert res["probe"] == "sgd" and res["top1"] >= 99.0
    assert res["settings"]["features"] == "l2-normalised"
    assert res["settings"]["momentum"] == 0.9
    for t in res["search"]["history"]:
        assert 0.1 <= t["params"]["lr"] <= 100 and 1e-12 <= t["params"]["weight_decay"] <= 1e-4
    probe = fit_sgd_linear(x, y, 1.0, 1e-6, epochs=3, batch_size=16)
    assert probe.normalize and probe.bias.shape == (3,) and probe.info["steps"] == 3 * 6
    # features are L2-normalised: scaling inputs does not change the scores
    np.testing.assert_allclose(probe.scores(x), probe.scores(x * 7.0), rtol=1e-6)


def test_cosine_schedule():
    assert cosine_lr(2.0, 0, 10) == pytest.approx(2.0)
    assert cosine_lr(2.0, 5, 10) == pytest.approx(1.0)
    assert cosine_lr(2.0, 10, 10) == pytest.approx(0.0)


def test_auto_probe_choice():
    cfg = ProtocolConfig()
    assert cfg.resolve_probe(10_000) == "logreg" and cfg.resolve_probe(1_281_167) == "sgd"


# ---- metrics -------------------------------------------------------------------------------------
def test_topk_and_log_odds_by_hand():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = np.array([1, 1, 0, 2])
    assert metrics.topk_accuracy(scores, labels, 1) == 25.0
    assert metrics.topk_accuracy(scores, labels, 2) == 50.0
    assert metrics.topk_accuracy(scores, labels, 5) == 100.0
    assert metrics.log_odds(50.0) == 0.0
    assert metrics.log_odds(80.0) == pytest.approx(math.log(4.0))
    # mean over datasets of log(p / (1 - p)), p = top-1 / 100
    hand = (math.log(0.9 / 0.1) + math.log(0.25 / 0.75) + math.log(0.6 / 0.4)) / 3
    assert metrics.mean_log_odds([90.0, 25.0, 60.0]) == pytest.approx(hand)
    # 0 and 100 % are clipped to half a test image from the edge: p in [0.5/n, 1 - 0.5/n]
    assert metrics.log_odds(100.0, n_test=200) == pytest.approx(math.log(0.9975 / 0.0025))
    assert metrics.log_odds(0.0, n_test=200) == pytest.approx(-math.log(0.9975 / 0.0025))
    assert metrics.log_odds(99.5, n_test=200) == pytest.approx(math.log(0.995 / 0.005))
    assert metrics.log_odds(100.0) == pytest.approx(math.log((1 - 5e-5) / 5e-5))
    assert metrics.log_odds_clipped(100.0, 200) and not metrics.log_odds_clipped(99.5, 200)
    with pytest.raises(ValueError):
        metrics.log_odds(101.0)


def test_mean_per_class_accuracy_by_hand():
    # class 0: 3 of 4 right, class 1: 0 of 1, class 2: 1 of 1 -> (75 + 0 + 100) / 3
    scores = np.eye(3)[[0, 0, 0, 1, 0, 2]]
    labels = np.array([0, 0, 0, 0, 1, 2])
    assert metrics.mean_per_class_accuracy(scores, labels) == pytest.approx(175 / 3)
    assert metrics.topk_accuracy(scores, labels) == pytest.approx(400 / 6)


# ---- results and report --------------------------------------------------------------------------
def fake(model, dataset, seed, top1, top5=99.0):
    return results.make_result(model, dataset, {"probe": "logreg", "top1": top1, "top5": top5,
                                                "log_odds": metrics.log_odds(top1),
                                                "hparams": {"C": 1.0}, "seed": seed})


def test_results_roundtrip_and_duplicates(tmp_path):
    p = results.write_result(tmp_path / "a", fake("t-ReX*", "pets", 0, 90.0))
    assert p.name == "t-ReX__pets__seed0.json"
    data = json.loads(p.read_text())
    assert data["schema"] == results.SCHEMA and "versions" in data and "created" in data
    (tmp_path / "a" / "other.json").write_text('{"hello": 1}')
    newer = fake("t-ReX*", "pets", 0, 91.0)
    newer["created"] = "9999-01-01T00:00:00+00:00"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "copy.json").write_text(json.dumps(newer))
    warnings = []
    loaded = results.load_results([tmp_path], warn=warnings.append)
    assert len(loaded) == 1 and loaded[0]["top1"] == 91.0
    assert any("not a trex-eval result" in w for w in warnings)
    with pytest.raises(results.ResultsError):
        results.load_results([tmp_path / "missing"])


def test_result_files_follow_the_umask(tmp_path):
    """Colleagues can read a shared results folder: no owner-only temporary-file mode."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        p = results.write_result(tmp_path / "shared", fake("trex", "pets", 0, 90.0))
        again = results.write_result(tmp_path / "shared", fake("trex", "pets", 0, 91.0))
    finally:
        os.umask(old)
    assert again == p and json.loads(p.read_text())["top1"] == 91.0
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [q.name for q in (tmp_path / "shared").iterdir()] == [p.name]  # no temporary left


def test_report_mean_std_log_odds_tables_and_plot(tmp_path):
    res = [fake("trex", "pets", 0, 90.0), fake("trex", "pets", 1, 92.0),
           fake("trex", "dtd", 0, 70.0), fake("trex", "dtd", 1, 74.0),
           fake("random", "pets", 0, 10.0), fake("random", "dtd", 0, 20.0)]
    rep = report.aggregate(res)
    cell = rep.cell("trex", "pets")
    assert cell.top1_mean == pytest.approx(91.0) and cell.top1_std == pytest.approx(math.sqrt(2))
    hand = (math.log(0.91 / 0.09) + math.log(0.72 / 0.28)) / 2
    assert rep.mean_log_odds["trex"] == pytest.approx(hand)
    assert rep.mean_log_odds["random"] == pytest.approx((math.log(1 / 9) + math.log(0.25)) / 2)
    md = report.to_markdown(rep)
    assert "| model | pets | dtd | mean log-odds |" in md
    assert "91.00 ± 1.41" in md and f"{hand:.4f}" in md
    rows = list(csv.DictReader(report.to_csv(rep).splitlines()))
    assert len(rows) == 4 and rows[0]["model"] == "trex" and rows[0]["n_seeds"] == "2"
    assert float(rows[0]["model_mean_log_odds"]) == pytest.approx(hand, abs=1e-6)
    out = report.plot(rep, tmp_path / "plots" / "bars.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_marks_models_with_fewer_datasets():
    rep = report.aggregate([fake("a", "x", 0, 50.0), fake("a", "y", 0, 60.0),
                            fake("b", "x", 0, 70.0)])
    assert "(1 of 2 sets)" in report.to_markdown(rep)
    assert rep.n_datasets == {"a": 2, "b": 1}


def test_probe_precision_setting():
    x, y = blobs(n_per_class=8, classes=3, dim=6)
    cfg = ProtocolConfig(trials=2, search="grid", dtype="float64")
    res = evaluate_features(x, y, x, y, config=cfg, seed=0)
    assert res["settings"]["dtype"] == "float64" and res["top1"] >= 99.0
    assert all("n_iter" in t and "converged" in t for t in res["search"]["history"])
    with pytest.raises(ValueError, match="dtype"):
        evaluate_features(x, y, x, y, config=ProtocolConfig(dtype="float16"), seed=0)


def test_report_leaves_in1k_out_of_the_mean_log_odds_as_published():
    res = [fake("m", "IN-1K", 0, 76.0), fake("m", "pets", 0, 90.0), fake("m", "dtd", 0, 70.0)]
    rep = report.aggregate(res)
    hand = (math.log(0.9 / 0.1) + math.log(0.7 / 0.3)) / 2
    assert rep.excluded == ["IN-1K"] and rep.mean_log_odds["m"] == pytest.approx(hand)
    assert rep.n_datasets["m"] == 2
    md = report.to_markdown(rep)
    assert "IN-1K (ImageNet-1K) left out as in the published aggregation" in md
    assert "(2 of 2 sets)" not in md and "76.00" in md  # still shown in the table
    rows = {r["dataset"]: r for r in csv.DictReader(report.to_csv(rep).splitlines())}
    assert rows["IN-1K"]["in_mean_log_odds"] == "0" and rows["pets"]["in_mean_log_odds"] == "1"
    both = report.aggregate(res, include_in1k=True)
    assert both.excluded == [] and both.mean_log_odds["m"] == pytest.approx(
        (hand * 2 + math.log(0.76 / 0.24)) / 3)
    assert "ImageNet-1K included" in report.to_markdown(both)
    for name in ("in1k", "imagenet-1k", "ImageNet_1K", "ILSVRC-2012", "imagenet"):
        assert report.is_in1k(name), name
    for name in ("inat2018", "cog_l1", "imagenette", "in1k-subset"):
        assert not report.is_in1k(name), name
    only = report.aggregate([fake("m", "in1k", 0, 70.0)])
    assert math.isnan(only.mean_log_odds["m"]) and "| - |" in report.to_markdown(only)


def sized(model, dataset, seed, top1, n_test, **settings):
    r = fake(model, dataset, seed, top1)
    r["sizes"] = {"test": n_test}
    r["mean_per_class"] = top1 - 1.0
    r["settings"] = {"dtype": "float32", "threads": 1, "split": "published", "search": "grid",
                     "trials": 30, **settings}
    return r


def test_report_clips_a_perfect_score_and_says_so():
    rep = report.aggregate([sized("m", "eurosat", 0, 100.0, 400),
                            sized("m", "dtd", 0, 50.0, 400)])
    cell = rep.cell("m", "eurosat")
    assert cell.clipped and cell.log_odds == pytest.approx(math.log(799.0))  # p = 1 - 1/800
    assert rep.mean_log_odds["m"] == pytest.approx(math.log(799.0) / 2)
    md = report.to_markdown(rep)
    assert "100.00 †" in md and "m/eurosat" in md and "half a test image" in md
    assert "| m | eurosat | 1 | 100.00 | 99.00 | 99.00 | logreg |" in md  # top-5, per-class


def test_report_warns_when_settings_differ():
    same = [sized("m", "a", 0, 60.0, 100), sized("m", "b", 0, 70.0, 100)]
    assert report.mixed_settings(same) == {} and report.mixed_warning(report.aggregate(same)) \
        is None
    mixed = [sized("m", "a", 0, 60.0, 100), sized("m", "a", 1, 61.0, 100, threads=None),
             sized("m", "b", 0, 70.0, 100, dtype="float64")]
    mixed[0]["versions"]["scikit-learn"] = "0.0.1"
    old = fake("m", "b", 1, 71.0)
    old["settings"] = {"dtype": "float32", "threads": 1, "search": "grid", "trials": 30}
    rep = report.aggregate(mixed + [old])
    assert set(rep.mixed) == {"threads", "precision", "scikit-learn", "split"}
    assert rep.mixed["split"] == ["published", "trex_hub"]  # no "split": the old rule
    line = report.mixed_warning(rep)
    assert "\n" not in line and "threads: 1, None" in line and "precision" in line
    assert "Warning: these results mix runs with different settings" in report.to_markdown(rep)


def test_plot_legend_never_covers_a_bar(tmp_path):
    res = [fake(m, d, 0, t) for m in ("a-long-model-name", "b", "c", "d", "e")
           for d, t in (("pets", 99.0), ("dtd", 97.0), ("cars", 98.5))]
    rep = report.aggregate(res)
    fig, ax1, ax2 = report.figure(rep)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert len(fig.legends) == 1 and ax1.get_legend() is None
    for ax in (ax1, ax2):
        assert not legend.overlaps(ax.get_window_extent())
        for patch in ax.patches:
            assert not legend.overlaps(patch.get_window_extent())
    import matplotlib.pyplot as plt

    plt.close(fig)
    out = report.plot(rep, tmp_path / "bars.png")
    from PIL import Image

    with Image.open(out) as im:  # saved with bbox_inches="tight": the legend is in the image
        w, h = im.size
    assert h > 4 * 120 * 0.9 and w > 100


def test_resize_transform_is_the_transfer_preset_at_another_size():
    """trex-eval --image-size builds its transform from the weights' preprocessing config."""
    from PIL import Image
    from torchvision import transforms as T

    from trex_hub.evaluation.features import build_resize_transform
    from trex_hub.preprocess import IMAGENET_MEAN, IMAGENET_STD

    img = Image.open(sorted(Path(__file__).parent.parent.joinpath("samples").glob("*.jpg"))[0])
    img = img.convert("RGB")
    ref = T.Compose([T.Resize(112, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                     T.CenterCrop(112), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    got = build_resize_transform(112)(img)
    assert got.shape == (3, 112, 112)
    assert torch.equal(got, ref(img))


def test_one_trainval_image_per_class_is_refused_with_the_reason():
    x, y = blobs(n_per_class=1, classes=3, dim=4)
    for probe in ("logreg", "sgd"):
        with pytest.raises(ValueError, match="at least 2 trainval images"):
            evaluate_features(x, y, x, y, config=ProtocolConfig(probe=probe, trials=2,
                                                                search="grid"), seed=0)
    y2 = np.array([0, 0, 1, 2])  # one class with two images is enough: the search has a row
    x2 = np.vstack([x, x[:1]])
    res = evaluate_features(x2, np.sort(y2), x, y, config=ProtocolConfig(trials=2,
                                                                        search="grid"), seed=0)
    assert res["sizes"]["train"] == 1


@pytest.mark.parametrize("body,field", [
    ({"dataset": "x", "seed": 0, "top1": 50.0}, "'model'"),
    ({"model": "", "dataset": "x", "seed": 0, "top1": 50.0}, "'model'"),
    ({"model": "m", "dataset": 3, "seed": 0, "top1": 50.0}, "'dataset'"),
    ({"model": "m", "dataset": "x", "seed": True, "top1": 50.0}, "'seed'"),
    ({"model": "m", "dataset": "x", "seed": 0}, "'top1'"),
    ({"model": "m", "dataset": "x", "seed": 0, "top1": "high"}, "'top1'"),
    ({"model": "m", "dataset": "x", "seed": 0, "top1": 150.0}, "'top1'"),
    ({"model": "m", "dataset": "x", "seed": 0, "top1": 50.0, "top5": "x"}, "'top5'"),
    ({"model": "m", "dataset": "x", "seed": 0, "top1": 50.0, "sizes": []}, "'sizes'"),
    ({"model": "m", "dataset": "x", "seed": 0, "top1": 50.0, "sizes": {"test": 0}}, "'sizes'"),
    ({"model": "m", "dataset": "x", "seed": 0, "top1": 50.0, "created": 5}, "'created'"),
])
def test_load_results_names_the_file_and_field_of_a_malformed_result(tmp_path, body, field):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": results.SCHEMA, **body}))
    with pytest.raises(results.ResultsError) as info:
        results.load_results([tmp_path])
    assert str(bad) in str(info.value) and field in str(info.value)
    report.aggregate([fake("m", "x", 0, 50.0)])  # a valid one still aggregates


def test_report_refuses_one_dataset_name_from_two_folders(tmp_path):
    a, b = fake("m", "flowers", 0, 90.0), fake("m2", "flowers", 1, 50.0)
    old = fake("m", "flowers", 2, 80.0)
    a["dataset_source"], b["dataset_source"] = "/data/a/flowers", "/data/b/flowers"
    for folder, res in (("ra", a), ("rb", b), ("rold", old)):
        results.write_result(tmp_path / folder, res)
    assert len(results.load_results([tmp_path / "ra", tmp_path / "rold"])) == 2  # not recorded
    with pytest.raises(results.ResultsError, match="/data/a/flowers and /data/b/flowers"):
        results.load_results([tmp_path])
