"""How much of a trex-extract run survives a SIGKILL (issue 10's done-when check).

    python benchmarks/resume_after_kill.py [--images 200] [--arch resnet50] [--kill-at 0.5]

1. an uninterrupted run over a folder of ``--images`` generated photos (CPU, generated weights
   in the released layout, so no download): its wall time T;
2. the same run, SIGKILLed after ``--kill-at`` x T (wall time, not progress: whatever was not
   committed by then is lost), or with ``--kill-at-committed F`` once the committed inputs
   reach F x ``--images`` plus half the commit interval (the loss to expect on average);
3. ``--resume`` of the killed run: its wall time R.

Prints one JSON line and exits 1 if the files differ: T, R and R / T, each the time of a whole
``python -m trex_hub.cli.extract`` process (start-up and model loading included); the same for
the extraction alone (each run's own ``--debug`` timing: start-up, imports and model loading
excluded, which take seconds whatever the work left); the committed inputs at the kill and
those the resumed run kept; whether the resumed file is byte-identical to the uninterrupted
one. Results: docs/robustness.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _committed(parts: Path) -> int:
    total = 0
    for rows in parts.glob("part-*.jsonl"):
        start, stop = (int(x) for x in rows.stem.split("-")[1:3])
        total += stop - start
    return total


def measure(images: int = 200, arch: str = "resnet50", size: int = 160, kill_at: float = 0.5,
            extra: tuple = (), workdir: Path = None, kill_at_committed: float = 0.0,
            commit_every: float = 5.0) -> dict:
    import numpy as np
    from PIL import Image

    import factories as fx

    tmp = Path(workdir or tempfile.mkdtemp(prefix="trex-resume-"))
    data = tmp / "images"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(data / f"{i:04d}.jpg", quality=90)
    ckpt = tmp / f"{arch}.pth"
    fx.write_backbone_file(ckpt, arch=arch, seed=0)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "trex_hub.cli.extract", str(ckpt), str(data), "--no-progress",
            *extra]

    def timed(out: Path, *args: str) -> tuple:
        """(whole process s, extraction s, committed inputs kept) of a run to its end."""
        t = time.perf_counter()
        run = subprocess.run([*base, "-o", str(out), "--debug", *args], env=env, check=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        whole = time.perf_counter() - t
        extract = re.search(r"timing: .*, extract ([0-9.]+) s", run.stderr)
        kept = re.search(r"resuming, ([0-9]+) committed input", run.stderr)
        if extract is None:
            raise RuntimeError(f"no timing line from trex-extract:\n{run.stderr}")
        return whole, float(extract.group(1)), int(kept.group(1)) if kept else 0

    ref, out = tmp / "ref.npy", tmp / "killed.npy"
    full, full_extract, _ = timed(ref)
    proc = subprocess.Popen([*base, "-q", "-o", str(out)], env=env)
    parts = Path(str(out) + ".parts")
    if kill_at_committed:
        while proc.poll() is None and _committed(parts) < kill_at_committed * images:
            time.sleep(0.05)
        time.sleep(commit_every / 2)
    else:
        time.sleep(full * kill_at)
    committed = _committed(parts)
    if proc.poll() is not None:
        raise RuntimeError("the run finished before it could be killed; use more --images")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = max(committed, _committed(Path(str(out) + ".parts")))
    resumed, resumed_extract, kept = timed(out, "--resume")
    same = out.read_bytes() == ref.read_bytes() and \
        Path(str(out) + ".manifest.jsonl").read_bytes() == \
        Path(str(ref) + ".manifest.jsonl").read_bytes()
    if workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"images": images, "arch": arch, "size": size,
            "kill_at": f"{kill_at_committed} committed + {commit_every / 2} s"
            if kill_at_committed else f"{kill_at} x full time",
            "options": list(extra), "full_s": round(full, 2), "resume_s": round(resumed, 2),
            "ratio": round(resumed / full, 3), "full_extract_s": round(full_extract, 2),
            "resume_extract_s": round(resumed_extract, 2),
            "extract_ratio": round(resumed_extract / full_extract, 3),
            "committed_at_kill": committed, "kept_on_resume": kept,
            "identical": same, "cpus": os.cpu_count()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=160, help="side of the generated photos")
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of the full run's time")
    p.add_argument("--kill-at-committed", type=float, default=0.0,
                   help="kill once this fraction of the images is committed (+ half of "
                        "--commit-every), instead of --kill-at")
    p.add_argument("--commit-every", type=float, default=5.0, help="passed to trex-extract")
    p.add_argument("extra", nargs="*", help="more trex-extract options (after --)")
    args = p.parse_args(argv)
    result = measure(args.images, args.arch, args.size, args.kill_at,
                     ("--commit-every", str(args.commit_every), *args.extra),
                     kill_at_committed=args.kill_at_committed, commit_every=args.commit_every)
    print(json.dumps(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
