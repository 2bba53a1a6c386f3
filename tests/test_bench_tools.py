"""The benchmarks' own machinery: the timed child runner and the GPU bench's rounds."""
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from extract_bench import run_timed  # noqa: E402
from extract_gpu_bench import combine, decoding, render, round_order, timing  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_hung_child_and_its_workers_are_reported_and_killed(tmp_path):
    """A child that hangs with a worker process holding its output pipes (a DataLoader worker,
    say) comes back at the timeout with both processes' stacks and states, and nothing of it
    survives. Before, the runner waited for the worker to close the pipes, for ever."""
    script = tmp_path / "hang.py"
    pid_file = tmp_path / "worker.pid"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c",
                                   "import time\\ndef stuck_worker():\\n    time.sleep(600)\\n"
                                   "stuck_worker()"])
        open({str(pid_file)!r}, "w").write(str(worker.pid))
        print("started", flush=True)
        def stuck_main():
            time.sleep(600)
        stuck_main()
    """))
    t = time.monotonic()
    res = run_timed([sys.executable, str(script)], timeout=3)
    took = time.monotonic() - t
    assert took < 30
    assert res.returncode == 124
    assert "started" in res.stdout
    assert res.stderr.rstrip().endswith("timed out after 3 s")
    assert "stuck_main" in res.stderr and "stuck_worker" in res.stderr  # both stacks
    listed = res.stderr.split("processes at the timeout")[1]
    worker = int(pid_file.read_text())
    assert str(worker) in listed and "hang.py" in listed
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def test_a_quick_child_keeps_its_output_and_exit_code():
    res = run_timed([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=60)
    assert (res.returncode, res.stdout.strip()) == (3, "out")


def test_gpu_bench_rounds_alternate_and_report_best_and_median():
    plan = ["a", "b", "c"]
    assert round_order(plan, 0) == plan and round_order(plan, 1) == ["c", "b", "a"]
    assert round_order(plan, 2) == plan
    r = combine([{"in_loop": 100.0, "whole_s": 10.0, "images": 5},
                 {"in_loop": 300.0, "whole_s": 8.0, "images": 5},
                 {"in_loop": 200.0, "whole_s": 12.0, "images": 5}])
    assert (r["in_loop"], r["in_loop_best"], r["whole_s"], r["whole_s_best"]) == \
        (200.0, 300.0, 10.0, 8.0)
    assert "extract" not in r and r["rounds"] == 3
    ours = combine([{"in_loop": 500.0, "extract": 400.0, "whole_s": 5.0, "images": 5}] * 3)
    env = {"device_kind": "CPU", "gpu": "dry run", "images": 5, "size": "1x1", "batch": 1,
           "cores": 2, "torch": "t", "torchvision": "tv", "load": "0", "rounds": 3}
    text = render(env, {"naive fp32": r, "trex-extract fp32": ours,
                        "trex-extract fp16": {"error": "boom"}}, {}, {})
    assert "| naive fp32 | 300 / 200 | - | 8.0 / 10.0 | 1.00x / 1.00x |" in text
    assert "| trex-extract fp32 | 500 / 500 | 400 / 400 | 5.0 / 5.0 | 2.50x / 2.00x |" in text
    assert "| trex-extract fp16 | failed: boom |" in text
    assert "3 rounds" in text
    mo = {"trex_hub fp32": 2900.0, "search_fp32_s": 2.31, "trex_hub fp32 + cudnn.benchmark":
          3500.0, "search_fp16_s": 1.5, "compile_s": 22.0}
    text = render(env, {}, {}, mo)
    assert "| trex_hub fp32 + cudnn.benchmark | 3,500 |" in text and "search_" not in text
    assert "(its autotuner's search) took 2.3 s (fp32) and 1.5 s (fp16)." in text
    assert "`torch.compile` took 22 s" in text


def test_gpu_bench_cuts_each_whole_process_into_phases():
    err = ("trex-extract: 5 images -> x.npy [5 x 8], 0 failed, 2.0 s\n"
           "trex-extract: timing: start-up (interpreter, torch) 2.50 s, imports 1.00 s, inputs "
           "0.10 s, model 0.30 s, waiting for CUDA 0.10 s, extract 2.00 s (batch loop 1.50 s), "
           "main 3.60 s\n")
    got = timing(err, wall=6.5)
    assert got == pytest.approx({"imports_s": 3.5, "setup_s": 0.5, "oneoff_s": 0.5,
                                 "loop_s": 1.5, "rest_s": 0.4})
    assert timing("no timing line", 1.0) == {}
    ours = combine([dict(got, in_loop=10.0, extract=8.0, whole_s=6.5, images=5)] * 2)
    naive = combine([{"in_loop": 5.0, "whole_s": 9.0, "images": 5, "imports_s": 4.0,
                      "setup_s": 1.0, "loop_s": 2.0, "rest_s": 2.0}])
    env = {"device_kind": "CPU", "gpu": "dry run", "images": 5, "size": "1x1", "batch": 1,
           "cores": 2, "torch": "t", "torchvision": "tv", "load": "0", "rounds": 2}
    text = render(env, {"naive fp32": naive, "trex-extract fp32": ours}, {}, {})
    assert "| naive fp32 | 4.0 | 1.0 | - | 2.0 | 2.0 | 9.0 |" in text
    assert "| trex-extract fp32 | 3.5 | 0.5 | 0.5 | 1.5 | 0.4 | 6.5 |" in text


def debug_lines(tmp_path, capsys, images: int, *extra: str) -> str:
    """stderr of a real ``trex-extract --debug`` run on ``images`` small JPEGs, on the CPU."""
    import factories as fx
    from PIL import Image

    from trex_hub.cli.extract import main

    fx.write_backbone_file(tmp_path / "r18.pth", arch="resnet18", seed=1)
    (tmp_path / "imgs").mkdir()
    for i in range(images):
        Image.new("RGB", (40, 30), (40 * i, 90, 120)).save(tmp_path / "imgs" / f"{i}.jpg")
    assert main([str(tmp_path / "r18.pth"), str(tmp_path / "imgs"), "-o",
                 str(tmp_path / "f.npy"), "--no-progress", "--debug", "--device", "cpu",
                 *extra]) == 0
    return capsys.readouterr().err


def test_gpu_bench_reads_the_timing_line_trex_extract_really_prints(tmp_path, capsys):
    # the bench's parser and the program's line are one format: a change to either fails here,
    # not silently in a GPU session (timing() would return {} and the phases table go empty)
    got = timing(debug_lines(tmp_path, capsys, 2), wall=1000.0)
    assert set(got) == {"imports_s", "setup_s", "oneoff_s", "loop_s", "rest_s"}
    assert all(v >= 0 for v in got.values()) and got["loop_s"] > 0


def test_gpu_bench_reads_the_hybrid_lane_split_trex_extract_really_prints(tmp_path, capsys):
    got = decoding(debug_lines(tmp_path, capsys, 6, "--decode", "hybrid", "-j", "3", "-b", "2"))
    assert got["decoding"] == "hybrid" and set(got["lanes"]) <= {"cpu", "gpu"}
    assert sum(got["lanes"].values()) == 3
    assert decoding("trex-extract: decoding: tensor\n") == {"decoding": "tensor"}
    r = combine([dict(in_loop=9.0, whole_s=2.0, images=6, **got)] * 2)
    env = {"device_kind": "CPU", "gpu": "dry run", "images": 6, "size": "1x1", "batch": 2,
           "cores": 2, "torch": "t", "torchvision": "tv", "load": "0", "rounds": 2}
    text = render(env, {"trex-extract fp32 --decode hybrid": r}, {}, {})
    split = ", ".join(f"{k} {v}" for k, v in sorted(got["lanes"].items()))
    assert f"trex-extract fp32 --decode hybrid: {split}; {split}." in text


def test_train_bench_tries_a_hung_side_once_more_and_reports_a_second_hang(tmp_path,
                                                                          monkeypatch, capsys):
    """Both hangs on the H100 hit the first trex-train child of a call: a side that runs past
    its limit is run once more (--retry-hung), its stacks logged; a second hang fails it."""
    import train_bench as tb

    calls = []
    epoch = {"seconds": 1.0, "images_per_s": 50.0}

    def run_child(side, opts, work):
        calls.append(side)
        if side == "trex:baseline" or (side == "trex:trex_star" and
                                       calls.count("trex:trex_star") == 1):
            raise tb.Hung(f"{side} failed:\nstacks...\ntimed out after 75 s")
        return {"epochs": [epoch, epoch]}

    monkeypatch.setattr(tb, "run_child", run_child)
    monkeypatch.setattr(tb, "make_folder", lambda root, n: root)
    out = tmp_path / "r.json"
    rc = tb.main(["--device", "cpu", "--presets", "trex_star,baseline", "--rounds", "1",
                  "--work-dir", str(tmp_path), "--json", str(out)])
    err = capsys.readouterr().err
    assert calls == ["naive", "trex:trex_star", "trex:trex_star", "trex:baseline",
                     "trex:baseline"]
    assert "trex:trex_star: HUNG, trying once more" in err
    assert rc == 1  # the baseline hung twice: reported as failed, in its row
    import json

    got = json.loads(out.read_text())
    assert got["results"]["trex:trex_star"] == [50.0] and got["results"]["trex:baseline"] == []
    assert "timed out after 75 s" in got["errors"]["trex:baseline"]


def test_augment_bench_compares_both_configurations_on_the_same_crops(tmp_path, capsys):
    """The augmentation benchmark runs both configurations of ``BatchAugment`` (and the step),
    finds them bit-identical, counts fewer operations and bytes for CUDA's, and puts the
    configuration it changed for the run back."""
    import augment_bench
    from trex_hub.train import tensor_ops as T

    before = (dict(T.CROP_BYTES), T.hue)
    out = tmp_path / "aug.json"
    assert augment_bench.main(["--device", "cpu", "--batch", "3", "--rounds", "1",
                               "--global-size", "32", "--local-size", "16", "--local-crops",
                               "2", "--step", "--breakdown", "--work-dir", str(tmp_path),
                               "--json", str(out)]) == 0
    assert (dict(T.CROP_BYTES), T.hue) == before
    assert all(getattr(T, name).__module__ == T.__name__ for name in augment_bench.STAGES)
    text = capsys.readouterr().out
    assert "same crops: yes, bit for bit" in text and "augmentation's share" in text
    result = json.loads(out.read_text())
    base, fused = augment_bench.SIDES
    assert result["same"] and result["ops"][fused] < result["ops"][base]
    assert result["bytes"][fused] < result["bytes"][base]
    # the stages share out the configuration's whole count, and the crops and the colour
    # operations each did some work
    parts = result["breakdown"]
    assert sum(p["ops"] for p in parts.values()) == result["ops"][fused]
    assert sum(p["bytes"] for p in parts.values()) == result["bytes"][fused]
    for name in ("resized_crops", "brightness", "contrast", "saturation", "hue",
                 "normalize", augment_bench.OWN):
        assert parts[name]["ops"] > 0 and parts[name]["ms"] >= 0, name
    assert f"| {augment_bench.OWN} |" in text
    assert len(result["step_alone_s"]) == 1 and len(result["with_step_s"][fused]) == 1


def test_train_bench_preset_options():
    import train_bench as tb

    assert tb.split_preset("trex_star") == ("trex_star", [])
    assert tb.split_preset("trex_star+compile+ahead") == ("trex_star",
                                                          ["--compile", "--aug-ahead"])
    assert tb.split_preset("trex_star+fork") == ("trex_star", ["--loader-start", "fork"])
    with pytest.raises(SystemExit, match=r"\+compile, \+ahead, \+fork, \+spawn"):
        tb.split_preset("trex_star+fast")


def test_read_stage_bench_runs_both_readers_through_the_real_pipeline(tmp_path, capsys):
    """The GPU plan's profile stage runs this script; its per-file stand-in must keep the
    signature of the reader it replaces (it fell behind once and crashed the stage)."""
    import read_stage_bench

    assert read_stage_bench.main(["--images", "8", "--rounds", "1", "--threads", "2",
                                  "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| per-file |" in out and "| chunked |" in out and "pipeline with a free GPU" in out
