"""Start-up and exit costs of the programs, the part of a whole-process time outside the loop.

Three pairs, each side alternated with the other round by round (the first side changes every
round), best and median reported:

* ``trex-extract --help`` as a whole process. Baseline: the same, after importing every public
  name of the package (what ``import trex_hub`` did before the façade became lazy: torch,
  torchvision and the engine) and ending with Python's own exit; ours: the program as it is.
* ``trex-extract`` on a few generated photos (CPU). Baseline: the program with Python's own exit
  (``TREX_HUB_CLEAN_EXIT=1``), which frees every module before the process ends; ours:
  ``exit_now`` (the default), which runs the exit handlers and skips that teardown.
* Building the model from a loaded ResNet-50 checkpoint, in this process. Baseline: the
  network built as usual (random initialisation) and the checkpoint copied in; ours:
  ``build_model`` (built on the meta device, then filled).

    python benchmarks/startup_bench.py --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests"), str(REPO)]

from extract_bench import FAILED_TAIL, bench_workdir, cpu_model, run_timed  # noqa: E402
from extract_gpu_bench import make_many_photos  # noqa: E402


def whole_process(args, env_extra: dict, timeout: float) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO),
                                                       os.environ.get("PYTHONPATH", "")]),
               **env_extra)
    t = time.perf_counter()
    res = run_timed([sys.executable, *args], timeout, env)
    secs = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr[-FAILED_TAIL:]}")
    return secs


def model_build(ckpt_path: Path, side: str) -> float:
    import torch

    from trex_hub.checkpoint import build_model, load_into, read_checkpoint
    from trex_hub.model import TReX

    ckpt = read_checkpoint(ckpt_path)  # read outside the timing: both sides start from it
    t = time.perf_counter()
    if side == "baseline":
        model = TReX.from_config(dict(ckpt.config))
        load_into(model, ckpt.state_dict, ckpt.source)
    else:
        model = build_model(ckpt)
    secs = time.perf_counter() - t
    assert isinstance(next(model.parameters()), torch.Tensor)
    return secs


def summary(times: dict) -> str:
    lines = ["| program | baseline best / median (s) | ours best / median (s) | saved, medians "
             "(s) | baseline / ours, medians |", "|---|---|---|---|---|"]
    for name, sides in times.items():
        b, o = sides["baseline"], sides["ours"]
        mb, mo = statistics.median(b), statistics.median(o)
        lines.append(f"| {name} | {min(b):.2f} / {mb:.2f} | {min(o):.2f} / {mo:.2f} | "
                     f"{mb - mo:.2f} | {mb / mo:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=32, help="photos for trex-extract (32)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--run-timeout", type=float, default=300.0)
    p.add_argument("--md", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)

    import torch

    work, ckpt = bench_workdir(args.work_dir, "trex-startup-")
    photos = work / f"photos-{args.images}"
    make_many_photos(photos, args.images, jobs=2)
    out = work / "features.npy"
    extract = ["-m", "trex_hub.cli.extract", str(ckpt), str(photos), "-o", str(out), "--overwrite",
               "--no-progress", "-q", "--device", "cpu", "-b", "16"]
    sides = {"baseline": {"TREX_HUB_CLEAN_EXIT": "1"}, "ours": {"TREX_HUB_CLEAN_EXIT": "0"}}
    eager = ("import trex_hub\nfor name in trex_hub.__all__: getattr(trex_hub, name)\n"
             "from trex_hub.cli.extract import main\nraise SystemExit(main(['--help']))")
    helps = {"baseline": ["-c", eager], "ours": ["-m", "trex_hub.cli.extract", "--help"]}
    jobs = {"`trex-extract --help`": lambda side: whole_process(helps[side], {},
                                                                args.run_timeout),
            f"`trex-extract`, {args.images} photos, CPU": lambda side: whole_process(
                extract, sides[side], args.run_timeout),
            "model build (in process)": lambda side: model_build(ckpt, side)}
    times = {name: {"baseline": [], "ours": []} for name in jobs}
    for k in range(args.rounds):
        order = ("baseline", "ours") if k % 2 == 0 else ("ours", "baseline")
        for name, job in jobs.items():
            for side in order:
                secs = job(side)
                times[name][side].append(secs)
                print(f"round {k + 1} {name} {side}: {secs:.2f} s", flush=True)
    head = (f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
            f"{args.rounds} rounds, load average at the end "
            f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}.\n\n")
    table = head + summary(times)
    print(table)
    if args.md:
        Path(args.md).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
