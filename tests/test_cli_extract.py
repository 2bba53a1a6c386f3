"""`trex-extract`: folders and lists, manifest, bad files, --strict, formats, resume after SIGKILL."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import factories as fx
import numpy as np
import pytest
import torch
from PIL import Image

import trex_hub
from trex_hub.cli.extract import main
from trex_hub import read_features, run_state
from trex_hub.imagefiles import collect_inputs
from test_extract import make_bad_files, photos

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    fx.write_backbone_file(path, arch="resnet18", seed=9)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """cats/ and dogs/ of tiny photos, plus one bad file of each kind under bad/."""
    root = tmp_path_factory.mktemp("data") / "imgs"
    for c, cls in enumerate(("dogs", "cats")):
        (root / cls).mkdir(parents=True)
        for i, a in enumerate(photos(3, (36, 28), seed=c)):
            Image.fromarray(a).save(root / cls / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "bad").mkdir()
    expected = make_bad_files(root / "bad")
    (root / "cats" / "readme.txt").write_text("not picked up: not an image extension")
    return root, expected


def run(*args):
    return main([str(a) for a in args] + ["--no-progress"])


def test_folder_manifest_labels_and_bad_files(ckpt, folder, tmp_path, capsys):
    root, expected = folder
    out = tmp_path / "feats.npy"
    assert run(ckpt, root, "-o", out, "--labels", "folder", "-b", "2") == 0
    err = capsys.readouterr().err
    assert "5 failed" in err and "11 images" in err
    assert re.search(r", [\d.]+ img/s \([\d.]+ img/s in the batch loop\)", err), err
    feats, rows = read_features(out)
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths) and len(rows) == 11
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["index"] for r in ok] == list(range(6)) and feats.shape == (6, 512)
    assert {r["label"] for r in ok} == {"cats", "dogs"}
    failed = {Path(r["path"]).name: r for r in rows if r["status"] == "failed"}
    assert set(failed) == set(expected)
    for name, words in expected.items():
        assert failed[name]["index"] is None and words in failed[name]["error"]
        assert failed[name]["label"] == "bad"
    model = trex_hub.load(ckpt)
    want = model.extract([root / r["path"] for r in ok]).numpy()
    assert np.abs(feats - want).max() / np.abs(want).max() < 1e-5
    meta = json.loads((tmp_path / "feats.npy.meta.json").read_text())
    assert (meta["ok"], meta["failed"], meta["dim"], meta["head"]) == (6, 5, 512, "backbone")


def test_debug_says_where_the_time_went(ckpt, folder, tmp_path, capsys):
    root, _ = folder
    assert run(ckpt, root / "cats", "-o", tmp_path / "f.npy") == 0
    assert "timing:" not in capsys.readouterr().err
    assert run(ckpt, root / "cats", "-o", tmp_path / "g.npy", "--debug") == 0
    line = [x for x in capsys.readouterr().err.splitlines() if "timing:" in x]
    assert len(line) == 1, line
    got = re.fullmatch(r"trex-extract: timing: start-up \(interpreter, torch\) ([\d.]+) s, "
                       r"imports ([\d.]+) s, inputs ([\d.]+) s, model ([\d.]+) s, waiting for "
                       r"CUDA ([\d.]+) s, extract ([\d.]+) s \(batch loop ([\d.]+) s\), main "
                       r"([\d.]+) s", line[0])
    assert got, line[0]
    start, imports, inputs, model, cuda, extract, loop, whole = map(float, got.groups())
    assert start > 0  # this process has been running since pytest started
    assert loop <= extract and imports + inputs + model + cuda + extract <= whole + 0.03


def _start_cuda_for(*argv):
    from trex_hub.cli.extract import _start_cuda, build_parser

    return _start_cuda(build_parser().parse_args(["m", "x", "-o", "o.npy", *argv]), 1, 0)


def test_cuda_starts_in_a_thread_only_when_the_run_may_use_it():
    assert _start_cuda_for("--device", "cpu") is None
    assert _start_cuda_for("--engine", "onnxruntime") is None
    thread = _start_cuda_for()  # --device auto: a thread, which finds no CUDA here and stops
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert not thread.is_alive()
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_start_thread_leaves_cuda_ready():
    thread = _start_cuda_for("--device", "cuda")
    thread.join(timeout=120)
    assert not thread.is_alive() and torch.cuda.is_initialized()


def test_strict_fails_on_first_bad_file(ckpt, folder, tmp_path, capsys):
    root, _ = folder
    assert run(ckpt, root, "-o", tmp_path / "f.npy", "--strict") == 1
    assert "--strict" in capsys.readouterr().err
    assert not (tmp_path / "f.npy").exists()


def test_list_order_formats_and_existing_outputs(ckpt, folder, tmp_path, capsys):
    root, _ = folder
    lst = tmp_path / "list.txt"
    names = ["cats/2.png", "dogs/0.png", "cats/1.jpg"]
    lst.write_text("".join(f"{root / n}\tlabel{i}\n" for i, n in enumerate(names)))
    out = tmp_path / "f.safetensors"
    assert run(ckpt, lst, "-o", out, "--normalize") == 0
    feats, rows = read_features(out)
    assert [r["label"] for r in rows] == ["label0", "label1", "label2"]
    assert [Path(r["path"]).relative_to(root).as_posix() for r in rows] == names
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    # an existing output is not replaced silently; --resume of a finished run does nothing
    # when it is the same run, and says what differs otherwise
    assert run(ckpt, lst, "-o", out) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run(ckpt, lst, "-o", out, "--resume", "--normalize") == 0
    assert "already complete" in capsys.readouterr().err
    assert run(ckpt, lst, "-o", out, "--resume") == 1
    assert "--normalize (was True, now False)" in capsys.readouterr().err
    assert run(ckpt, lst, "-o", out, "--overwrite", "--head", "backbone") == 0
    pt = tmp_path / "f.pt"
    assert run(ckpt, lst, "-o", pt) == 0
    obj = torch.load(pt, weights_only=True)
    assert obj["features"].shape == (3, 512) and obj["meta"]["ok"] == 3


def test_usage_errors(ckpt, folder, tmp_path, capsys):
    root, _ = folder
    assert run(ckpt, root, "-o", tmp_path / "f.csv") == 2
    assert run(ckpt, tmp_path / "missing", "-o", tmp_path / "f.npy") == 2
    assert run("no_such_model", root, "-o", tmp_path / "f.npy") == 1
    assert run(ckpt, root, "-o", tmp_path / "f.npy", "--head", "projector") == 1
    err = capsys.readouterr().err
    assert "must end with" in err and "neither a file nor a folder" in err
    assert "projector" in err


def test_resume_refuses_a_changed_run(ckpt, folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "f.npy"
    assert run(ckpt, root / "cats", "-o", out, "--keep-parts", "-b", "2") == 0
    assert (tmp_path / "f.npy.parts").is_dir()
    assert run(ckpt, root / "cats", "-o", out, "--preprocess", "imagenet") == 1
    assert run(ckpt, root / "cats", "-o", out, "--resume", "--preprocess", "imagenet") == 1
    assert "the run changed (--preprocess (was 'transfer', now 'imagenet'))" in \
        capsys.readouterr().err
    assert run(ckpt, root / "cats", "-o", out, "--resume") == 0  # adopts the run's -b 2
    assert not (tmp_path / "f.npy.parts").exists()


def test_preprocess_model_follows_the_folder_config_and_resume_checks_it(ckpt, folder,
                                                                          tmp_path, capsys):
    """--preprocess model extracts with the exported folder's own geometry and mean / std; a
    --resume after the folder's config.json changed either is refused, naming what changed
    (the weights are the same, so only the recorded preprocessing can tell)."""
    root, _ = folder
    model = trex_hub.load(ckpt)
    model.set_preprocess(trex_hub.PreprocessConfig(resize=48, crop=40, interpolation="bilinear",
                                                   mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    export = trex_hub.save_pretrained(model, tmp_path / "exported")
    out = tmp_path / "f.npy"
    assert run(export, root / "cats", "-o", out, "--preprocess", "model", "-b", "2") == 0
    files = sorted(p for p in (root / "cats").iterdir() if p.suffix != ".txt")
    ref = model.extract(files, preprocess="model", batch_size=2)
    assert np.allclose(np.load(out), ref.numpy(), rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp_path / "f.npy.meta.json").read_text())
    assert meta["preprocess"] == {"resize": 48, "crop": 40, "interpolation": "bilinear"}
    config = json.loads((export / "config.json").read_text())
    for change in ({"crop": 32}, {"mean": [0.485, 0.456, 0.406]}):
        edited = dict(config, preprocess=dict(config["preprocess"], **change))
        (export / "config.json").write_text(json.dumps(edited))
        capsys.readouterr()
        assert run(export, root / "cats", "-o", out, "--preprocess", "model", "--resume",
                   "--keep-parts", "-b", "2") == 1
        err = capsys.readouterr().err
        word = "--preprocess" if "crop" in change else "the mean / std"
        assert "made by a different run" in err and word in err, err


def _run_main_threads1(*args):
    before = torch.get_num_threads()
    try:
        return run(*args, "--threads", "1")
    finally:
        torch.set_num_threads(before)


def _started_run(ckpt, data, out, opts, committed, **popen):
    """trex-extract in a process of its own, returned once ``committed`` chunks of ``out`` are
    on disk (or it ended, or 90 s passed): the moment to interrupt it. The child gets SIGINT's
    default disposition: a test run started in the background of a non-interactive shell
    (``make test &``) inherits SIGINT ignored, and Python then installs no Ctrl-C handler."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "trex_hub.cli.extract", str(ckpt), str(data),
                             "-o", str(out), *opts], env=env, cwd=out.parent,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **popen)
    parts = out.parent / (out.name + ".parts")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(parts.glob("part-*.jsonl"))) >= committed:
            break
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("decode,suffix,workers", [("gpu", ".jpg", "1"), ("hybrid", ".png", "3")])
def test_ctrl_c_stops_the_decoding_threads_and_resume_completes(ckpt, tmp_path, decode, suffix,
                                                                workers):
    """A real SIGINT mid-run, with --decode gpu (batched decode_jpeg + resize in a thread of
    their own; on the CPU here) and with --decode hybrid (both lanes, worker processes too):
    exit 130 with the one-line hint, no traceback, no hung thread, no worker process left;
    --resume then gives the file a straight run gives. The hybrid run reads PNG files, which
    both of its lanes decode with PIL, so that it repeats bit for bit."""
    data = tmp_path / "images"
    data.mkdir()
    for i, a in enumerate(photos(96, (64, 48), seed=6)):
        Image.fromarray(a).save(data / f"{i:03d}{suffix}", **({"quality": 90}
                                                               if suffix == ".jpg" else {}))
    out = tmp_path / "stopped.npy"
    opts = ["-b", "4", "--chunk-size", "8", "-j", workers, "--decode", decode, "--no-progress"]
    proc = _started_run(ckpt, data, out, [*opts, "--threads", "1"], committed=2,
                        stderr=subprocess.PIPE, text=True)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    assert not out.exists()
    if shutil.which("pgrep"):  # forked workers carry the parent's command line
        leftover = subprocess.run(["pgrep", "-f", f"trex_hub.cli.extract.*{out.name}"],
                                  capture_output=True, text=True).stdout.split()
        assert leftover == []
    assert _run_main_threads1(ckpt, data, "-o", out, *opts, "--resume") == 0
    ref = tmp_path / "ref.npy"
    assert _run_main_threads1(ckpt, data, "-o", ref, *opts) == 0
    assert out.read_bytes() == ref.read_bytes()


def test_resume_after_sigkill_gives_identical_file(ckpt, tmp_path):
    data = tmp_path / "many"
    data.mkdir()
    for i, a in enumerate(photos(96, (24, 24), seed=5)):
        Image.fromarray(a).save(data / f"{i:03d}.png")
    (data / "050.png").write_bytes(b"")  # a failure inside a chunk that gets resumed
    out = tmp_path / "killed.npy"
    parts = tmp_path / "killed.npy.parts"
    opts = ["-b", "4", "--chunk-size", "8", "-j", "1", "--threads", "1", "--no-progress", "-q"]
    proc = _started_run(ckpt, data, out, opts, committed=3)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    committed = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
                 for p in parts.glob("part-*") if not p.name.endswith(".tmp")}
    assert 3 <= len([n for n in committed if n.endswith(".jsonl")]) < 12

    assert _run_main_threads1(ckpt, data, "-o", out, *opts[:6], "--resume",
                              "--keep-parts") == 0
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("part-*")}
    for name, stamp in committed.items():
        if name.endswith(".jsonl"):  # committed chunks were not recomputed
            assert kept[name] == stamp and kept[name[:-6] + ".npy"] == committed[name[:-6] + ".npy"]
    ref = tmp_path / "ref.npy"
    assert _run_main_threads1(ckpt, data, "-o", ref, *opts[:6]) == 0
    assert out.read_bytes() == ref.read_bytes()
    assert (tmp_path / "killed.npy.manifest.jsonl").read_text() == \
        (tmp_path / "ref.npy.manifest.jsonl").read_text()
    feats, rows = read_features(out)
    assert feats.shape == (95, 512) and rows[50]["status"] == "failed"



# --------------------------------------------------------------------------------------------
# bad flags and outputs: usage errors before any work, no parts folder left behind
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,words", [
    ("--device", "foo", "--device foo: use auto, cpu, cuda or cuda:N"),
    ("--device", "meta", "--device meta: use auto, cpu, cuda or cuda:N"),
    ("--device", "cuda:x", "--device cuda:x: use auto, cpu, cuda or cuda:N"),
    ("--threads", "-2", "--threads must be >= 1"),
    ("--threads", "0", "--threads must be >= 1"),
])
def test_bad_device_or_threads_is_a_usage_error_naming_the_flag(ckpt, folder, tmp_path, capsys,
                                                                flag, value, words):
    root, _ = folder
    assert run(ckpt, root / "cats", "-o", tmp_path / "o" / "f.npy", flag, value) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "unexpected" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_cuda_device_this_machine_lacks_is_a_usage_error(ckpt, folder, tmp_path, capsys,
                                                           monkeypatch):
    root, _ = folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert run(ckpt, root / "cats", "-o", tmp_path / "f.npy", "--device", "cuda:0") == 2
    assert "--device cuda:0: CUDA is not available here" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert run(ckpt, root / "cats", "-o", tmp_path / "f.npy", "--device", "cuda:2") == 2
    assert "--device cuda:2: this machine has 2 CUDA devices (cuda:0 to cuda:1)" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_a_folder_is_a_usage_error(ckpt, folder, tmp_path, capsys):
    """Before: "exists; pass --overwrite", and with --overwrite a failed merge after all the
    work, naming a temporary file, with the parts folder left behind."""
    root, _ = folder
    out = tmp_path / "f.npy"
    out.mkdir()
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert run(ckpt, root / "cats", "-o", out, *extra) == 2
        err = capsys.readouterr().err
        assert f"-o {out} is a folder; give a file name" in err, err
    (tmp_path / "plain").write_text("a file where a folder is wanted")
    assert run(ckpt, root / "cats", "-o", tmp_path / "plain" / "f.npy") == 2
    assert f"{tmp_path / 'plain'} is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "plain"]
    assert list(out.iterdir()) == []


def test_a_run_that_fails_before_any_commit_leaves_no_parts_folder(ckpt, folder, tmp_path,
                                                                    capsys, monkeypatch):
    """Nothing was computed, so nothing is kept: the next plain run starts afresh instead of
    being refused with "holds an unfinished run"."""
    from trex_hub import extract_run

    root, _ = folder
    out = tmp_path / "f.npy"

    def gone(*args, **kwargs):
        raise RuntimeError("the device is gone")

    with monkeypatch.context() as m:
        m.setattr(extract_run, "prepare", gone)
        assert run(ckpt, root / "cats", "-o", out) == 1
    assert "the device is gone" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert run(ckpt, root / "cats", "-o", out) == 0
    assert read_features(out)[0].shape == (3, 512)


# --------------------------------------------------------------------------------------------
# list files
# --------------------------------------------------------------------------------------------


def test_list_paths_are_relative_to_the_list_and_a_missing_one_names_the_path_tried(
        ckpt, folder, tmp_path, capsys, monkeypatch):
    root, _ = folder
    shutil.copytree(root / "cats", tmp_path / "cats")
    (tmp_path / "lists").mkdir()
    # the first line is relative to the working folder (a common mistake), the second to the list
    (tmp_path / "lists" / "train.txt").write_text("cats/0.png\n../cats/0.png\n")
    monkeypatch.chdir(tmp_path)
    assert run(ckpt, "lists/train.txt", "-o", "f.npy") == 0
    err = capsys.readouterr().err
    feats, rows = read_features(tmp_path / "f.npy")
    assert [r["status"] for r in rows] == ["failed", "ok"] and feats.shape == (1, 512)
    why = ("no such file: lists/cats/0.png (relative paths in a list file are resolved against "
           "the list file's folder)")
    assert rows[0]["error"] == why
    assert f"skipped cats/0.png: {why}" in err


def test_resume_accepts_the_same_inputs_spelled_another_way(ckpt, folder, tmp_path, capsys,
                                                            monkeypatch):
    """A folder or a list named by an absolute path, then by a relative one (or through
    ``..``), is the same input list: --resume continues the run instead of refusing it. The
    manifest names the files the same way either way (relative to the folder or as listed)."""
    root, _ = folder
    own = tmp_path / "own"
    shutil.copytree(root / "cats", own)
    (own / "list.txt").write_text("1.jpg\n0.png\n")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "f.npy"
    assert run(ckpt, own, "-o", out, "--keep-parts", "-b", "2") == 0
    first = read_features(out)
    assert run(ckpt, "own", "-o", out, "--resume") == 0  # unfinished: adopted
    assert not (tmp_path / "f.npy.parts").exists()
    assert run(ckpt, "other/../own/", "-o", out, "--resume") == 0  # complete: nothing to do
    assert "already complete; nothing to do" in capsys.readouterr().err
    (tmp_path / "link").symlink_to(own)  # a link to the folder, and a linked working folder
    assert run(ckpt, "link", "-o", out, "--resume") == 0
    (tmp_path / "here").symlink_to(tmp_path)
    monkeypatch.chdir(tmp_path / "here")
    assert run(ckpt, tmp_path / "here" / "own", "-o", out, "--resume") == 0
    monkeypatch.chdir(tmp_path)
    assert "already complete; nothing to do" in capsys.readouterr().err
    again = read_features(out)
    assert np.array_equal(again[0], first[0]) and again[1] == first[1]
    listed = tmp_path / "g.npy"
    assert run(ckpt, own / "list.txt", "-o", listed, "--keep-parts") == 0
    assert run(ckpt, "own/list.txt", "-o", listed, "--resume") == 0
    # parts of an older version, whose digest hashed the paths as spelled, still resume
    assert run(ckpt, "own", "-o", out, "--overwrite", "--keep-parts") == 0
    state = tmp_path / "f.npy.parts" / "state.json"
    fp = json.loads(state.read_text())
    fp["inputs"] = run_state._entries_digest(collect_inputs(["own"]), spelled=True)
    state.write_text(json.dumps(fp))
    assert run(ckpt, "own", "-o", out, "--resume") == 0
    assert [r["path"] for r in read_features(listed)[1]] == ["1.jpg", "0.png"]
    # another folder holding files of the same names is another input list
    shutil.copytree(own, tmp_path / "other" / "own")
    assert run(ckpt, "other/own", "-o", out, "--resume") == 1
    assert "the input list differs" in capsys.readouterr().err


def test_a_run_where_every_input_failed_exits_1(ckpt, folder, tmp_path, capsys):
    """An output with no features is not a finished job: when every input failed the run
    says so in one line and exits 1 (the files stay, with each reason in the manifest); one
    readable input, or no inputs at all (a warning), still exit 0."""
    root, _ = folder
    lst = tmp_path / "list.txt"
    lst.write_text("nope1.jpg\nnope2.jpg\n")
    out = tmp_path / "f.npy"
    assert run(ckpt, lst, "-o", out) == 1
    err = capsys.readouterr().err
    assert "error: none of the 2 inputs could be read, so" in err and "Traceback" not in err
    assert str(tmp_path / "f.npy.manifest.jsonl") in err
    feats, rows = read_features(out)
    assert feats.shape[0] == 0 and [r["status"] for r in rows] == ["failed", "failed"]
    assert run(ckpt, lst, "-o", out, "--resume") == 1  # a retry does not make it a success
    err = capsys.readouterr().err
    assert "already complete" in err and "none of the 2 inputs could be read" in err
    assert run(ckpt, root / "bad", "-o", tmp_path / "bad.npy", "-q") == 1
    err = capsys.readouterr().err  # -q shows no reasons, so the line does not point above
    assert err.count("\n") == 1 and "none of the 5 inputs could be read" in err
    assert "the reasons are in " in err and "above" not in err
    lst.write_text(f"nope1.jpg\n{root / 'cats' / '1.jpg'}\n")
    assert run(ckpt, lst, "-o", tmp_path / "g.npy") == 0
    (tmp_path / "empty").mkdir()
    assert run(ckpt, tmp_path / "empty", "-o", tmp_path / "h.npy") == 0
    assert "warning: no images found in the inputs" in capsys.readouterr().err
