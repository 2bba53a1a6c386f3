"""GPU extraction benchmark (issue 11): trex-extract against the naive DataLoader loop on CUDA.

    python benchmarks/extract_gpu_bench.py            # = make bench-gpu; needs a CUDA GPU

One machine, same photos (>= 10,000 photo-like 500x375 JPEGs, generated in parallel),
same random ResNet-50 weights in the released layout:

* whole processes, each timed by this script from start to exit (interpreter start-up and model
  loading included) and timing its own loop: the naive recipe (``ImageFolder`` + the transfer
  transform + ``DataLoader(num_workers=cores, pin_memory=True)`` + torchvision ``resnet50``, fp32
  or fp16 autocast) and ``trex-extract`` (``--precision fp32`` / ``fp16``, with each decoder
  of ``--decoders``: ``gpu`` (nvJPEG), ``cpu`` (worker processes), ``hybrid`` (both at once));
* model-only: images/s of the network alone on a batch already on the GPU, naive fp32 / fp16
  autocast against the prepared model in fp32 / tf32 / bf16 / fp16, fp32 also in NCHW layout,
  fp32 / fp16 also with ``cudnn.benchmark`` (and ``torch.compile`` fp16 with ``--compile``);
* features: max relative difference of every run against the naive fp32 features.

``--rounds N`` runs every side N times, the order reversed in every other round (the first side
of one round is the last of the next), and reports each side's best and median; the ratios use
the medians.

Prints a markdown section and writes it into docs/benchmarks.md (between the ``gpu-bench``
markers; ``--md`` also writes it to a file). Without CUDA it refuses in one line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from extract_bench import FAILED_TAIL, last_line, run_timed  # noqa: E402

START, END = "<!-- gpu-bench:start -->", "<!-- gpu-bench:end -->"


def make_many_photos(folder: Path, n: int, size=(500, 375), jobs: int = 8) -> int:
    from extract_bench import make_photos_parallel

    done = folder / f".complete-{n}"
    if not done.exists():
        make_photos_parallel(folder, n, size=size, seed=1000, jobs=jobs)
        done.write_text("ok")
    return sum(1 for _ in folder.rglob("*.jpg"))


# --------------------------------------------------------------------------- children -------
def child_naive(args) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from extract_bench import naive_model

    imported = time.time()  # wall clock: the parent compares it with when it started us
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    model = naive_model(Path(args.ckpt)).to(dev)
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(args.data, transform=tf)
    dl = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=False,
                    pin_memory=cuda)
    outs = []
    t0, loop_start = time.perf_counter(), time.time()
    with torch.no_grad(), torch.autocast(dev.type, torch.float16 if cuda else torch.bfloat16,
                                         enabled=args.precision == "fp16"):
        for x, _ in dl:
            outs.append(model(x.to(dev, non_blocking=True)).float().cpu())
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    np.save(args.out, torch.cat(outs).numpy())
    rels = [os.path.relpath(path, args.data) for path, _ in ds.samples]
    Path(args.out + ".paths.json").write_text(json.dumps(rels))
    return {"loop_s": secs, "images": len(ds), "imported": imported, "loop_start": loop_start}


def run_naive(ckpt, data, out, precision, batch, workers, device="cuda",
              timeout=600.0) -> dict:
    cmd = [sys.executable, __file__, "--child", "--ckpt", str(ckpt), "--data", str(data),
           "--out", str(out), "--precision", precision, "--batch-size", str(batch),
           "--workers", str(workers), "--device", device]
    t, spawned = time.perf_counter(), time.time()
    res = run_timed(cmd, timeout)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"naive {precision} failed:\n{res.stderr[-FAILED_TAIL:]}")
    got = json.loads(res.stdout.strip().splitlines()[-1])
    imports, before = got["imported"] - spawned, got["loop_start"] - got["imported"]
    return {"in_loop": got["images"] / got["loop_s"], "whole_s": wall, "images": got["images"],
            "imports_s": imports, "setup_s": before, "loop_s": got["loop_s"],
            "rest_s": wall - imports - before - got["loop_s"]}


def run_ours(ckpt, data, out, precision, batch, extra=(), device="cuda",
             timeout=600.0) -> dict:
    cmd = [sys.executable, "-m", "trex_hub.cli.extract", str(ckpt), str(data), "-o", str(out),
           "-b", str(batch), "--precision", precision, "--overwrite", "--no-progress",
           "--chunk-size", str(batch * 16), "--device", device, "--debug", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH",
                                                                                  "")]))
    t = time.perf_counter()
    res = run_timed(cmd, timeout, env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"trex-extract {precision} {extra} failed:\n"
                           f"{res.stderr[-FAILED_TAIL:]}")
    # "..., X img/s (Y img/s in the batch loop)": X counts the one-off steps of the run too
    # (weights digest, model preparation, merge), Y only the loop, as the naive side times
    rates = re.findall(r"([\d.]+) img/s \(([\d.]+) img/s in the batch loop\)", res.stderr)
    n = re.findall(r"(\d+) images ->", res.stderr)
    nan = float("nan")
    out = {"in_loop": float(rates[-1][1]) if rates else nan,
           "extract": float(rates[-1][0]) if rates else nan, "whole_s": wall,
           "images": int(n[-1]) if n else 0}
    out.update(timing(res.stderr, wall))
    out.update(decoding(res.stderr))
    return out


def decoding(stderr: str) -> dict:
    """What trex-extract's ``--debug`` says of its decoding: the path, and for ``hybrid`` the
    batches each lane took (``{"decoding": "hybrid", "lanes": {"cpu": 13, "gpu": 27}}``)."""
    got = re.findall(r"decoding: (\w+)(?:, batches by lane: ([\w ,]+))?$", stderr, re.M)
    if not got:
        return {}
    kind, lanes = got[-1]
    out: dict = {"decoding": kind}
    if lanes:
        out["lanes"] = {k: int(v) for k, v in (part.split() for part in lanes.split(", "))}
    return out


def timing(stderr: str, wall: float) -> dict:
    """Where trex-extract's whole process went, from its ``--debug`` timing line."""
    got = re.findall(r"timing: start-up \(interpreter, torch\) ([\d.]+) s, imports ([\d.]+) s, "
                     r"inputs ([\d.]+) s, model ([\d.]+) s, waiting for CUDA ([\d.]+) s, extract "
                     r"([\d.]+) s \(batch loop ([\d.]+) s\), main ([\d.]+) s", stderr)
    if not got:
        return {}
    start, imports, inputs, model, cuda, extract, loop, main = map(float, got[-1])
    return {"imports_s": start + imports, "setup_s": inputs + model + cuda,
            "oneoff_s": extract - loop, "loop_s": loop, "rest_s": wall - start - main}


def model_only(ckpt: Path, batch: int, compile_: bool, log, device: str = "cuda",
               reps: int = 20) -> dict:
    import trex_hub
    from extract_bench import naive_model
    from trex_hub.inference import prepare

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    xd = torch.randn(batch, 3, 224, 224, device=dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn):
        for _ in range(3):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return batch * reps / (time.perf_counter() - t)

    naive = naive_model(ckpt).to(dev)
    res = {}
    with torch.no_grad():
        res["naive fp32"] = timed(lambda: naive(xd))
        if cuda:
            with torch.autocast("cuda", torch.float16):
                res["naive fp16 autocast"] = timed(lambda: naive(xd))
    model = trex_hub.load(ckpt)
    for prec in (("fp32", "tf32", "bf16", "fp16") if cuda else ("fp32",)):
        r = prepare(model, dev, prec)
        res[f"trex_hub {prec}"] = timed(lambda: r.forward(xd))
    if cuda:  # IEEE fp32 convolutions may prefer the other layout (not measured yet)
        r = prepare(model, dev, "fp32", channels_last=False)
        res["trex_hub fp32 NCHW"] = timed(lambda: r.forward(xd))
        # cuDNN's autotuner instead of its heuristics (trex-extract leaves it off: its search
        # costs seconds per batch shape). The first call runs the search (these shapes already
        # ran without it, so the rest of a first call's cost is paid): timed apart, so that a
        # run of N images can weigh the search against the steady-state gain
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            for prec in ("fp32", "fp16"):
                r = prepare(model, dev, prec)
                t = time.perf_counter()
                r.forward(xd)
                sync()
                res[f"search_{prec}_s"] = time.perf_counter() - t
                res[f"trex_hub {prec} + cudnn.benchmark"] = timed(lambda: r.forward(xd))
        finally:
            torch.backends.cudnn.benchmark = before
    if compile_:
        t = time.perf_counter()
        try:
            r = prepare(model, dev, "fp16", compile=True)
            r.forward(xd)
            sync()
            res["compile_s"] = time.perf_counter() - t
            res["trex_hub fp16 + torch.compile"] = timed(lambda: r.forward(xd))
        except Exception as exc:  # report it; the other figures stand
            log(f"  torch.compile failed: {type(exc).__name__}: {str(exc)[:300]}")
    for k, v in res.items():
        log(f"  {k}: {v:,.0f}" + (" s" if k.endswith("_s") else " img/s"))
    return res


# ------------------------------------------------------------------------------- report ------
def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def combine(results: list) -> dict:
    """One side's rounds -> its medians (the ratios' basis), best and every value."""
    if not results:
        return {}
    out = {"rounds": len(results)}
    for key in ("in_loop", "extract", "whole_s", *PHASES):
        vals = [r[key] for r in results if key in r]
        if vals:
            out[key] = float(np.median(vals))
            out[key + "_all"] = vals
            out[key + "_best"] = min(vals) if key.endswith("_s") else max(vals)
    out["images"] = results[-1].get("images", 0)
    lanes = [r["lanes"] for r in results if "lanes" in r]
    if lanes:
        out["lanes_all"] = lanes
    return out


PHASES = {"imports_s": "interpreter + imports",
          "setup_s": "inputs + model + waiting for CUDA (naive: + DataLoader)",
          "oneoff_s": "extract's one-off steps (digest, model to device, merge)",
          "loop_s": "loop", "rest_s": "after: writing (naive), exit"}


def phases_table(runs: dict) -> list:
    """Markdown rows: each run's whole process cut into :data:`PHASES` (medians, s)."""
    rows = [(name, r) for name, r in runs.items() if "error" not in r and "loop_s" in r]
    if not rows:
        return []
    lines = ["", "Where each whole process's time went (medians, s; trex-extract from its "
             "`--debug` timing line, the naive loop from the times it reports):", "",
             "| run | " + " | ".join(PHASES.values()) + " | whole process |",
             "|---|" + "---|" * (len(PHASES) + 1)]
    for name, r in rows:
        cells = [f"{r[k]:.1f}" if k in r else "-" for k in PHASES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['whole_s']:.1f} |")
    return lines


def round_order(plan: list, k: int) -> list:
    """Round k (0-based) runs the plan forwards when k is even, backwards when it is odd."""
    return list(plan) if k % 2 == 0 else list(reversed(plan))


def _fmt(r: dict, key: str, spec: str) -> str:
    if key not in r:
        return "-"
    if r.get("rounds", 1) > 1:
        return f"{r[key + '_best']:{spec}} / {r[key]:{spec}}"
    return f"{r[key]:{spec}}"


def render(env: dict, runs: dict, errs: dict, mo: dict) -> str:
    nf, nh = runs.get("naive fp32", {}), runs.get("naive fp16", {})
    rounds = env.get("rounds", 1)
    how = ("One run of each side, in the order of the table." if rounds == 1 else
           f"{rounds} rounds, the order of the sides reversed in every other round; each cell "
           "is best / median, the ratios compare medians.")
    lines = [START, f"#### `make bench-gpu`: {env['device_kind']}, {env['gpu']}", "",
             f"{env['images']:,} JPEGs {env['size']}, batch {env['batch']}, {env['cores']} "
             f"cores (naive DataLoader workers = cores), torch {env['torch']}, "
             f"torchvision {env['torchvision']}, load average {env['load']}. {how} "
             f"`--decode auto` picks `{env.get('auto', '?')}` "
             "with this many workers. In the loop: the naive `DataLoader` loop; trex-extract's "
             "batch loop (decoder start, forward passes, segment commits). Whole extract: "
             "trex-extract's own figure, which adds the run's one-off steps (weights digest, "
             "model preparation, merge into the output).", "",
             "| run | images/s in the loop | whole extract (images/s) | whole process (s) | "
             "vs naive, same precision (loop / whole process) | max rel. diff vs naive fp32 |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | - | - | - | - |")
            continue
        base = nh if "fp16" in name else nf
        ratio = (f"{r['in_loop'] / base['in_loop']:.2f}x / {base['whole_s'] / r['whole_s']:.2f}x"
                 if "in_loop" in base else "-")
        err = errs.get(name)
        lines.append(f"| {name} | {_fmt(r, 'in_loop', ',.0f')} | {_fmt(r, 'extract', ',.0f')} | "
                     f"{_fmt(r, 'whole_s', '.1f')} | {ratio} | "
                     f"{'-' if err is None else f'{err:.1e}'} |")
    split = [f"{name}: " + "; ".join(", ".join(f"{k} {v}" for k, v in sorted(lanes.items()))
                                     for lanes in r["lanes_all"])
             for name, r in runs.items() if r.get("lanes_all")]
    if split:
        lines += ["", "Batches each lane of `--decode hybrid` took (gpu: nvJPEG, cpu: the worker "
                  "processes; one entry per round): " + "; ".join(split) + "."]
    lines += phases_table(runs)
    lines += ["", "Model only (batch already on the device):", "", "| model | images/s |",
              "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in mo.items() if not k.endswith("_s")]
    searches = [f"{mo[f'search_{p}_s']:.1f} s ({p})" for p in ("fp32", "fp16")
                if f"search_{p}_s" in mo]
    if searches:
        lines.append(f"\nThe first batch with `cudnn.benchmark` (its autotuner's search) took "
                     f"{' and '.join(searches)}.")
    if "compile_s" in mo:
        lines.append(f"\n`torch.compile` took {mo['compile_s']:.0f} s before the first batch.")
    lines += ["", "Targets (issue 11): trex-extract fp16 in the loop >= 2x naive fp16 and >= "
              "3,500 images/s; whole process >= 1.5x naive; fp32 >= 1.5x naive fp32; fp32 "
              "features within 1e-5 of the CPU (tests), fp16 / GPU decoding within 1e-2.", END]
    return "\n".join(lines) + "\n"


def write_docs(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--size", default="500x375")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="naive DataLoader workers "
                                                              "(default: cores)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (model)")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each side, the order reversed every other round (1)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--md", default=None, help="also write the markdown section here")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--run-timeout", type=float, default=300.0,
                   help="seconds one run may take before it counts as failed (300)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run
    p.add_argument("--skip-model-only", action="store_true",
                   help="leave out the model-only figures")
    p.add_argument("--decoders", default="gpu,cpu,hybrid",
                   help="trex-extract's --decode values to time, each at fp32 and fp16 "
                        "(default gpu,cpu,hybrid)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("extract_gpu_bench: no CUDA device here; this benchmark needs a GPU (nothing "
              "measured)", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(child_naive(args)))
        return 0

    import torchvision

    from trex_hub import read_features
    from trex_hub.decoding import available_cores

    def log(msg: str) -> None:
        print(msg, flush=True)

    cores = available_cores()
    workers = args.workers or cores
    w, h = (int(v) for v in args.size.lower().split("x"))
    from extract_bench import bench_workdir

    work, ckpt = bench_workdir(args.work_dir, "trex-gpu-")
    data = work / f"photos-{w}x{h}-{args.images}"
    t = time.perf_counter()
    n = make_many_photos(data, args.images, (w, h), jobs=cores)
    log(f"{n} photos in {data} ({time.perf_counter() - t:.0f} s)")
    cuda = args.device == "cuda"
    env = {"gpu": torch.cuda.get_device_name(0) if cuda else "CPU dry run",
           "device_kind": "CUDA" if cuda else "CPU", "images": n, "size": f"{w}x{h}",
           "batch": args.batch_size, "cores": cores, "torch": torch.__version__,
           "torchvision": torchvision.__version__,
           "load": " ".join(f"{v:.1f}" for v in os.getloadavg()), "rounds": args.rounds}
    from trex_hub.extract import GPU_DECODE_BELOW_WORKERS

    env["auto"] = "gpu" if cuda and workers < GPU_DECODE_BELOW_WORKERS else "cpu"
    results, failed, outs = {}, {}, {}
    # explicit decoders: --decode auto picks gpu or cpu by the number of workers. fp32 is bound
    # by the GPU's arithmetic (run 3): decoding on the CPU frees it; hybrid runs both at once
    decoders = [d for d in args.decoders.split(",") if d]
    unknown = sorted(set(decoders) - {"gpu", "cpu", "hybrid"})
    if unknown:
        p.error(f"--decoders: unknown {', '.join(unknown)} (gpu, cpu, hybrid)")
    plan = [("naive fp32", "naive", "fp32", ()), ("naive fp16", "naive", "fp16", ())]
    plan += [(f"trex-extract {prec} --decode {d}", "ours", prec, ("--decode", d))
             for prec in ("fp32", "fp16") for d in decoders]
    for k in range(max(1, args.rounds)):
        for name, kind, prec, extra in round_order(plan, k):
            if name in failed:  # a side that failed once is not retried
                continue
            out = work / (re.sub(r"\W+", "_", name) + ".npy")
            try:  # one failing run is reported in its row; the others still run
                r = (run_naive(ckpt, data, out, prec, args.batch_size, workers, args.device,
                               args.run_timeout) if kind == "naive"
                     else run_ours(ckpt, data, out, prec, args.batch_size, extra, args.device,
                                   args.run_timeout))
            except RuntimeError as exc:
                log(f"{name}: FAILED\n{exc}")
                failed[name] = {"error": last_line(str(exc))}
                continue
            results.setdefault(name, []).append(r)
            outs[name] = out
            log(f"round {k + 1} {name}: {r['in_loop']:,.0f} img/s in the loop, "
                f"{r['whole_s']:.1f} s whole process")
    runs = {name: failed[name] if name in failed else combine(results.get(name, []))
            for name, *_ in plan}
    errs = {}
    if "naive fp32" in outs:
        ref = np.load(outs["naive fp32"])
        order = {r: i for i, r in enumerate(json.loads(
            Path(str(outs["naive fp32"]) + ".paths.json").read_text()))}
        for name, out in outs.items():
            if name.startswith("naive"):
                feats = np.load(out)
            else:  # rows in the naive loop's order (ImageFolder's), by relative path
                feats, rows = read_features(out)
                idx = np.argsort([order[r["path"]] for r in rows])
                feats = np.asarray(feats)[idx]
            errs[name] = rel(np.asarray(feats), ref)
    mo = {}
    if args.skip_model_only:
        log("model only: skipped")
    else:
        log("model only, batch on the device")
        try:
            mo = model_only(ckpt, args.batch_size, args.compile, log, args.device,
                            reps=20 if cuda else 2)
        except Exception as exc:  # noqa: BLE001 - the extraction figures above still stand
            log(f"model only: FAILED: {type(exc).__name__}: {exc}")
    section = render(env, runs, errs, mo)
    print(section)
    if cuda:  # a CPU dry run never touches the docs
        write_docs(section, Path(args.docs))
    if args.md:
        Path(args.md).write_text(section)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "runs": runs, "errors": errs,
                                               "model_only": mo}, indent=2))
    return 0 if all("error" not in r for r in runs.values()) and (
        mo or args.skip_model_only) else 1


if __name__ == "__main__":
    sys.exit(main())
