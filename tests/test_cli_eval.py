"""``trex-eval`` end to end on CPU: generated image folders, generated checkpoints, seconds."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trex_hub.cli import eval as cli

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="module")
def r18_ckpt(tmp_path_factory):
    import factories as fx

    path = tmp_path_factory.mktemp("ckpt") / "tiny_r18.pth"
    fx.write_backbone_file(path, arch="resnet18", seed=0)
    return path


def write_images(root: Path, classes=("a", "b", "c"), n=6, size=24, seed=0):
    """Class-dependent colours plus noise, so even random features separate them a bit."""
    rng = np.random.default_rng(seed)
    colours = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220)}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(np.array(colours[c]) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / c / f"{c}{i}.png")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "colours"
    write_images(root / "train", n=6)
    write_images(root / "test", n=3, seed=1)
    return root


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_every_option(capsys):
    code, out, _ = run_cli(["run", "--help"], capsys)
    assert code == 0
    for opt in ("--models", "--names", "--format", "--data", "--dataset-name", "--out",
                "--classes", "--train-limit", "--test-limit", "--subset-seed",
                "--test-fraction", "--split-seed", "--seeds", "--trials", "--probe", "--search",
                "--max-iter", "--probe-dtype", "--epochs", "--sgd-batch-size", "--device", "--batch-size",
                "--image-size", "--num-workers", "--threads", "--cache", "--quiet", "--split",
                "published", "trex_hub", "--no-progress", "imagefolder", "fashion-mnist",
                "features", "random:NAME", "[1e-5, 1e6]"):
        assert opt in out, opt
    code, out, _ = run_cli(["report", "--help"], capsys)
    assert code == 0
    for opt in ("--markdown", "--csv", "--plot", "RESULTS_DIR", "log(p / (1 - p))",
                "--include-in1k", "ImageNet-1K left out"):
        assert opt in out, opt
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "run" in out and "report" in out


@pytest.mark.parametrize("argv", [
    [],
    ["run", "--format", "imagefolder", "--models", "x"],  # no --out
    ["run", "--format", "bogus", "--models", "x", "--out", "o"],
    ["run", "--format", "imagefolder", "--out", "o"],  # no --models
    ["run", "--format", "imagefolder", "--models", "x", "--out", "o"],  # no --data
    ["run", "--format", "features", "--out", "o"],  # no --data
    ["run", "--format", "fashion-mnist", "--models", "x", "--out", "o", "--trials", "0"],
    ["run", "--format", "fashion-mnist", "--models", "x", "y", "--names", "a", "--out", "o"],
    ["report"],
])
def test_usage_errors_exit_2(argv, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err


def test_end_to_end_two_models_two_seeds_then_report(tmp_path, r18_ckpt, image_folder, capsys):
    out = tmp_path / "results"
    code, md, err = run_cli(["run", "--models", r18_ckpt, f"random:{r18_ckpt}",
                             "--names", "generated", "random",
                             "--format", "imagefolder", "--data", image_folder,
                             "--out", out, "--seeds", 0, 1, "--trials", 3, "--search", "grid",
                             "--image-size", 32, "--batch-size", 8, "--threads", 1], capsys)
    assert code == 0, err
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["generated__colours__seed0.json", "generated__colours__seed1.json",
                     "random__colours__seed0.json", "random__colours__seed1.json"]
    res = json.loads((out / "generated__colours__seed1.json").read_text())
    assert res["model"] == "generated" and res["dataset"] == "colours" and res["seed"] == 1
    assert res["probe"] == "logreg" and 1e-5 <= res["hparams"]["C"] <= 1e6
    assert res["sizes"]["trainval"] == 18 and res["sizes"]["test"] == 9
    assert res["sizes"]["val"] == 3 and res["sizes"]["feature_dim"] == 512
    assert res["features"]["image_size"] == 32 and res["features"]["arch"] == "resnet18"
    assert res["class_names"] == ["a", "b", "c"] and res["search"]["trials"] == 3
    assert "| generated |" in md and "| random |" in md
    # what the numbers depend on travels with them
    assert res["settings"]["split"] == "published" and res["settings"]["dtype"] == "float32"
    assert res["runtime"]["threads"] == 1 and res["runtime"]["precision"] == "float32"
    assert {"numpy", "scipy", "scikit-learn", "torch"} <= set(res["versions"])
    assert 0.0 <= res["mean_per_class"] <= 100.0

    code, md, err = run_cli(["report", out, "--markdown", tmp_path / "r.md", "--csv",
                             tmp_path / "r.csv", "--plot", tmp_path / "r.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "r.md").read_text().strip() == md.strip()
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("model,dataset,n_seeds")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_fashion_mnist_format_with_class_subset(tmp_path, r18_ckpt, capsys):
    from test_datasets import write_fmnist

    write_fmnist(tmp_path / "fm", n_train=60, n_test=30)
    code, md, err = run_cli(["run", "--models", r18_ckpt, "--format", "fashion-mnist",
                             "--data", tmp_path / "fm", "--classes", "5-9", "--train-limit", 20,
                             "--test-limit", 10, "--out", tmp_path / "res", "--trials", 2,
                             "--search", "grid", "--image-size", 32, "--threads", 1, "-q"],
                            capsys)
    assert code == 0, err
    (f,) = list((tmp_path / "res").glob("*.json"))
    res = json.loads(f.read_text())
    assert res["dataset"] == "fashion-mnist[5-9]" and res["sizes"]["num_classes"] == 5
    assert res["sizes"]["trainval"] == 20 and res["sizes"]["test"] == 10
    assert res["class_names"][0] == "Sandal" and err == ""


def test_features_format_reads_trex_extract_outputs(tmp_path, r18_ckpt, image_folder, capsys):
    from trex_hub.cli import extract as extract_cli

    feats = tmp_path / "feats"
    for split in ("train", "test"):
        code = extract_cli.main([str(r18_ckpt), str(image_folder / split), "-o",
                                 str(feats / f"{split}.npy"), "--labels", "folder", "-j", "0",
                                 "--threads", "1"])
        assert code == 0
    capsys.readouterr()
    code, md, err = run_cli(["run", "--format", "features", "--data", feats, "--out",
                             tmp_path / "res", "--trials", 2, "--search", "grid", "--threads", 1],
                            capsys)
    assert code == 0, err
    (f,) = list((tmp_path / "res").glob("*.json"))
    res = json.loads(f.read_text())
    assert res["model"] == "feats" and res["sizes"]["trainval"] == 18
    assert res["sizes"]["feature_dim"] == 512 and res["class_names"] == ["a", "b", "c"]
    assert res["features"]["source"] == "trex-extract files"


def test_missing_data_and_bad_model_exit_1(tmp_path, r18_ckpt, capsys):
    code, _, err = run_cli(["run", "--models", r18_ckpt, "--format", "fashion-mnist", "--data",
                            tmp_path / "nothing", "--out", tmp_path / "o"], capsys)
    assert code == 1 and "dataset-fashion-mnist" in err
    code, _, err = run_cli(["run", "--models", r18_ckpt, "--format", "dtd", "--data", tmp_path,
                            "--out", tmp_path / "o"], capsys)
    assert code == 1 and "never downloads" in err
    code, _, err = run_cli(["run", "--models", r18_ckpt, "--format", "imagefolder", "--data",
                            tmp_path / "nope", "--out", tmp_path / "o"], capsys)
    assert code == 1 and "does not exist" in err
    code, _, err = run_cli(["run", "--models", tmp_path / "missing.pth", "--format", "features",
                            "--data", tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 1 and "train*" in err
    code, _, err = run_cli(["report", tmp_path / "o"], capsys)
    assert code == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["report", tmp_path / "empty"], capsys)
    assert code == 1 and "no trex-eval result" in err


def test_feature_cache_and_threads(tmp_path, r18_ckpt, capsys):
    from test_datasets import write_fmnist

    import torch

    before = torch.get_num_threads()
    write_fmnist(tmp_path / "fm", n_train=30, n_test=20)
    argv = ["run", "--models", r18_ckpt, "--format", "fashion-mnist", "--data", tmp_path / "fm",
            "--out", tmp_path / "res", "--trials", 2, "--search", "grid", "--image-size", 32,
            "--cache", tmp_path / "cache", "--threads", 1]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    first = json.loads(next((tmp_path / "res").glob("*.json")).read_text())
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and "features from cache" in err
    second = json.loads(next((tmp_path / "res").glob("*.json")).read_text())
    assert second["top1"] == first["top1"] and second["settings"]["threads"] == 1
    import torch

    assert torch.get_num_threads() == before  # the CLI restores the thread count


def test_random_init_is_deterministic(r18_ckpt):
    import torch

    from trex_hub.evaluation.runner import load_model

    a, b = load_model(f"random:{r18_ckpt}", "cpu"), load_model(f"random:{r18_ckpt}", "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    loaded = load_model(str(r18_ckpt), "cpu")  # the generated file has its own BN statistics
    assert not torch.equal(a.backbone.bn1.running_var, loaded.backbone.bn1.running_var)


def test_features_format_several_models(tmp_path, r18_ckpt, image_folder, capsys):
    import shutil

    from trex_hub.cli import extract as extract_cli

    for split in ("train", "test"):
        assert extract_cli.main([str(r18_ckpt), str(image_folder / split), "-o",
                                 str(tmp_path / "one" / f"{split}.npy"), "--labels", "folder",
                                 "-j", "0", "--threads", "1"]) == 0
    for model in ("m1", "m2"):
        shutil.copytree(tmp_path / "one", tmp_path / "many" / model)
    capsys.readouterr()
    code, md, err = run_cli(["run", "--format", "features", "--data", tmp_path / "many",
                             "--models", "m1", "m2", "--out", tmp_path / "res", "--trials", 2,
                             "--search", "grid", "--threads", 1], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "res").glob("*.json")) == [
        "m1__many__seed0.json", "m2__many__seed0.json"]
    code, _, err = run_cli(["run", "--format", "features", "--data", tmp_path / "many",
                            "--models", "m1", "m3", "--out", tmp_path / "res2"], capsys)
    assert code == 1 and "m3" in err
    assert not list((tmp_path / "res2").glob("*.json"))  # found before m1's search, not after


def test_split_option_results_and_report_warns_when_mixed(tmp_path, r18_ckpt, image_folder,
                                                          capsys):
    from trex_hub.cli import extract as extract_cli

    feats = tmp_path / "feats"
    for split in ("train", "test"):
        assert extract_cli.main([str(r18_ckpt), str(image_folder / split), "-o",
                                 str(feats / f"{split}.npy"), "--labels", "folder", "-j", "0",
                                 "--threads", "1", "--no-progress", "-q"]) == 0
    base = ["run", "--format", "features", "--data", feats, "--trials", 2, "--search", "grid",
            "--threads", 1, "-q"]
    for rule in ("published", "trex_hub"):
        code, _, err = run_cli(base + ["--split", rule, "--out", tmp_path / rule,
                                       "--dataset-name", f"colours-{rule}"], capsys)
        assert code == 0, err
        (f,) = list((tmp_path / rule).glob("*.json"))
        assert json.loads(f.read_text())["settings"]["split"] == rule
    code, _, err = run_cli(base + ["--split", "random", "--out", tmp_path / "x"], capsys)
    assert code == 2
    code, md, err = run_cli(["report", tmp_path / "published", tmp_path / "trex_hub"], capsys)
    assert code == 0
    warn = [line for line in err.splitlines() if "warning" in line]
    assert len(warn) == 1 and "split: published, trex_hub" in warn[0]
    assert "mix runs with different settings" in md
    code, md, err = run_cli(["report", tmp_path / "published"], capsys)
    assert code == 0 and "warning" not in err


@pytest.mark.parametrize("tty,extra,expected", [
    (False, [], False),                # not a terminal: no bars, as trex-extract's downloads
    (True, [], True),
    (True, ["--no-progress"], False),  # asked off
    (True, ["-q"], False),
])
def test_progress_bars_only_on_a_terminal_and_when_asked(monkeypatch, capsys, tty, extra,
                                                         expected):
    from trex_hub.evaluation import runner

    seen = {}

    def fake_run(models, data, out, **kw):
        seen.update(kw)
        one = make_result("m", "d", {"probe": "logreg", "top1": 50.0, "top5": 90.0, "seed": 0})
        return runner.RunSummary(results=[one])

    from trex_hub.evaluation.results import make_result

    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    code = cli.main(["run", "--format", "features", "--data", ".", "--out", "o"] + extra)
    capsys.readouterr()
    assert code == 0 and seen["progress"] is expected


def test_progress_bars_show_trials_and_features(tmp_path, r18_ckpt, image_folder, capsys,
                                                monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = run_cli(["run", "--models", r18_ckpt, "--format", "imagefolder", "--data",
                            image_folder, "--out", tmp_path / "res", "--trials", 2,
                            "--search", "grid", "--image-size", 32, "--threads", 1], capsys)
    assert code == 0, err
    assert "features colours trainval" in err and "img" in err
    assert "probe tiny_r18 seed 0" in err and "3/3" in err  # 2 trials + the refit


# ---- review C: findings 2, 3, 5, 10 -------------------------------------------------------------
def _two_trainings(root: Path):
    """The documented layout runs/<name>/checkpoint.pth, twice, with different weights."""
    import factories as fx

    paths = []
    for i, run in enumerate(("r0", "r2")):
        (root / run).mkdir(parents=True)
        fx.write_backbone_file(root / run / "checkpoint.pth", arch="resnet18", seed=i)
        paths.append(root / run / "checkpoint.pth")
    return paths


def _no_model_loading(monkeypatch):
    """Make any model load or feature extraction fail loudly: the checks must come first."""
    from trex_hub.evaluation import runner

    def boom(*a, **k):
        raise RuntimeError("EXPENSIVE WORK STARTED")

    monkeypatch.setattr(runner, "load_model", boom)
    monkeypatch.setattr(runner, "compute_features", boom)


def test_same_display_names_or_seeds_are_refused_before_any_work(tmp_path, image_folder, capsys,
                                                                 monkeypatch):
    r0, r2 = _two_trainings(tmp_path)
    out = tmp_path / "res"
    base = ["--format", "imagefolder", "--data", image_folder, "--out", out, "--trials", 2,
            "--search", "grid", "--image-size", 32, "--threads", 1, "-q"]
    _no_model_loading(monkeypatch)
    code, _, err = run_cli(["run", "--models", r0, r0] + base, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--models gives {r0} twice" in err and "EXPENSIVE" not in err
    assert not list(out.glob("*.json"))
    for extra in (["--names", "a", "a"], ["--names", "a b", "a-b"]):  # same name / same file
        code, _, err = run_cli(["run", "--models", r0, r2] + extra + base, capsys)
        assert code == 2 and "--names" in err and "EXPENSIVE" not in err, err
    code, _, err = run_cli(["run", "--models", r0, "--seeds", 0, 1, 0] + base, capsys)
    assert code == 2 and "--seeds" in err and "0" in err and "EXPENSIVE" not in err, err
    monkeypatch.undo()
    code, md, err = run_cli(["run", "--models", r0, r2, "--names", "r0", "r2"] + base, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.json")) == ["r0__colours__seed0.json",
                                                          "r2__colours__seed0.json"]
    # without --names, two runs/*/checkpoint.pth are named after their folders
    out2 = tmp_path / "res2"
    code, md, err = run_cli(["run", "--models", r0, r2] + base[:5] + [out2] + base[6:], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out2.glob("*.json")) == [
        f"{r0.parent.name}-checkpoint__colours__seed0.json",
        f"{r2.parent.name}-checkpoint__colours__seed0.json"]


def test_another_models_result_with_the_same_name_is_not_overwritten(tmp_path, image_folder,
                                                                     capsys):
    r0, r2 = _two_trainings(tmp_path)
    out = tmp_path / "res"
    base = ["--format", "imagefolder", "--data", image_folder, "--out", out, "--trials", 2,
            "--search", "grid", "--image-size", 32, "--threads", 1]
    code, _, err = run_cli(["run", "--models", r0] + base, capsys)
    assert code == 0, err
    (done,) = list(out.glob("*.json"))
    before = done.read_text()
    code, _, err = run_cli(["run", "--models", r2] + base, capsys)
    assert code == 2 and str(done) in err and str(r0.resolve()) in err and "--names" in err, err
    assert done.read_text() == before and "features of" not in err
    code, _, err = run_cli(["run", "--models", r0] + base, capsys)  # the same model: a rerun
    assert code == 0 and f"replacing {done}" in err, err


def test_feature_cache_misses_when_an_exported_folder_or_the_images_change(
        tmp_path, r18_ckpt, capsys):
    import shutil

    import factories as fx
    import trex_hub

    folder = tmp_path / "exp" / "fm"
    trex_hub.save_pretrained(trex_hub.load(r18_ckpt), folder)
    data = tmp_path / "cc"
    write_images(data / "train", n=6)
    write_images(data / "test", n=3, seed=1)
    argv = ["run", "--models", folder, "--format", "imagefolder", "--data", data, "--trials", 2,
            "--search", "grid", "--image-size", 32, "--threads", 1, "--cache", tmp_path / "cache"]

    def top1(out):
        code, _, err = run_cli(argv + ["--out", tmp_path / out], capsys)
        assert code == 0, err
        return json.loads(next((tmp_path / out).glob("*.json")).read_text())["top1"], err

    _, err = top1("a")
    assert "features from cache" not in err
    _, err = top1("b")
    assert "features from cache" in err  # unchanged: reused
    shutil.rmtree(folder)  # re-exported: other weights, the same folder
    other = tmp_path / "other.pth"
    fx.write_backbone_file(other, arch="resnet18", seed=5)
    trex_hub.save_pretrained(trex_hub.load(other), folder)
    _, err = top1("c")
    assert "features from cache" not in err, err
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    for png in (data / "test" / "a").glob("*.png"):  # test images of class a now look like b
        png.unlink()
    write_images(data / "test_b", classes=("b",), n=3, seed=7)
    for i, png in enumerate(sorted((data / "test_b" / "b").glob("*.png"))):
        shutil.move(str(png), data / "test" / "a" / f"a{i}.png")
    shutil.rmtree(data / "test_b")
    cached, err = top1("d")
    assert "features from cache" not in err, err
    code, _, err = run_cli(argv[:-2] + ["--out", tmp_path / "e"], capsys)  # no cache at all
    assert code == 0, err
    fresh = json.loads(next((tmp_path / "e").glob("*.json")).read_text())["top1"]
    assert cached == fresh


def _extract_folder(model, image_folder, feats):
    from trex_hub.cli import extract as extract_cli

    for split in ("train", "test"):
        assert extract_cli.main([str(model), str(image_folder / split), "-o",
                                 str(feats / f"{split}.npy"), "--labels", "folder", "-j", "0",
                                 "--threads", "1", "--no-progress", "-q"]) == 0


def test_features_format_applies_classes_and_limits(tmp_path, r18_ckpt, image_folder, capsys):
    feats = tmp_path / "feats"
    _extract_folder(r18_ckpt, image_folder, feats)
    capsys.readouterr()
    code, md, err = run_cli(["run", "--format", "features", "--data", feats, "--out",
                             tmp_path / "res", "--trials", 2, "--search", "grid", "--threads", 1,
                             "-q", "--classes", "2,0", "--train-limit", 4, "--test-limit", 2],
                            capsys)
    assert code == 0, err
    (f,) = list((tmp_path / "res").glob("*.json"))
    res = json.loads(f.read_text())
    assert res["dataset"] == "feats[2,0]" and res["class_names"] == ["c", "a"]
    assert res["sizes"]["trainval"] == 4 and res["sizes"]["test"] == 2
    assert res["sizes"]["num_classes"] == 2
    code, _, err = run_cli(["run", "--format", "features", "--data", feats, "--out",
                            tmp_path / "res2", "--classes", "5"], capsys)
    assert code == 1 and "out of range" in err and "unexpected" not in err, err


def test_features_subset_picks_the_images_the_image_path_picks(tmp_path, r18_ckpt, image_folder):
    """The same --classes / --train-limit / --test-limit select the same images in both paths."""
    from trex_hub.featurefile import read_features
    from trex_hub.evaluation import runner

    feats = tmp_path / "feats"
    _extract_folder(r18_ckpt, image_folder, feats)
    for classes, tr, te, seed in (("2,0", 4, 2, 0), ("1-2", 5, 3, 3), (None, 7, None, 1)):
        opts = runner.DataOptions("imagefolder", str(image_folder), classes=classes,
                                  train_limit=tr, test_limit=te, subset_seed=seed)
        parts = runner.load_image_dataset(opts)
        sets = runner.load_feature_sets(feats, None, several=False)
        # feature rows replaced by their row numbers, to see which rows were kept
        rows = (np.arange(len(sets[0]), dtype=np.float32)[:, None], sets[1],
                np.arange(len(sets[2]), dtype=np.float32)[:, None], sets[3], sets[4])
        fopts = runner.DataOptions("features", str(feats), classes=classes, train_limit=tr,
                                   test_limit=te, subset_seed=seed)
        Xtr, ytr, Xte, yte, names = runner.subset_features(rows, fopts)
        assert names == parts["train"].class_names
        for split, X, y in (("train", Xtr, ytr), ("test", Xte, yte)):
            manifest = [r["path"] for r in read_features(feats / f"{split}.npy")[1]]
            picked = [manifest[int(i)] for i in X[:, 0]]
            expect = [Path(p).relative_to(image_folder / split).as_posix()
                      for p in parts[split].items]
            assert picked == expect and y.tolist() == parts[split].labels.tolist()


def test_one_trainval_image_per_class_fails_before_the_features(tmp_path, r18_ckpt, image_folder,
                                                                 capsys, monkeypatch):
    _no_model_loading(monkeypatch)
    for probe in ("logreg", "sgd"):
        code, _, err = run_cli(["run", "--models", r18_ckpt, "--format", "imagefolder", "--data",
                                image_folder, "--out", tmp_path / "o", "--trials", 2,
                                "--train-limit", 3, "--probe", probe], capsys)
        assert code == 1 and err.count("\n") == 1, err
        assert "2 trainval images" in err and "--train-limit 3" in err, err
        assert "EXPENSIVE" not in err and "Trial" not in err


def test_out_and_cache_are_checked_before_any_work(tmp_path, r18_ckpt, image_folder, capsys,
                                                   monkeypatch):
    _no_model_loading(monkeypatch)
    base = ["run", "--models", r18_ckpt, "--format", "imagefolder", "--data", image_folder,
            "--trials", 2]
    code, _, err = run_cli(base + ["--out", r18_ckpt], capsys)
    assert code == 2 and f"--out {r18_ckpt}" in err and "EXPENSIVE" not in err, err
    code, _, err = run_cli(base + ["--out", tmp_path / "o", "--cache", r18_ckpt], capsys)
    assert code == 2 and f"--cache {r18_ckpt}" in err and "EXPENSIVE" not in err, err
    code, _, err = run_cli(base + ["--out", r18_ckpt / "sub"], capsys)
    assert code == 2 and "--out" in err and "EXPENSIVE" not in err, err
    # checked, not made: a run that fails later (here at the model) leaves no empty folders
    code, _, err = run_cli(base + ["--out", tmp_path / "o2" / "x", "--cache", tmp_path / "c2"],
                           capsys)
    assert code != 0 and "EXPENSIVE" in err, err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "c2").exists()


def test_report_names_a_malformed_result_file(tmp_path, capsys):
    folder = tmp_path / "rbad"
    folder.mkdir()
    bad = folder / "a.json"
    schema = "trex_hub.eval.result/1"
    for body, field in (({"dataset": "x", "seed": 0, "top1": 50.0}, "'model'"),
                        ({"model": "m", "dataset": "x", "seed": 0, "top1": "high"}, "'top1'"),
                        ({"model": "m", "dataset": "x", "seed": 0, "top1": 150.0}, "'top1'"),
                        ({"model": "m", "dataset": "x", "seed": "0", "top1": 50.0}, "'seed'")):
        bad.write_text(json.dumps({"schema": schema, **body}))
        code, _, err = run_cli(["report", folder], capsys)
        assert code == 1 and str(bad) in err and field in err, err
        assert "unexpected" not in err and err.count("\n") == 1, err


def test_another_datasets_result_with_the_same_name_is_not_overwritten(tmp_path, r18_ckpt,
                                                                       capsys):
    """/data/a/colours and /data/b/colours are both named 'colours': one result file name."""
    folders = []
    for i, where in enumerate(("a", "b")):
        root = tmp_path / where / "colours"
        write_images(root / "train", n=6, seed=10 * i)
        write_images(root / "test", n=3, seed=10 * i + 1)
        folders.append(root)
    out = tmp_path / "res"
    base = ["run", "--models", r18_ckpt, "--format", "imagefolder", "--out", out, "--trials", 2,
            "--search", "grid", "--image-size", 32, "--threads", 1, "-q"]
    code, _, err = run_cli(base + ["--data", folders[0], "--seeds", 0, 1], capsys)
    assert code == 0, err
    done = out / "tiny_r18__colours__seed0.json"
    before = done.read_text()
    assert json.loads(before)["dataset_source"] == str(folders[0].resolve())
    for seeds in ([0], [2]):  # the same file, or a new seed that the report would average in
        code, _, err = run_cli(base + ["--data", folders[1], "--seeds"] + seeds, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert str(folders[0].resolve()) in err and str(folders[1].resolve()) in err, err
        assert "--dataset-name b-colours" in err and "features of" not in err, err
    assert done.read_text() == before and not (out / "tiny_r18__colours__seed2.json").exists()
    code, _, err = run_cli(base[:2] + [f"random:{r18_ckpt}"] + base[3:] + ["--data", folders[1]],
                           capsys)  # another model: the report would show one dataset column
    assert code == 2 and "--dataset-name b-colours" in err and "features of" not in err, err
    code, _, err = run_cli(base + ["--data", folders[1], "--dataset-name", "b-colours"], capsys)
    assert code == 0, err
    assert (out / "tiny_r18__b-colours__seed0.json").is_file() and done.read_text() == before
    code, _, err = run_cli(base[:-1] + ["--data", folders[0]], capsys)  # a rerun replaces
    assert code == 0 and f"replacing {done}" in err, err
    # results written before dataset_source was recorded are replaced as before
    for f in out.glob("tiny_r18__colours__seed*.json"):
        old = json.loads(f.read_text())
        del old["dataset_source"]
        f.write_text(json.dumps(old))
    code, _, err = run_cli(base + ["--data", folders[1], "--seeds", 0, 1], capsys)
    assert code == 0, err
    assert json.loads(done.read_text())["dataset_source"] == str(folders[1].resolve())
    # the report refuses to average two folders' results as one dataset
    code, _, err = run_cli(base + ["--data", folders[0], "--out", tmp_path / "res_a"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", out, tmp_path / "res_a"], capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert str(folders[0].resolve()) in err and str(folders[1].resolve()) in err, err
    assert "--dataset-name" in err, err


def test_one_format_read_from_two_roots_is_two_datasets(tmp_path, r18_ckpt, capsys,
                                                        monkeypatch):
    """--format fashion-mnist (or a torchvision set) names the dataset after the format."""
    from test_datasets import write_fmnist

    for i, root in enumerate(("one", "two")):
        write_fmnist(tmp_path / root, n_train=30, n_test=10, seed=i)
    base = ["run", "--models", r18_ckpt, "--format", "fashion-mnist", "--out", tmp_path / "res",
            "--trials", 2, "--search", "grid", "--image-size", 32, "--threads", 1, "-q"]
    code, _, err = run_cli(base + ["--data", tmp_path / "one"], capsys)
    assert code == 0, err
    (done,) = list((tmp_path / "res").glob("*.json"))
    before = done.read_text()
    _no_model_loading(monkeypatch)
    code, _, err = run_cli(base + ["--data", tmp_path / "two"], capsys)
    assert code == 2 and err.count("\n") == 1 and "EXPENSIVE" not in err, err
    assert str((tmp_path / "one").resolve()) in err and str((tmp_path / "two").resolve()) in err
    assert "--dataset-name two-fashion-mnist" in err and done.read_text() == before, err


# ---- review D: findings 7 and 17 ----------------------------------------------------------------
def _set_meta(feats: Path, **fields):
    for split in ("train", "test"):
        meta = feats / f"{split}.npy.meta.json"
        meta.write_text(json.dumps(dict(json.loads(meta.read_text()), **fields)))


def test_features_are_checked_against_the_checkpoint_named(tmp_path, r18_ckpt, image_folder,
                                                           capsys):
    """--models names a checkpoint: its weights digest must be the one trex-extract recorded."""
    import factories as fx

    feats = tmp_path / "feats"
    _extract_folder(r18_ckpt, image_folder, feats)
    other = tmp_path / "other.pth"
    fx.write_backbone_file(other, arch="resnet18", seed=1)
    base = ["run", "--format", "features", "--data", feats, "--trials", 2, "--search", "grid",
            "--threads", 1]
    capsys.readouterr()
    code, _, err = run_cli(base + ["--models", other, "--out", tmp_path / "o1"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--models {other}: the features in {feats} were extracted with {r18_ckpt}" in err
    assert f"pass the model they were extracted with (--models {r18_ckpt}" in err
    assert "trex-extract" in err and not (tmp_path / "o1").exists()
    code, _, err = run_cli(base + ["--models", r18_ckpt, "--out", tmp_path / "o2"], capsys)
    assert code == 0 and "the same weights" in err, err
    # a name that is no model only labels the result, and the log says which model it was
    code, _, err = run_cli(base + ["--models", "my-label", "--out", tmp_path / "o3"], capsys)
    assert code == 0 and "only labels the result" in err and str(r18_ckpt) in err, err
    assert (tmp_path / "o3" / "my-label__feats__seed0.json").is_file()
    # the trainval and the test file must come from one model, with or without --models
    meta = feats / "test.npy.meta.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), weights_sha256="0" * 64)))
    code, _, err = run_cli(base + ["--out", tmp_path / "o4"], capsys)
    assert code == 1 and "record different weights" in err and "000000000000" in err, err


def test_features_are_checked_against_the_registry_name(tmp_path, r18_ckpt, image_folder, capsys,
                                                        monkeypatch):
    """Two registry names are compared by name (nothing loaded); a registry name against
    features of a path is checked on the cached release file only, never downloaded."""
    import shutil

    import factories as fx

    from trex_hub import loader
    from trex_hub.evaluation import feature_check

    feats = tmp_path / "feats"
    _extract_folder(r18_ckpt, image_folder, feats)
    base = ["run", "--format", "features", "--data", feats, "--trials", 2, "--search", "grid",
            "--threads", 1]

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(loader, "_fetch_release", no_download)
    capsys.readouterr()
    code, _, err = run_cli(base + ["--models", "trex", "--out", tmp_path / "o1"], capsys)
    assert code == 0 and "not in the download cache" in err and str(r18_ckpt) in err, err
    cache = tmp_path / "cache"  # TREX_HUB_CACHE (conftest)
    cache.mkdir(exist_ok=True)
    shutil.copy(r18_ckpt, cache / "trex.pth")
    code, _, err = run_cli(base + ["--models", "trex", "--out", tmp_path / "o2"], capsys)
    assert code == 0 and "the same weights" in err, err
    fx.write_backbone_file(cache / "trexstar.pth", arch="resnet18", seed=1)
    code, _, err = run_cli(base + ["--models", "trex_star", "--out", tmp_path / "o3"], capsys)
    assert code == 2 and "not with the weights of trex_star" in err, err

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(feature_check, "load_model", no_load)
    _set_meta(feats, model="trex_star")
    code, _, err = run_cli(base + ["--models", "trex", "--out", tmp_path / "o4"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "--models trex: the features in" in err and "extracted with trex_star" in err
    assert "(--models trex_star; --names sets the name shown)" in err
    code, _, err = run_cli(base + ["--models", "t-rex*", "--out", tmp_path / "o5"], capsys)
    assert code == 0 and "the same weights" in err, err
    # several models: --models names the folders, and a folder named after a model is checked
    many = tmp_path / "many"
    shutil.copytree(feats, many / "trex")
    shutil.copytree(feats, many / "m1")
    code, _, err = run_cli(["run", "--format", "features", "--data", many, "--models", "trex",
                            "m1", "--out", tmp_path / "o6"], capsys)
    assert code == 2 and "move them to a folder named after the model" in err, err


def test_neighbours_of_an_output_made_from_several_folders(tmp_path, r18_ckpt, image_folder,
                                                           capsys):
    """trex-extract m/a m/b writes a/..., b/... relative to m: the default --images is m."""
    from trex_hub.cli import extract as extract_cli

    feats = tmp_path / "multi.npy"
    assert extract_cli.main([str(r18_ckpt), str(image_folder / "train" / "a"),
                             str(image_folder / "train" / "b"), "-o", str(feats), "-j", "0",
                             "--threads", "1", "--no-progress", "-q"]) == 0
    code, _, err = run_cli(["neighbours", feats, "--out", tmp_path / "g.png", "-k", 2], capsys)
    assert code == 0 and (tmp_path / "g.png").is_file(), err
    code, _, err = run_cli(["neighbours", feats, "--images", image_folder / "train" / "a",
                            "--out", tmp_path / "g2.png"], capsys)
    assert code == 1 and "(for several folders, their common parent)" in err, err
    code, out, _ = run_cli(["neighbours", "--help"], capsys)
    assert code == 0 and "for several folders, their common parent" in " ".join(out.split())


def test_features_of_two_models_are_one_dataset_and_checked_fairly(tmp_path, r18_ckpt,
                                                                   image_folder, capsys,
                                                                   monkeypatch):
    """Two models' feature folders of the same images go under one --dataset-name into one
    --out and one report (a feature folder is one model's, not another dataset); a registry
    name is accepted whichever of its released files is cached (the full checkpoint's online
    backbone is the backbone file's); trainval and test of different heads are named so."""
    import shutil

    import factories as fx

    from trex_hub import loader

    monkeypatch.setattr(loader, "_fetch_release", lambda *a, **k: pytest.fail("a download"))
    full = tmp_path / "full.pth"
    fx.write_full_checkpoint(full, num_layers=1, arch="resnet18", hidden=64, out=32,
                             memory_size=64)
    a, b = tmp_path / "feats_a", tmp_path / "feats_b"
    _extract_folder(r18_ckpt, image_folder, a)
    _extract_folder(full, image_folder, b)
    base = ["run", "--format", "features", "--dataset-name", "flowers", "--trials", 2,
            "--search", "grid", "--threads", 1, "--out", tmp_path / "res"]
    capsys.readouterr()
    assert run_cli(base + ["--data", a, "--models", r18_ckpt], capsys)[0] == 0
    code, _, err = run_cli(base + ["--data", b, "--models", full], capsys)
    assert code == 0, err
    code, out, err = run_cli(["report", tmp_path / "res"], capsys)
    assert code == 0 and "flowers" in out, err
    # only the full checkpoint of trex_repro cached: its online backbone is what --models loads
    cache = tmp_path / "cache"  # TREX_HUB_CACHE (conftest)
    cache.mkdir(exist_ok=True)
    shutil.copy(full, cache / "trex_2_checkpoint_full.pth")
    code, _, err = run_cli(base[:-1] + [tmp_path / "res2", "--data", b, "--models",
                                        "trex_repro"], capsys)
    assert code == 0 and "the same weights" in err, err
    meta = b / "test.npy.meta.json"
    meta.write_text(json.dumps(dict(json.loads(meta.read_text()), head="projector")))
    code, _, err = run_cli(base[:-1] + [tmp_path / "res3", "--data", b], capsys)
    assert code == 1 and "record different heads (--head backbone and --head projector)" in err
