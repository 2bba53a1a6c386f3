"""``decode="hybrid"`` on the CPU: a stand-in nvJPEG lane beside the real CPU worker lane.

    python benchmarks/hybrid_bench.py                  # a few minutes on 2 cores
    python benchmarks/hybrid_bench.py --images 1024 --gpu-rate 300 --rounds 5

On a GPU machine nvJPEG decodes on the GPU's JPEG engine and leaves most cores idle;
``decode="hybrid"`` (``trex_hub.decode_hybrid``) gives those cores batches of their own. This
measures that mechanism where no GPU is at hand. Three sides, alternating from round to round,
each consuming every batch of one run of photo-like 500x375 JPEGs and putting them back in
order (``extract.in_group_order``, as ``run_batches`` does after the model):

* ``nvJPEG stand-in``: a lane that spends ``batch / --gpu-rate`` seconds per batch asleep (a GPU
  engine costs the host no CPU) and hands back a ready uint8 batch, run through the real
  ``merge_lanes``;
* ``CPU lane``: the real worker processes (``process_batches``, PIL, the preset's resize) with
  the workers hybrid gives them (``--workers`` minus ``HYBRID_RESERVED_CORES``, at least one),
  through the real ``merge_lanes``;
* ``hybrid``: both lanes at once, as ``hybrid_batches`` runs them (workers forked first, at
  ``HYBRID_NICE``), with the batches each lane took.

Reported: images/s, best-of and median, and hybrid's ratio to the stand-in alone (the
baseline: what ``decode="gpu"`` would do if nvJPEG were the limit).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from extract_bench import bench_workdir, cpu_model  # noqa: E402
from extract_gpu_bench import make_many_photos  # noqa: E402
from trex_hub.decode_hybrid import (HYBRID_NICE, HYBRID_RESERVED_CORES, Claims,  # noqa: E402
                                    _own_copies, merge_lanes)
from trex_hub.decode_procs import DecodePool, process_batches  # noqa: E402
from trex_hub.decoding import Batch, batch_ranges  # noqa: E402
from trex_hub.extract import in_group_order  # noqa: E402
from trex_hub.preprocess import PRESETS  # noqa: E402
from trex_hub.transforms import Decoder  # noqa: E402


def stand_in_lane(rate: float, crop: int):
    """A lane that costs no CPU: ``len(group) / rate`` s asleep per batch."""
    def lane(claimed):
        for group in claimed:
            time.sleep(len(group) / rate)
            yield Batch(list(group), torch.zeros(len(group), crop, crop, 3, dtype=torch.uint8),
                        [])
    return lane


def one_run(side: str, files, groups, args) -> tuple:
    cfg = PRESETS["transfer"]
    decoder = Decoder("transfer")
    procs = max(1, args.workers - HYBRID_RESERVED_CORES)
    lanes, pool = {}, None
    if side in ("nvJPEG stand-in", "hybrid"):
        lanes["gpu"] = stand_in_lane(args.gpu_rate, cfg.crop)
    t = time.perf_counter()
    if side in ("CPU lane", "hybrid"):
        pool = DecodePool(decoder, procs, 3, args.batch_size, (cfg.crop, cfg.crop, 3),
                          nice=HYBRID_NICE)

        def cpu_lane(claimed):
            return _own_copies(process_batches(claimed, files.__getitem__, decoder,
                                               num_workers=0, crop=cfg.crop, pool=pool,
                                               strict=False), torch.device("cpu"))
        lanes["cpu"] = cpu_lane
    claims = Claims(groups)
    try:
        n = sum(len(b.positions) for b, _ in in_group_order(
            ((b, None) for b in merge_lanes(groups, lanes, claims=claims)), groups))
    finally:
        if pool is not None:
            pool.close()
    return n / (time.perf_counter() - t), claims.taken()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gpu-rate", type=float, default=200.0,
                   help="images/s of the stand-in nvJPEG lane (200)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="decode workers, as -j (default: the cores)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)

    work, _ = bench_workdir(args.work_dir, "trex-hybrid-")
    photos = work / f"photos-{args.images}"
    make_many_photos(photos, args.images, jobs=args.workers)
    files = sorted(photos.rglob("*.jpg"))
    groups = batch_ranges(len(files), args.batch_size)
    sides = ["nvJPEG stand-in", "CPU lane", "hybrid"]
    rates = {s: [] for s in sides}
    split = []
    for k in range(args.rounds):
        for side in (sides if k % 2 == 0 else sides[::-1]):
            rate, taken = one_run(side, files, groups, args)
            rates[side].append(rate)
            if side == "hybrid":
                split.append(taken)
            print(f"round {k + 1} {side}: {rate:,.0f} img/s {taken}", flush=True)
    base = statistics.median(rates["nvJPEG stand-in"])
    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{len(files)} JPEGs 500x375, batch {args.batch_size}, stand-in nvJPEG at "
          f"{args.gpu_rate:,.0f} img/s, {args.workers} workers "
          f"({max(1, args.workers - HYBRID_RESERVED_CORES)} CPU-lane processes at nice "
          f"+{HYBRID_NICE}); {args.rounds} rounds, load average at the end "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}.\n")
    print("| side | images/s, best / median | vs the stand-in alone (medians) |")
    print("|---|---|---|")
    for side in sides:
        med = statistics.median(rates[side])
        print(f"| {side} | {max(rates[side]):,.0f} / {med:,.0f} | {med / base:.2f}x |")
    print("\nBatches each lane of the hybrid took, per round: "
          + "; ".join(", ".join(f"{k} {v}" for k, v in sorted(t.items())) for t in split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
