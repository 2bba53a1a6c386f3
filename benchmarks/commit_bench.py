"""Committing segments on the batch loop's thread or behind it, with a stand-in GPU.

    python benchmarks/commit_bench.py                  # about a minute on 2 cores
    python benchmarks/commit_bench.py --images 10000 --gpu-rate 3800 --rounds 5

trex-extract commits a segment (features ``.npy`` + manifest rows, each written atomically with
fsyncs) every ``--chunk-size`` inputs. On a GPU the loop's thread only launches batches and
collects features, so while it writes a segment the GPU runs dry. Two sides, alternating, each
running the real ``extract.run_batches`` over ``extract_run._Segment`` into a real parts folder:

* ``inline`` (the baseline, shipped until this benchmark): each segment written on the loop's
  thread, as ``write_segment`` was called before;
* ``behind`` (shipped): segments handed to ``fileio.WriteBehind``, written by its thread.

The stand-in GPU is a thread that takes launched batches in order and spends
``batch / --gpu-rate`` seconds on each (asleep: a GPU costs the host no CPU), then hands back a
fresh ``[batch, 2048]`` float32 tensor, as ``InferenceModel.launch`` does; decoding is a
ready batch. Reported: images/s of the loop (the figure that ``trex-extract`` prints as "in the
batch loop"), best-of and median over ``--rounds``, and its ratio to the stand-in GPU's rate.
"""
from __future__ import annotations

import argparse
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trex_hub.decoding import Batch  # noqa: E402
from trex_hub.extract import run_batches  # noqa: E402
from trex_hub.extract_run import _Segment  # noqa: E402
from trex_hub.fileio import WriteBehind  # noqa: E402
from trex_hub.imagefiles import Entry  # noqa: E402

DIM = 2048


class StandInGPU:
    """``launch(batch)`` -> an object whose ``result()`` waits for this batch's turn on a device
    thread that spends ``len(batch) / rate`` seconds per batch."""

    def __init__(self, rate: float):
        self.rate = rate
        self.jobs: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            n, done, out = self.jobs.get()
            time.sleep(n / self.rate)
            out.append(torch.empty(n, DIM))  # fresh, as launch() allocates; no CPU work
            done.set()

    def launch(self, data: torch.Tensor):
        done, out = threading.Event(), []
        self.jobs.put((data.shape[0], done, out))

        class Pending:
            def result(self):
                done.wait()
                return out[0]
        return Pending()


class Inline:
    """The baseline writer: each job runs at once, on the caller's thread."""

    def submit(self, job) -> None:
        job()

    def close(self, raise_error: bool = True) -> None:
        pass


def one_run(side: str, images: int, batch: int, chunk: int, rate: float, work: Path) -> float:
    parts = work / f"{side}.parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    gpu = StandInGPU(rate)
    writer = WriteBehind("bench-writer") if side == "behind" else Inline()
    seg = _Segment(parts, DIM, False, chunk, writer)
    entry = Entry(path="x.jpg", rel="class/x.jpg")
    ready = torch.zeros(batch, 3, 8, 8, dtype=torch.uint8)
    groups = [range(s, min(images, s + batch)) for s in range(0, images, batch)]
    batches = (Batch(list(g), ready[:len(g)], []) for g in groups)
    t = time.perf_counter()
    for group, (b, feats) in zip(groups, run_batches(gpu, batches)):
        seg.add_batch(group)
        seg.feats.append(feats.numpy())
        for pos in b.positions:
            seg.add_row(pos, entry)
    seg.commit()
    writer.close()
    secs = time.perf_counter() - t
    assert len(list(parts.glob("part-*.jsonl"))) == -(-images // chunk)
    return images / secs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="inputs per segment (4096: what make bench-gpu runs with)")
    p.add_argument("--gpu-rate", type=float, default=3800.0,
                   help="images/s of the stand-in GPU (3800: trex-extract fp16's best on the "
                        "H100, run 3)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="commit-bench-"))
    rates = {"inline": [], "behind": []}
    try:
        for k in range(args.rounds):
            for side in (("inline", "behind") if k % 2 == 0 else ("behind", "inline")):
                r = one_run(side, args.images, args.batch_size, args.chunk_size, args.gpu_rate,
                            work)
                rates[side].append(r)
                print(f"round {k + 1} {side}: {r:,.0f} images/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.images:,} images, batch {args.batch_size}, segments of {args.chunk_size}, "
          f"stand-in GPU at {args.gpu_rate:,.0f} images/s, {args.rounds} rounds\n")
    print("| segments written | loop images/s, best / median | share of the GPU's rate "
          "(median) |\n|---|---|---|")
    for side, vals in rates.items():
        med = statistics.median(vals)
        print(f"| {side} | {max(vals):,.0f} / {med:,.0f} | {med / args.gpu_rate:.0%} |")
    ratio = statistics.median(rates["behind"]) / statistics.median(rates["inline"])
    print(f"\nbehind / inline (medians): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
