"""trex-train's throughput with short epochs, against the same program from another checkout.

Made for the change that lets the loader workers run on into the next epoch (one loader
iterator through every epoch, ``train.augment.EpochBatches``): before it, each epoch began with
idle workers and a first step that waited for a whole batch to be built. The baseline is the
code before that change, checked out apart:

    git worktree add /tmp/trex-before 2f7fabc
    python benchmarks/epoch_stream_bench.py --baseline /tmp/trex-before --rounds 5

Both sides run ``python -m trex_hub.cli.train`` (ResNet-18, ``--preset trex_star`` by default,
small photo-like JPEGs) as whole processes, alternating which goes first each round; the figure
is the steady-state images/s of epochs 2..E from each run's log.jsonl (train_bench's measure),
best and median over the rounds. A checkpoint is written after every epoch by default, as
trex-train does (``--checkpoint-every 0``: only at the end, as train_bench runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from extract_bench import FAILED_TAIL, cpu_model, run_timed  # noqa: E402
from train_bench import make_folder, steady  # noqa: E402


def run_side(tree: Path, data: Path, out: Path, opts: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "trex_hub.cli.train", "--preset", opts.preset, "--arch",
           opts.arch, "--data", str(data), "--output-dir", str(out), "--no-val", "--epochs",
           str(opts.epochs), "--batch-size", str(opts.batch_size), "--workers",
           str(opts.workers), "--global-size", str(opts.global_size), "--local-size",
           str(opts.local_size), "--aug", opts.aug, "--device", opts.device, "--print-freq",
           "1000000",
           "--checkpoint-every", str(opts.checkpoint_every or opts.epochs)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    res = run_timed(cmd, opts.run_timeout, env)
    if res.returncode != 0:
        raise SystemExit(f"{tree}: trex-train failed:\n{res.stderr[-FAILED_TAIL:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return steady({"epochs": [{"seconds": r["epoch_time_s"], "images_per_s": r["images_per_s"]}
                              for r in log]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="a checkout of the code to compare with")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=64, help="training photos (64: 4 batches)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preset", default="trex_star")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--global-size", type=int, default=112)
    p.add_argument("--local-size", type=int, default=48)
    p.add_argument("--aug", default="cpu", choices=("cpu", "gpu"),
                   help="cpu: PIL crops in the workers (the CPU default); gpu: the batched path")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="epochs between checkpoints (1, trex-train's default: the workers may "
                        "use the save's time; 0: only at the end, as train_bench does)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: on a GPU machine, "
                   "e.g. --arch resnet50 --global-size 224 --local-size 96 --batch-size 128 "
                   "--workers 15 --images 3600 --epochs 3 --aug gpu --checkpoint-every 0 "
                   "(train_bench's t-ReX* side)")
    p.add_argument("--run-timeout", type=float, default=600.0)
    opts = p.parse_args(argv)
    base = Path(opts.baseline).resolve()
    if not (base / "trex_hub" / "train" / "loop.py").is_file():
        p.error(f"--baseline {base}: not a trex_hub checkout")

    with tempfile.TemporaryDirectory(prefix="trex-epoch-stream-") as tmp:
        work = Path(tmp)
        data = make_folder(work / "data", opts.images)
        sides = {"baseline": base, "ours": REPO}
        rates = {name: [] for name in sides}
        for k in range(opts.rounds):
            order = list(sides) if k % 2 == 0 else list(sides)[::-1]
            for name in order:
                rate = run_side(sides[name], data, work / f"{name}-{k}", opts)
                rates[name].append(rate)
                print(f"round {k + 1} {name}: {rate:.2f} images/s", flush=True)

    import torch

    med = {name: statistics.median(v) for name, v in rates.items()}
    where = (torch.cuda.get_device_name(0) if opts.device == "cuda" and torch.cuda.is_available()
             else "cpu")
    print(f"\n{cpu_model()}, {os.cpu_count()} cores, {where}, torch {torch.__version__}; "
          f"{opts.arch} --preset {opts.preset} --aug {opts.aug}, {opts.images} photos "
          f"500x375, batch {opts.batch_size}, {opts.workers} workers, {opts.epochs} epochs "
          f"(2-{opts.epochs} timed), checkpoint every {opts.checkpoint_every or opts.epochs} "
          f"epoch(s), {opts.rounds} rounds; load average at the end "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    print("| side | images/s per round | best / median | vs baseline (medians) |")
    print("|---|---|---|---|")
    for name, v in rates.items():
        print(f"| {name} | {', '.join(f'{x:.2f}' for x in v)} | {max(v):.2f} / {med[name]:.2f} "
              f"| {med[name] / med['baseline']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
