"""Training throughput: trex-train's presets against a naive supervised loop, in one run.

    python benchmarks/train_bench.py                       # CPU: small defaults, a few minutes
    python benchmarks/train_bench.py --write-docs docs/benchmarks.md

Generates a JPEG ImageFolder of photo-like images (smooth colour fields, shapes and sensor noise,
500x375 by default; the generator of extract_bench.py), then times, each side as a whole fresh
subprocess, alternating the order of the sides from round to round:

* **naive**: the supervised loop a user would write: torchvision ``ImageFolder`` +
  ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``, a
  ``DataLoader`` (shuffle, same workers, pinned memory and persistent workers on CUDA), the
  torchvision network, SGD momentum 0.9, and on CUDA AMP fp16 + GradScaler and channels_last;
* **trex-train** with each preset (``baseline``, ``trex_star``, ``trex`` by default), same
  architecture, batch, workers and crop size, ``--no-val``, default ``--aug`` (``auto``: batched
  on the GPU with CUDA, PIL in the workers on CPU) unless ``--aug`` says otherwise. A preset
  written ``trex_star+compile`` also passes ``--compile`` (its run gets ``--compile-timeout``
  more seconds: compilation happens in epoch 1, which the steady state leaves out);
  ``trex_star+ahead`` passes ``--aug-ahead``; both may be combined (``trex_star+compile+ahead``).

Steady state: images/s over epochs 2..E (the first epoch, with start-up, worker spawning and
cuDNN autotuning, is left out); both sides time only their training steps (trex-train's
``images_per_s`` of log.jsonl; the naive loop the same way, synchronising CUDA at the epoch end).
trex-train's children read the loss at the first and last step of each epoch
(``--print-freq 1000000``): the last read synchronises at the epoch end as the naive loop does,
and the first line of a run gives its first batch's and first step's times (printed here).
Defaults follow the device: on CUDA the issue's setting (ResNet-50, 3,600 images, batch 128, up to
15 workers, 224/96 px crops, 3 epochs); on CPU a small one (ResNet-18, 48 images, batch 16,
2 workers, 112/48 px crops).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_bench import (FAILED_TAIL, cpu_model, last_line, make_photos,  # noqa: E402
                           make_photos_parallel, run_timed)


def make_folder(root: Path, n_train: int, size=(500, 375), classes: int = 4) -> Path:
    """``root/train/class{k}/*.jpg`` (n_train photos, written by all cores) and ``root/val``
    (one per class)."""
    make_photos_parallel(root / "train", n_train, size=size, classes=classes, seed=0)
    make_photos(root / "val", classes, size=size, classes=classes, seed=1)
    return root


# ------------------------------------------------------------------------------ children ----
def child_naive(args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    cuda = args.device == "cuda"
    dev = torch.device(args.device)
    tf = T.Compose([T.RandomResizedCrop(args.global_size), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(os.path.join(args.data, "train"), transform=tf)
    dl = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                    pin_memory=cuda, drop_last=True, persistent_workers=cuda and args.workers > 0)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = getattr(torchvision.models, args.arch)(num_classes=len(ds.classes))
    model = model.to(dev, memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    crit = torch.nn.CrossEntropyLoss()
    if cuda:
        torch.backends.cudnn.benchmark = True
    epochs = []
    for _ in range(args.epochs):
        t0, n = time.perf_counter(), 0
        for x, y in dl:
            x = x.to(dev, non_blocking=True, memory_format=fmt)
            y = y.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
                loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            n += x.shape[0]
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        epochs.append({"images": n, "seconds": secs, "images_per_s": n / secs})
    return {"epochs": epochs}


def child_trex(args: argparse.Namespace) -> Dict[str, Any]:
    from trex_hub.cli.train import main

    out = Path(tempfile.mkdtemp(prefix="trex-bench-", dir=args.work))
    preset, flags = split_preset(args.preset)
    argv = ["--preset", preset, *flags, "--arch", args.arch, "--data", args.data, "--output-dir",
            str(out), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--global-size", str(args.global_size),
            "--local-size", str(args.local_size), "--no-val",
            "--print-freq", "1000000",  # the first step of each epoch (with the start-up
            # times on the first) and the last: two reads of the loss per epoch
            "--warmup-epochs", "0", "--checkpoint-every", str(args.epochs),
            "--device", args.device, "--aug", args.aug]
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"trex-train exited with {rc}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"epochs": [{"images": None, "seconds": r["epoch_time_s"],
                        "images_per_s": r["images_per_s"]} for r in log]}


PRESET_OPTIONS = {"compile": ["--compile"], "ahead": ["--aug-ahead"],
                  # how loader workers start (trex-train --loader-start; auto: forkserver on CUDA)
                  "fork": ["--loader-start", "fork"], "spawn": ["--loader-start", "spawn"]}


def split_preset(spec: str):
    """``"trex_star+compile+ahead"`` -> ``("trex_star", ["--compile", "--aug-ahead"])``."""
    preset, *extras = spec.split("+")
    unknown = [e for e in extras if e not in PRESET_OPTIONS]
    if unknown:
        raise SystemExit(f"train_bench: unknown preset option(s) {unknown} in {spec!r} "
                         f"(known: {', '.join('+' + k for k in PRESET_OPTIONS)})")
    return preset, [flag for e in extras for flag in PRESET_OPTIONS[e]]


def run_child(side: str, opts: argparse.Namespace, work: Path) -> Dict[str, Any]:
    kind, _, preset = side.partition(":")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--child-preset", preset or "-", "--data", str(opts.data), "--work", str(work),
           "--arch", opts.arch, "--epochs", str(opts.epochs), "--batch-size",
           str(opts.batch_size), "--workers", str(opts.workers), "--global-size",
           str(opts.global_size), "--local-size", str(opts.local_size), "--device", opts.device,
           "--aug", opts.aug]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    compiled = "--compile" in split_preset(preset or "-")[1]
    timeout = opts.run_timeout + (opts.compile_timeout if compiled else 0)
    proc = run_timed(cmd, timeout, env)
    if proc.returncode != 0:  # a hung child's stderr holds its stacks, then "timed out after"
        error = Hung if proc.returncode == 124 else RuntimeError
        raise error(f"{side} failed:\n{proc.stderr[-FAILED_TAIL:]}")
    for line in proc.stderr.splitlines():  # trex-train's start: loader, first step (cuDNN)
        if "first step" in line:
            print(f"[train-bench] {side}: {line.strip()}", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Hung(RuntimeError):
    """A side ran past its time limit (its stacks are in the message)."""


def steady(result: Dict[str, Any]) -> float:
    """images/s over epochs 2..E: total images / total seconds (per-epoch rates weighted)."""
    rest = result["epochs"][1:] or result["epochs"]
    secs = sum(e["seconds"] for e in rest)
    imgs = sum(e["images_per_s"] * e["seconds"] for e in rest)
    return imgs / max(secs, 1e-9)


# ------------------------------------------------------------------------------ report ------
def render(results: Dict[str, List[float]], opts: argparse.Namespace, machine: str,
           command: str, errors: Optional[Dict[str, str]] = None) -> str:
    errors = errors or {}
    base = statistics.median(results["naive"]) if results.get("naive") else None
    lines = [f"Machine: {machine}. torch {opts.torch_version}, {opts.device}. "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "```bash", command, "```", "",
             f"{opts.arch}, {opts.images} photo-like JPEGs (500x375) per epoch, batch "
             f"{opts.batch_size}, {opts.workers} loader workers, crops {opts.global_size} px "
             f"(local {opts.local_size} px), {opts.epochs} epochs; images/s of epochs "
             f"2-{opts.epochs} (steady state), one value per round, rounds alternate the order.",
             "", "| side | images/s per round | median | vs naive |", "|---|---|---|---|"]
    for side, vals in results.items():
        if not vals:
            lines.append(f"| {side} | failed: {errors.get(side, '?')} | - | - |")
            continue
        med = statistics.median(vals)
        ratio = f"{med / base:.2f}x" if base else "-"
        if side == "naive":
            name = "naive supervised loop"
        else:
            preset, flags = split_preset(side.split(":")[1])
            name = f"`trex-train --preset {' '.join([preset, *flags])}` (--aug {opts.aug})"
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in vals)} | {med:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, key: str, block: str) -> None:
    """Replace (or add) the ``key`` results block of the "## Training" section of ``path``."""
    text = path.read_text() if path.exists() else ""
    begin, end = f"<!-- train_bench:{key}:begin -->", f"<!-- train_bench:{key}:end -->"
    body = f"{begin}\n{block}{end}\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?",
                      lambda _m: body, text, flags=re.S)
    else:
        if "\n## Training" not in text:
            text = text.rstrip("\n") + "\n\n## Training\n\n"
        head, _, tail = text.partition("\n## Training")
        section, sep, rest = tail.partition("\n## ")
        text = head + "\n## Training" + section.rstrip("\n") + "\n\n" + body + \
            (("\n## " + rest) if sep else "")
    path.write_text(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--images", type=int, default=None, help="training images per epoch")
    p.add_argument("--arch", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--global-size", type=int, default=None)
    p.add_argument("--local-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="rounds of all sides (CUDA 2, CPU 1)")
    p.add_argument("--presets", default="baseline,trex_star,trex")
    p.add_argument("--aug", default="auto", choices=("auto", "cpu", "gpu"))
    p.add_argument("--work-dir", default=None, help="data and runs (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--run-timeout", type=float, default=900.0,
                   help="seconds one side's run may take before it counts as failed (900)")
    p.add_argument("--compile-timeout", type=float, default=300.0,
                   help="extra seconds for a +compile side's run (300)")
    p.add_argument("--retry-hung", type=int, default=1,
                   help="times a side that ran past its limit is tried again (1); its stacks "
                        "are logged either way")
    p.add_argument("--write-docs", default=None, metavar="MD",
                   help="put the table into the Training section of this file")
    # children
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.child == "naive":  # a user's script: Python's own exit
        print(json.dumps(child_naive(opts)), flush=True)
        return 0
    if opts.child:  # trex-train, ending as the program does, on success and on failure alike
        from trex_hub.cli.common import exit_now

        opts.preset = opts.child_preset
        try:
            print(json.dumps(child_trex(opts)), flush=True)
        except SystemExit as exc:
            print(exc, file=sys.stderr, flush=True)
            exit_now(1)
        exit_now(0)

    import torch

    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = opts.device == "cuda"
    defaults = ({"images": 3600, "arch": "resnet50", "batch_size": 128,
                 "workers": max(1, min(15, (os.cpu_count() or 2) - 1)), "global_size": 224,
                 "local_size": 96, "rounds": 2} if cuda else
                {"images": 48, "arch": "resnet18", "batch_size": 16, "workers": 2,
                 "global_size": 112, "local_size": 48, "rounds": 1})
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    opts.torch_version = torch.__version__
    machine = f"{os.cpu_count()} CPU threads of {cpu_model()}"
    if cuda:
        machine = f"{torch.cuda.get_device_name(0)}, " + machine
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    opts.data = make_folder(work / "data", opts.images)
    sides = ["naive"] + [f"trex:{p}" for p in opts.presets.split(",") if p]
    for side in sides[1:]:
        split_preset(side.split(":")[1])  # a typo stops here, before any data is made
    results: Dict[str, List[float]] = {s: [] for s in sides}
    errors: Dict[str, str] = {}
    retried: Dict[str, int] = {}  # side -> hung runs tried again
    print(f"[train-bench] {machine}; {opts.arch}, {opts.images} images, batch "
          f"{opts.batch_size}, {opts.workers} workers, {opts.epochs} epochs", file=sys.stderr)
    for r in range(opts.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            t0 = time.time()
            try:  # a failing side is reported in its row; the others still run
                try:
                    res = run_child(side, opts, work)
                except Hung as exc:
                    if retried.get(side, 0) >= opts.retry_hung:
                        raise
                    # two H100 runs hung in the first trex-train child of their call and
                    # never again after: one more try keeps the figure (the stacks are logged)
                    retried[side] = retried.get(side, 0) + 1
                    print(f"[train-bench] round {r + 1} {side}: HUNG, trying once more\n{exc}",
                          file=sys.stderr, flush=True)
                    res = run_child(side, opts, work)
            except RuntimeError as exc:
                print(f"[train-bench] round {r + 1} {side}: FAILED\n{exc}", file=sys.stderr,
                      flush=True)
                errors[side] = last_line(str(exc))
                continue
            results[side].append(steady(res))
            if opts.json:  # so far, in case a later side outlives the caller's patience
                Path(opts.json).write_text(json.dumps({"machine": machine, "partial": True,
                                                       "results": results, "errors": errors},
                                                      indent=1))
            print(f"[train-bench] round {r + 1} {side}: {results[side][-1]:.1f} images/s "
                  f"(run {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    given = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    command = f"python benchmarks/train_bench.py {given}".strip()
    block = render(results, opts, machine, command, errors)
    print(block)
    if opts.json:
        Path(opts.json).write_text(json.dumps({"machine": machine, "results": results,
                                               "errors": errors,
                                               "options": {k: str(v) for k, v in
                                                           vars(opts).items()}}, indent=1))
    if opts.write_docs:
        write_docs(Path(opts.write_docs), "cuda" if cuda else "cpu", block)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
