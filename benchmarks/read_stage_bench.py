"""The file-reading stage of GPU decoding: what it costs the thread that launches the model.

    python benchmarks/read_stage_bench.py                    # about a minute on 2 cores
    python benchmarks/read_stage_bench.py --threads 16 --rate 3500 --rounds 5

With ``decode="gpu"`` the main process does everything in threads: reader threads load the JPEG
files, one thread decodes with nvJPEG, the main thread launches the model. They share one GIL,
and every torch call releases and takes it back, so a reader stage that keeps the GIL busy slows
the launches even when the GPU and the cores are idle. Two reader stages on the same files, the
same thread count (16 by default: the cores of the H100 machine of issue 11), alternating:

* ``per-file`` (the baseline, shipped until this benchmark): one future per file,
  ``Path.read_bytes``, the JPEG header check, a copy into a tensor;
* ``chunked`` (shipped): :func:`trex_hub.tensor_decode.submit_chunks` of
  :func:`~trex_hub.tensor_decode.read_jpeg_file`, tasks of >= 32 consecutive files, an unbuffered
  ``readinto`` straight into the tensor's buffer.

Two measures per side, each best-of and median over ``--rounds``:

1. **flat out**: files/s of the stage alone, batches of 256 read back to back;
2. **paced**: batches delivered at ``--rate`` files/s (what the decoder would ask for) while
   another thread runs small torch ops in a loop (a stand-in for the model's kernel launches,
   which also drop and retake the GIL): that thread's rate as a share of its rate alone, and
   the batches the stage delivered late;
3. **pipeline with a free GPU**: images/s of the shipped GPU-decoding pipeline
   (``tensor_batches`` with its decoding thread, then ``extract.run_batches``) with nvJPEG, the
   resize and the network replaced by stand-ins that cost no device time (a ready tensor; 120
   small torch ops per batch for the network's launches, the op count of the BatchNorm-folded
   ResNet-50): the most images/s the host side can orchestrate, whatever the GPU. The
   ``per-file`` side swaps in the old reader functions.

Files: generated photo-like 500x375 JPEGs (~30 kB), read from the page cache (the first pass
warms it), so this is the GIL cost of reading, not the disk's speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from trex_hub.tensor_decode import jpeg_extent, read_jpeg_file, submit_chunks  # noqa: E402

BATCH = 256


def per_file_read(path: Path, max_pixels=None, resize=None):
    """The baseline reader: what the stage did per file before (one future each), with the
    signature and the checks of :func:`read_jpeg_file`, which it stands in for."""
    data = Path(path).read_bytes()
    n = jpeg_extent(data, max_pixels, resize)
    return None if n is None else torch.frombuffer(bytearray(data), dtype=torch.uint8)[:n]


def read_batch(kind: str, pool: ThreadPoolExecutor, group, threads: int) -> list:
    if kind == "per-file":
        return [f.result() for f in [pool.submit(per_file_read, p) for p in group]]
    return [r for f in submit_chunks(pool, read_jpeg_file, group, threads) for r in f.result()]


def stage(kind: str, files, threads: int, rate: float = 0.0) -> tuple:
    """(seconds, late batches) to read ``files`` in batches, paced at ``rate`` files/s if set."""
    late = 0
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        for k, at in enumerate(range(0, len(files), BATCH)):
            got = read_batch(kind, pool, files[at:at + BATCH], threads)
            assert all(g is not None for g in got)
            if rate:
                due = t0 + (at + len(got)) / rate
                now = time.perf_counter()
                if now < due:
                    time.sleep(due - now)
                else:
                    late += 1
        return time.perf_counter() - t0, late


def launches(seconds: float = 0.0, stop: threading.Event = None) -> float:
    """Small torch ops per second in this thread, for ``seconds`` or until ``stop``."""
    x = torch.zeros(4)
    n, t0 = 0, time.perf_counter()
    while (stop is None and time.perf_counter() - t0 < seconds) or (stop is not None
                                                                    and not stop.is_set()):
        for _ in range(100):
            x.add_(1)
        n += 100
    return n / (time.perf_counter() - t0)


def paced(kind: str, files, threads: int, rate: float) -> tuple:
    """(launch-thread ops/s, late batches) while the stage delivers ``rate`` files/s."""
    stop, out = threading.Event(), []
    t = threading.Thread(target=lambda: out.append(launches(stop=stop)))
    t.start()
    try:
        _, late = stage(kind, files, threads, rate)
    finally:
        stop.set()
        t.join()
    return out[0], late


LAUNCHES = 120  # torch calls per forward of the BatchNorm-folded ResNet-50 (conv, relu, add)


class FreeGPURunner:
    """The network's host side only: ``launch`` makes the calls, nothing is computed."""

    def __init__(self):
        self.x = torch.zeros(4)

    def launch(self, batch: torch.Tensor):
        from trex_hub.inference import Pending

        for _ in range(LAUNCHES):
            self.x.add_(1)
        return Pending(torch.zeros(batch.shape[0], 8))


def per_file_submit(pool: ThreadPoolExecutor, fn, items, workers: int, min_chunk: int = 0):
    """The old task split: one future per file (each yields a one-item list)."""
    return [pool.submit(lambda i: [fn(i)], i) for i in items]


def pipeline(kind: str, files, threads: int) -> float:
    """Seconds for the GPU-decoding pipeline over ``files`` with a free GPU (see measure 3)."""
    from unittest import mock

    from trex_hub import preprocess, tensor_decode
    from trex_hub.decoding import batch_ranges
    from trex_hub.extract import run_batches
    from trex_hub.transforms import Decoder

    decoded = torch.zeros(3, 375, 500, dtype=torch.uint8)
    crops = torch.zeros(BATCH, 224, 224, 3, dtype=torch.uint8)
    patches = [mock.patch.object(tensor_decode, "_decode_jpegs",
                                 lambda datas, device: [decoded] * len(datas)),
               mock.patch.object(tensor_decode.TensorGeometry, "batch",
                                 lambda self, imgs, grouped=None: crops[:len(imgs)])]
    if kind == "per-file":
        patches += [mock.patch.object(tensor_decode, "read_jpeg_file", per_file_read),
                    mock.patch.object(tensor_decode, "submit_chunks", per_file_submit)]
    runner = FreeGPURunner()
    for p in patches:
        p.start()
    try:
        t0 = time.perf_counter()
        batches = tensor_decode.tensor_batches(
            batch_ranges(len(files), BATCH), files.__getitem__, Decoder("transfer"),
            preprocess.PRESETS["transfer"], num_workers=threads)
        n = sum(len(b.positions) for b, _ in run_batches(runner, batches))
        assert n == len(files)
        return time.perf_counter() - t0
    finally:
        for p in patches:
            p.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="distinct files (read 8 times)")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rate", type=float, default=3500.0, help="paced delivery, files/s")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from extract_bench import cpu_model, make_photos_parallel

    from trex_hub.decoding import available_cores

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="trex-readbench-"))
    photos = work / f"photos-{args.images}"
    if not (photos / ".complete").exists():
        make_photos_parallel(photos, args.images, size=(500, 375), classes=4, seed=3000)
        (photos / ".complete").write_text("ok")
    files = sorted(photos.rglob("*.jpg")) * 8
    kinds = ("per-file", "chunked")
    for kind in kinds:  # warm the page cache and the pools' code paths
        stage(kind, files[:BATCH], args.threads)

    flat = {k: [] for k in kinds}
    share = {k: [] for k in kinds}
    late = {k: 0 for k in kinds}
    piped = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds if r % 2 == 0 else kinds[::-1]
        for kind in order:
            flat[kind].append(len(files) / stage(kind, files, args.threads)[0])
        for kind in order:
            piped[kind].append(len(files) / pipeline(kind, files, args.threads))
        for kind in order:
            alone = launches(0.5)
            ops, lt = paced(kind, files, args.threads, args.rate)
            share[kind].append(ops / alone)
            late[kind] = max(late[kind], lt)

    batches = -(-len(files) // BATCH)
    print(f"\n{len(files)} reads of {args.images} photo-like 500x375 JPEGs (page cache), batches "
          f"of {BATCH}, {args.threads} reader threads, {args.rounds} rounds alternating; "
          f"{cpu_model()}, {available_cores()} usable cores, "
          f"torch {torch.__version__}\n")
    print("| reader stage | flat out, files/s (best / median) | launch thread at "
          f"{args.rate:,.0f} files/s, share of alone (best / median) | late batches (worst "
          f"round, of {batches}) | pipeline with a free GPU, images/s (best / median) |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {max(flat[kind]):,.0f} / {statistics.median(flat[kind]):,.0f} | "
              f"{max(share[kind]):.0%} / {statistics.median(share[kind]):.0%} | {late[kind]} | "
              f"{max(piped[kind]):,.0f} / {statistics.median(piped[kind]):,.0f} |")

    def ratio(d: dict) -> str:
        return (f"{max(d['chunked']) / max(d['per-file']):.2f}x best, "
                f"{statistics.median(d['chunked']) / statistics.median(d['per-file']):.2f}x median")
    print(f"\nchunked / per-file: flat out {ratio(flat)}; launch-thread share "
          f"{statistics.median(share['chunked']) / statistics.median(share['per-file']):.2f}x "
          f"median; pipeline with a free GPU {ratio(piped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
