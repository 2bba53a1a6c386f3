"""Feature extraction benchmark: trex_hub's engine against the naive torchvision recipe.

One command, one run, same machine, same images, same weights:

    python benchmarks/extract_bench.py            # ResNet-50, CPU, about 4-6 minutes on 2 cores

(a) model-only throughput (images/s) on the same normalised batch: trex_hub's prepared model
    (BatchNorm folded, channels_last, inference_mode) against the naive baseline (torchvision
    ``resnet50``, ``fc = Identity``, ``eval()``, ``torch.no_grad()``, NCHW fp32), same batch size;
    runs alternate (naive, ours, naive, ours, ...) so a noisy neighbour hits both alike.
(b) end-to-end, folder of JPEG photos -> features file on disk: ``trex-extract`` against a naive
    loop (``ImageFolder`` + the standard transforms + ``DataLoader`` with the same number of
    workers + the naive model + ``np.save``). Each run is a fresh subprocess that times itself
    from "model file and folder given" to "features file written" (model loading included, Python
    start-up excluded) and reports its peak RSS.
(c) memory scaling of the streaming writer: peak RSS of ``trex-extract`` on 2,000 vs 20,000 tiny
    images (ResNet-18, no resize: it isolates the pipeline, whose memory must stay flat).
(d) CUDA (when present): images/s at batch 256, fp32 naive vs bf16/fp16 ours.
(e) ONNX Runtime (when installed): model-only images/s of ``trex-extract --engine onnxruntime``'s
    runner (the model exported with ``trex_hub.export_onnx``, ORT CPU, fp32, same thread count)
    against the PyTorch engine (the prepared model of (a)), same batch, alternating rounds.

Weights are random (generated in the released layout): speed does not depend on their values.
Prints a table and the ratios; ``--json`` also writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited from
    the parent across fork + exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_model() -> str:
    """The CPU's model name (what docs/benchmarks.md records for each run)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_workdir(work_dir, prefix: str):
    """``(work, ckpt)``: the benchmark's folder (kept when named, else a new temporary one) and a
    generated ResNet-50 backbone file in the released layout inside it."""
    import factories as fx

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "trex.pth"
    if not ckpt.exists():
        fx.write_backbone_file(ckpt, arch="resnet50", seed=0)
    return work, ckpt


def make_photos(folder: Path, n: int, size=(500, 375), classes: int = 4, seed: int = 0,
                fmt: str = "JPEG", start: int = 0) -> None:
    """Photo-like JPEGs: smooth colour fields, edges and sensor noise (quality 90), numbered
    ``start .. start + n - 1`` (``class{i % classes}/img{i:06d}``)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size
    ext = "jpg" if fmt == "JPEG" else "png"
    for i in range(start, start + n):
        cls = folder / f"class{i % classes}"
        cls.mkdir(parents=True, exist_ok=True)
        path = cls / f"img{i:06d}.{ext}"
        if path.exists():
            continue
        if w >= 64:
            low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
            draw = ImageDraw.Draw(img)
            for _ in range(6):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                draw.ellipse([x0, y0, x0 + int(rng.integers(20, w // 2)),
                              y0 + int(rng.integers(20, h // 2))],
                             fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            img = img.filter(ImageFilter.GaussianBlur(1.5))
            arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(path, quality=90) if fmt == "JPEG" else img.save(path)


def _photos_part(job) -> None:
    folder, n, size, classes, seed, part, parts = job
    lo, hi = n * part // parts, n * (part + 1) // parts
    make_photos(Path(folder), hi - lo, size=size, classes=classes, seed=seed * 1009 + part,
                start=lo)


def make_photos_parallel(folder: Path, n: int, size=(500, 375), classes: int = 4, seed: int = 0,
                         jobs: int = 0) -> None:
    """:func:`make_photos` split over ``jobs`` processes (default: the usable cores); each part
    has its own seed, so the pixels differ from a serial run but not from run to run."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = max(1, min(jobs or len(os.sched_getaffinity(0)), n))
    parts = [(str(folder), n, size, classes, seed, k, jobs) for k in range(jobs)]
    if jobs == 1:
        _photos_part(parts[0])
        return
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_photos_part, parts))


def naive_model(ckpt: Path) -> torch.nn.Module:
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Identity()
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"fc.weight", "fc.bias"}, (missing, unexpected)
    return net.eval()


# ------------------------------------------------------------------------------ children ----
def child_naive_e2e(args) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    t0 = time.perf_counter()
    model = naive_model(Path(args.ckpt))
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(args.data, transform=tf)
    dl = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=False)
    outs = []
    with torch.no_grad():
        for x, _ in dl:
            outs.append(model(x))
    np.save(args.out, torch.cat(outs).numpy())
    secs = time.perf_counter() - t0
    return {"seconds": secs, "images": len(ds), "peak_rss_mb": peak_rss_mb()}


def child_ours_e2e(args) -> dict:
    # the libraries load before the clock starts, on both sides (the package's façade is lazy,
    # so the program's modules are imported here, as the naive side imports torchvision's)
    from trex_hub import api, extract_run  # noqa: F401
    from trex_hub.cli.extract import main

    t0 = time.perf_counter()
    argv = [args.ckpt, args.data, "-o", args.out, "-b", str(args.batch_size), "-j",
            str(args.workers), "--overwrite", "--no-progress", "-q"]
    if args.preprocess_none:
        argv += ["--chunk-size", "1024"]
    rc = main(argv) if not args.preprocess_none else _ours_no_resize(args)
    secs = time.perf_counter() - t0
    assert rc == 0
    return {"seconds": secs, "peak_rss_mb": peak_rss_mb()}


def _ours_no_resize(args) -> int:
    import trex_hub
    from trex_hub.extract_run import RunOptions, extract_to_file
    from trex_hub.imagefiles import collect_inputs

    model = trex_hub.load(args.ckpt)
    entries = collect_inputs([args.data])
    extract_to_file(model, entries, args.out, RunOptions(batch_size=args.batch_size,
                                                         num_workers=args.workers,
                                                         preprocess=None, overwrite=True))
    return 0


# characters of a failed child's stderr that its error keeps: a hung run's report (the stacks of
# its main process and of every loader worker) is tens of kB
FAILED_TAIL = 100_000


def run_timed(cmd: List[str], timeout: Optional[float] = None,
              env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a benchmark child and capture its output. A child that outlives ``timeout`` seconds
    ends with returncode 124 and, in its stderr: every thread's stack of every Python process it
    started (its DataLoader workers too: SIGABRT with faulthandler on), the state and kernel
    wait channel of each of those processes, then "timed out after N s".

    The child runs in a process group of its own, which is signalled and killed whole: a worker
    left behind used to hold the output pipes open, and the benchmark waited for ever (bench-train
    on an H100, 2026-11-27)."""
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        pass
    states = group_states(proc.pid)
    out, err = "", ""
    for sig in (signal.SIGABRT, signal.SIGKILL):  # stacks first, then no survivor
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            out, err = proc.communicate(timeout=10)
            break
        except subprocess.TimeoutExpired as exc:  # a process outside the group holds a pipe
            out, err = _text(exc.stdout), _text(exc.stderr)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return subprocess.CompletedProcess(
        cmd, 124, out, f"{err}\nprocesses at the timeout (pid, state, kernel wait, command):\n"
        f"{states}\ntimed out after {timeout:.0f} s")


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def group_states(pgid: int) -> str:
    """One line per process of group ``pgid`` (Linux ``/proc``; empty elsewhere): pid, state
    (R running, S sleeping, D uninterruptible, e.g. in a driver), kernel wait channel, command."""
    lines = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:  # state, ppid, pgrp, ...
                continue
            wchan = (entry / "wchan").read_text().strip() or "-"
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        lines.append(f"  {entry.name} {fields[0]} {wchan} {cmd[:160].strip()}")
    return "\n".join(sorted(lines, key=lambda ln: int(ln.split()[0]))) or "  (none found)"


def last_line(text: str, limit: int = 200) -> str:
    """The last non-empty line of ``text``, short and fit for a markdown table cell."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:limit].replace("|", "/")


def run_child(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    res = run_timed(cmd)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-FAILED_TAIL:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def rates(times: Dict[str, List[float]], n: int, ours: str, base: str) -> dict:
    """Images/s (best and median over the rounds) of each side timed on ``n`` images, and the
    ratios of ``ours`` to ``base``."""
    out = {name: {"best": n / min(ts), "median": n / statistics.median(ts)}
           for name, ts in times.items()}
    out["ratio_best"] = out[ours]["best"] / out[base]["best"]
    out["ratio_median"] = out[ours]["median"] / out[base]["median"]
    return out


# ---------------------------------------------------------------------------- sections ------
def bench_model_only(ckpt: Path, batch: torch.Tensor, rounds: int, log) -> dict:
    import trex_hub
    from trex_hub.inference import prepare

    naive = naive_model(ckpt)
    ours = prepare(trex_hub.load(ckpt))
    with torch.no_grad():
        ref = naive(batch)
        naive(batch[:2])
    got = ours(batch)
    err = float((got - ref).abs().max() / ref.abs().max())
    times = {"naive": [], "ours": []}
    for r in range(rounds):
        for name in ("naive", "ours"):
            t = time.perf_counter()
            if name == "naive":
                with torch.no_grad():
                    naive(batch)
            else:
                ours(batch)
            times[name].append(time.perf_counter() - t)
        log(f"  round {r + 1}/{rounds}: naive {batch.shape[0] / times['naive'][-1]:.2f} img/s, "
            f"ours {batch.shape[0] / times['ours'][-1]:.2f} img/s")
    n = batch.shape[0]
    return {"rel_err": err, **rates(times, n, "ours", "naive")}


def bench_ablation(ckpt: Path, batch: torch.Tensor, log, compile_: bool) -> dict:
    """Which part of the fast path buys what (one timing each, after a warm-up)."""
    import copy

    import trex_hub
    from trex_hub.inference import InferenceModel

    model = trex_hub.load(ckpt)
    n = batch.shape[0]
    res = {}

    def timed(fn, x):
        fn(x[:2])
        fn(x)
        t = time.perf_counter()
        fn(x)
        return n / (time.perf_counter() - t)

    variants = [("eval + no_grad (naive)", dict(fold_bn=False, channels_last=False)),
                ("+ BN folded", dict(fold_bn=True, channels_last=False)),
                ("+ channels_last only", dict(fold_bn=False, channels_last=True)),
                ("+ BN folded + channels_last (default)", dict(fold_bn=True, channels_last=True))]
    for name, kw in variants:
        r = InferenceModel(model, torch.device("cpu"), **kw)
        res[name] = timed(r, batch)
        log(f"  {name}: {res[name]:.2f} img/s")
    r = InferenceModel(model, torch.device("cpu"))
    x = r.to_input(batch)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated; measured anyway
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(r.module), x[:2]))
    with torch.no_grad():
        res["+ torch.jit.freeze (traced)"] = timed(frozen, x)
    log(f"  + torch.jit.freeze (traced): {res['+ torch.jit.freeze (traced)']:.2f} img/s")
    if compile_:
        t = time.perf_counter()
        rc = InferenceModel(model, torch.device("cpu"), compile=True)
        rc(batch)
        prep = time.perf_counter() - t
        res["+ torch.compile"] = timed(rc, batch)
        res["torch.compile warm-up seconds"] = prep
        log(f"  + torch.compile: {res['+ torch.compile']:.2f} img/s (warm-up {prep:.0f} s)")
    return res


def bench_e2e(ckpt: Path, data: Path, work: Path, n: int, batch_size: int, workers: int,
              rounds: int, log) -> dict:
    from trex_hub import read_features

    times = {"naive": [], "ours": []}
    rss = {"naive": 0.0, "ours": 0.0}
    for r in range(rounds):
        for name in ("naive", "ours"):
            out = work / f"{name}.npy"
            res = run_child(f"{name}-e2e", ckpt=ckpt, data=data, out=out,
                            batch_size=batch_size, workers=workers)
            times[name].append(res["seconds"])
            rss[name] = max(rss[name], res["peak_rss_mb"])
            log(f"  round {r + 1}/{rounds}: {name} {n / res['seconds']:.2f} img/s "
                f"({res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB)")
    ref = np.load(work / "naive.npy")
    feats, rows = read_features(work / "ours.npy")
    assert len(rows) == n and feats.shape == ref.shape
    err = float(np.abs(feats - ref).max() / np.abs(ref).max())
    return {"rel_err": err, "peak_rss_mb": rss, **rates(times, n, "ours", "naive")}


def bench_memory(work: Path, log, sizes=(2000, 20000)) -> dict:
    import factories as fx

    ckpt = work / "r18.pth"
    if not ckpt.exists():
        fx.write_backbone_file(ckpt, arch="resnet18")
    res = {}
    for n in sizes:
        data = work / f"tiny{n}"
        make_photos(data, n, size=(32, 32), classes=10, seed=n, fmt="PNG")
        r = run_child("ours-e2e", ckpt=ckpt, data=data, out=work / f"tiny{n}.npy",
                      batch_size=64, workers=2, preprocess_none=True)
        res[n] = {"peak_rss_mb": r["peak_rss_mb"], "seconds": r["seconds"]}
        log(f"  {n} images: peak RSS {r['peak_rss_mb']:.0f} MB ({r['seconds']:.1f} s)")
    res["ratio"] = res[sizes[1]]["peak_rss_mb"] / res[sizes[0]]["peak_rss_mb"]
    return res


def bench_onnxruntime(ckpt: Path, batch: torch.Tensor, rounds: int, log) -> dict:
    """(e): the ONNX Runtime engine against the PyTorch engine, model only, fp32 on the CPU."""
    import trex_hub
    from trex_hub.inference import prepare
    from trex_hub.onnx_export import prepare_onnxruntime

    model = trex_hub.load(ckpt)
    ours = prepare(model)
    t = time.perf_counter()
    ort = prepare_onnxruntime(model, threads=torch.get_num_threads())
    export_s = time.perf_counter() - t
    ref = ours(batch)
    err = float((ort(batch) - ref).abs().max() / ref.abs().max())
    ours(batch[:2])
    ort(batch[:2])
    times = {"torch": [], "onnxruntime": []}
    for r in range(rounds):
        for name, fn in (("torch", ours), ("onnxruntime", ort)):
            t = time.perf_counter()
            fn(batch)
            times[name].append(time.perf_counter() - t)
        log(f"  round {r + 1}/{rounds}: torch {batch.shape[0] / times['torch'][-1]:.2f} img/s, "
            f"onnxruntime {batch.shape[0] / times['onnxruntime'][-1]:.2f} img/s")
    n = batch.shape[0]
    return {"rel_err": err, "export_and_session_seconds": export_s,
            **rates(times, n, "onnxruntime", "torch")}


def bench_cuda(ckpt: Path, log) -> dict:
    import trex_hub
    from trex_hub.inference import prepare

    dev = torch.device("cuda")
    x = torch.randn(256, 3, 224, 224)
    naive = naive_model(ckpt).to(dev)
    res = {"device": torch.cuda.get_device_name(0)}

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return 256 * reps / (time.perf_counter() - t)

    xd = x.to(dev)
    with torch.no_grad():
        res["naive fp32"] = timed(lambda: naive(xd))
    model = trex_hub.load(ckpt)
    for prec in ("fp32", "bf16", "fp16"):
        r = prepare(model, dev, prec)
        res[f"ours {prec}"] = timed(lambda: r(xd))
        log(f"  ours {prec}: {res[f'ours {prec}']:.0f} img/s")
    log(f"  naive fp32: {res['naive fp32']:.0f} img/s")
    return res


# -------------------------------------------------------------------------------- main ------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=128, help="photos for the end-to-end run")
    p.add_argument("--size", default="500x375", help="photo size WxH")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decode workers for both loops")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds, model-only")
    p.add_argument("--e2e-rounds", type=int, default=2, help="alternating rounds, end-to-end")
    p.add_argument("--work-dir", default=None, help="where images and outputs go (kept)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-onnx", action="store_true", help="no ONNX Runtime section (e)")
    p.add_argument("--ablation", action="store_true", help="time each fast-path ingredient")
    p.add_argument("--compile", action="store_true", help="include torch.compile in --ablation")
    p.add_argument("--json", default=None, help="also write the results here")
    # internal: one timed end-to-end run in a fresh process
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--preprocess-none", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        fn = {"naive-e2e": child_naive_e2e, "ours-e2e": child_ours_e2e}[args.child]
        print(json.dumps(fn(args)))
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    w, h = (int(v) for v in args.size.lower().split("x"))
    work, ckpt = bench_workdir(args.work_dir, "trex-bench-")
    data = work / f"photos-{w}x{h}-{args.images}"
    make_photos(data, args.images, size=(w, h))

    load = os.getloadavg()
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cpu": cpu_model(), "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "loadavg_start": [round(v, 2) for v in load],
           "images": args.images, "size": f"{w}x{h}", "batch_size": args.batch_size,
           "workers": args.workers}
    log(f"trex_hub extraction benchmark: torch {torch.__version__}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}")
    results = {"env": env}

    # one batch of real photos, decoded and normalised exactly as the baseline does
    from PIL import Image

    from trex_hub.transforms import build_transform

    tf = build_transform("transfer")
    files = sorted(data.rglob("*.jpg"))[:args.batch_size]
    batch = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])

    log(f"(a) model-only, ResNet-50, batch {batch.shape[0]}, {args.rounds} alternating rounds")
    results["model_only"] = bench_model_only(ckpt, batch, args.rounds, log)
    if args.ablation:
        log("    ablation (one timing each)")
        results["ablation"] = bench_ablation(ckpt, batch, log, args.compile)
    if not args.skip_e2e:
        log(f"(b) end-to-end, {args.images} JPEGs {w}x{h} -> .npy, {args.workers} workers, "
            f"{args.e2e_rounds} alternating rounds")
        results["e2e"] = bench_e2e(ckpt, data, work, args.images, args.batch_size, args.workers,
                                   args.e2e_rounds, log)
    if not args.skip_memory:
        log("(c) peak memory of the streaming writer, 2,000 vs 20,000 tiny images (ResNet-18)")
        results["memory"] = bench_memory(work, log)
    if not args.skip_onnx:
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            log("(e) ONNX Runtime: skipped (pip install 'trex_hub[interop]')")
        else:
            log(f"(e) ONNX Runtime vs PyTorch engine, model-only, fp32, batch {batch.shape[0]}, "
                f"{args.rounds} alternating rounds")
            results["onnxruntime"] = bench_onnxruntime(ckpt, batch, args.rounds, log)
    if torch.cuda.is_available():
        log("(d) CUDA, batch 256")
        results["cuda"] = bench_cuda(ckpt, log)
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    m = results["model_only"]
    log("")
    log("| measurement | naive (img/s) | trex_hub (img/s) | ratio | target | max rel. diff |")
    log("|---|---|---|---|---|---|")
    log(f"| model-only, best of {args.rounds} | {m['naive']['best']:.2f} | "
        f"{m['ours']['best']:.2f} | **{m['ratio_best']:.2f}x** | >= 1.8x | {m['rel_err']:.1e} |")
    log(f"| model-only, median | {m['naive']['median']:.2f} | {m['ours']['median']:.2f} | "
        f"{m['ratio_median']:.2f}x | >= 1.8x | |")
    if "e2e" in results:
        e = results["e2e"]
        log(f"| end-to-end, best of {args.e2e_rounds} | {e['naive']['best']:.2f} | "
            f"{e['ours']['best']:.2f} | **{e['ratio_best']:.2f}x** | >= 1.6x | "
            f"{e['rel_err']:.1e} |")
        log(f"| end-to-end, median | {e['naive']['median']:.2f} | {e['ours']['median']:.2f} | "
            f"{e['ratio_median']:.2f}x | >= 1.6x | |")
        log(f"| end-to-end peak RSS (main process) | {e['peak_rss_mb']['naive']:.0f} MB | "
            f"{e['peak_rss_mb']['ours']:.0f} MB | | | |")
    if "memory" in results:
        mem = results["memory"]
        log(f"| peak RSS 20,000 / 2,000 images | | {mem[20000]['peak_rss_mb']:.0f} / "
            f"{mem[2000]['peak_rss_mb']:.0f} MB | {mem['ratio']:.2f}x | <= 1.2x | |")
    if "onnxruntime" in results:
        o = results["onnxruntime"]
        log("")
        log("| engine, model-only fp32 | PyTorch engine (img/s) | ONNX Runtime (img/s) | ratio | "
            "max rel. diff |")
        log("|---|---|---|---|---|")
        log(f"| best of {args.rounds} | {o['torch']['best']:.2f} | "
            f"{o['onnxruntime']['best']:.2f} | **{o['ratio_best']:.2f}x** | {o['rel_err']:.1e} |")
        log(f"| median | {o['torch']['median']:.2f} | {o['onnxruntime']['median']:.2f} | "
            f"{o['ratio_median']:.2f}x | |")
        log(f"ONNX export + session: {o['export_and_session_seconds']:.1f} s (once per run)")
    log(f"load average at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
