"""Where the time of GPU extraction goes: each stage of the nvJPEG pipeline timed alone.

    python benchmarks/gpu_pipeline_profile.py                 # needs CUDA; about a minute
    python benchmarks/gpu_pipeline_profile.py --device cpu --images 48 --batch 16   # dry run

``trex-extract`` on CUDA runs three stages at once: threads read the files, one thread decodes a
batch with nvJPEG and resizes it on the GPU, the main thread runs the model. End to end it can go
no faster than its slowest stage. This script times each stage on its own over the same photos
(generated photo-like 500x375 JPEGs, random ResNet-50 weights in the released layout), after a
warm-up pass, each synchronised at its end:

* ``read``: the reader threads alone (file bytes, JPEG header check, bytes to a tensor), as
  shipped: tasks of consecutive files (``benchmarks/read_stage_bench.py`` compares);
* ``decode``: ``decode_jpeg`` on the device, one call per batch, bytes already in memory;
* ``resize, image by image`` / ``resize, one call per size``: the preset's resize and crop of
  decoded images already on the device, the old way and the way ``tensor_batches`` does it;
* ``tensor_batches``: read + decode + resize as shipped (threads, background stage), no model,
  with one reader thread per core (the default) and with 4 (fewer threads contending for the
  GIL with the decoding thread and the model's);
* ``model``: the prepared model on uint8 batches already on the device (``launch`` + result);
  on CUDA also exact fp32 with NHWC and NCHW weights, and tf32 (is channels_last right for
  fp32 without tensor cores?), and with ``cudnn.benchmark`` (does the autotuner pay?);
* ``extract``: ``model.extract(files, decode=...)``, the whole in-memory engine, for GPU
  decoding, for the CPU decoding the machine would pick (worker processes on many cores) and
  for both at once (``hybrid``).

Prints a markdown table (images/s and ms per batch) and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, rounds: int = 2) -> float:
    """Best wall time of ``rounds`` calls of ``fn`` (synchronised before and after)."""
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--workers", type=int, default=None, help="reader threads / decode workers "
                    "(default: the cores this process may use)")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_pipeline_profile: needs CUDA (or --device cpu for a dry run)", file=sys.stderr)
        return 2

    import trex_hub
    from extract_bench import bench_workdir, make_photos_parallel
    from trex_hub.decoding import available_cores, batch_ranges
    from trex_hub.inference import prepare
    from trex_hub.tensor_decode import (TensorGeometry, _decode_jpegs, read_jpeg_file,
                                        submit_chunks, tensor_batches)
    from trex_hub.transforms import Decoder

    work, ckpt = bench_workdir(args.work_dir, "trex-profile-")
    photos = work / f"photos-{args.images}"
    if not (photos / ".complete").exists():
        make_photos_parallel(photos, args.images, size=(500, 375), classes=4, seed=2000,
                             jobs=min(8, available_cores()))
        (photos / ".complete").write_text("ok")
    files = sorted(photos.rglob("*.jpg"))
    n, bs = len(files), args.batch
    workers = args.workers or available_cores()
    groups = batch_ranges(n, bs)
    cfg = trex_hub.preprocess.PRESETS["transfer"]
    geometry = TensorGeometry(cfg)
    model = trex_hub.load(ckpt)
    runner = prepare(model, device, args.precision)
    stages = {}

    def record(name: str, seconds: float, count: int = n) -> None:
        stages[name] = {"images_per_s": count / seconds, "ms_per_batch": 1e3 * seconds * bs / count}
        print(f"  {name}: {count / seconds:,.0f} img/s", flush=True)

    pool = ThreadPoolExecutor(max_workers=workers)

    def read_all() -> list:  # the shipped reader stage: chunks of files per task
        got = [r for g in groups
               for f in submit_chunks(pool, read_jpeg_file, [files[i] for i in g], workers)
               for r in f.result()]
        assert all(r is not None for r in got)
        return got

    raw = read_all()  # warm the page cache
    record("read", timed(read_all, device, args.rounds))
    pool.shutdown()

    batches = [[raw[i] for i in g] for g in groups]
    _decode_jpegs(batches[0], device)  # decoder start-up
    decoded = []
    record("decode", timed(lambda: decoded.__setitem__(slice(None), [
        _decode_jpegs(b, device) for b in batches]), device, args.rounds))

    def per_image():
        for imgs in decoded:
            torch.stack([geometry(i).permute(1, 2, 0) for i in imgs])

    def per_size():
        for imgs in decoded:
            geometry.batch(imgs, grouped=True)

    record("resize, image by image", timed(per_image, device, args.rounds))
    record("resize, one call per size", timed(per_size, device, args.rounds))
    decoded.clear()  # frees the decoded images

    dec = Decoder("transfer")

    def pipeline(readers: int):
        for b in tensor_batches(groups, files.__getitem__, dec, cfg, device=device,
                                num_workers=readers):
            assert not b.failures
    for readers in sorted({workers, min(workers, 4)}, reverse=True):
        record(f"tensor_batches (read + decode + resize), {readers} reader threads",
               timed(lambda: pipeline(readers), device, args.rounds))

    x = torch.randint(0, 256, (bs, cfg.crop, cfg.crop, 3), dtype=torch.uint8, device=device)
    runner.launch(x).result()

    def model_only():
        held = None
        for _ in groups:
            launched = runner.launch(x)
            if held is not None:
                held.result()
            held = launched
        held.result()
    record(f"model ({args.precision}, uint8 batch on the device)",
           timed(model_only, device, args.rounds))
    if device.type == "cuda":  # which layout exact fp32 (no TF32) should use on this GPU, and
        # whether cuDNN's autotuner (off in extraction) pays: its first call is timed apart
        variants = [("fp32", True, False), ("fp32", False, False), ("tf32", True, False),
                    (args.precision, True, True), ("fp32", True, True), ("fp32", False, True)]
        variants = list(dict.fromkeys(variants))  # --precision fp32 repeats one
        was = torch.backends.cudnn.benchmark
        try:
            for variant, channels_last, autotune in variants:
                torch.backends.cudnn.benchmark = autotune
                runner = prepare(model, device, variant, channels_last=channels_last)
                first = timed(lambda: runner.launch(x).result(), device, 1)
                tag = (f"{variant}, {'NHWC' if channels_last else 'NCHW'} weights"
                       + (f", cudnn.benchmark (first batch {first:.1f} s)" if autotune else ""))
                record(f"model ({tag})", timed(model_only, device, args.rounds))
        finally:
            torch.backends.cudnn.benchmark = was

    for decode in ("gpu", "cpu", "hybrid"):
        kw = dict(device=device, decode=decode, batch_size=bs, precision=args.precision,
                  num_workers=workers)
        model.extract(files[:bs], **kw)
        record(f"extract, decode={decode} ({args.precision}, {workers} workers)",
               timed(lambda: model.extract(files, **kw), device, args.rounds))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{n} photo-like 500x375 JPEGs, batch {bs}, {workers} workers, {name}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}; best of {args.rounds}\n")
    print("| stage | images/s | ms per batch |")
    print("|---|---|---|")
    for stage, v in stages.items():
        print(f"| {stage} | {v['images_per_s']:,.0f} | {v['ms_per_batch']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "images": n, "batch": bs,
                                         "workers": workers, "stages": stages}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
