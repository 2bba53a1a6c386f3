"""The batched multi-crop augmentation of ``trex-train --aug gpu``: its cost, and its share of a
t-ReX* training step.

    python benchmarks/augment_bench.py                        # CPU: small crops, a minute
    python benchmarks/augment_bench.py --device cuda --step   # GPU: the issue's batch of 128

One batch of photo-like 500x375 JPEGs, decoded and drawn by the loader's code
(``DecodedMultiCropDataset``, the t-ReX* crops: 1 x 224 px + 8 x 96 px), then augmented on the
device by two configurations of ``BatchAugment``, alternating from round to round:

* ``one crop per product`` (the baseline, and what the code did on CUDA until 2026-11-27): one
  crop + resize + flip product per crop and padded group, and Pillow's hue arithmetic computed
  pixel by pixel (``tensor_ops.hue_direct``). It is also what the CPU runs, where it is faster;
* ``as on CUDA``: all crops of one size in one horizontal and one vertical product per group,
  hue looked up (``tensor_ops.hue_lookup``); what the package runs on a GPU.

Both give the same crops (checked, bit for bit). Reported per configuration: the time of one
batch (best-of and median, the device synchronised), the number of tensor operations (kernels,
on CUDA) and the bytes they read and write (inputs + outputs of every operation; an in-place
operation's tensor counted once; a proxy for the memory traffic). With ``--step``: a t-ReX*
training step on those crops (online network forward and backward, the EMA network's forward on
the global crop, OCM memory, SGD, EMA update; AMP fp16 and channels_last on CUDA, as
``trex-train``), timed alone and after each augmentation, so the table gives augmentation's
share of the step and the step's images/s with each configuration; on CUDA also with the
augmentation on a stream of its own, running beside the step (is there room on the GPU to hide
it by augmenting one batch ahead?). With ``--breakdown``: where CUDA's configuration spends its
operations, bytes and time, stage by stage (crops, each colour operation, blur, normalisation,
and what ``BatchAugment`` does itself: the subset gathers and scatters, uploads and casts), each
stage timed with the device synchronised around it.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from extract_bench import cpu_model, make_photos  # noqa: E402
from trex_hub.datasets import LabeledImages  # noqa: E402
from trex_hub.train import tensor_ops as T  # noqa: E402
from trex_hub.train.augment import MultiCrop  # noqa: E402
from trex_hub.train.batch_augment import (BatchAugment, DecodedMultiCropDataset,  # noqa: E402
                                          collate_decoded)

SIDES = ("one crop per product", "as on CUDA")
# operations that only make a view or a fresh uninitialised / constant tensor: no traffic counted
FREE = {"view", "expand", "detach", "_unsafe_view", "t", "transpose", "slice", "select",
        "unsqueeze", "squeeze", "as_strided", "alias", "permute", "reshape", "unbind", "split",
        "split_with_sizes", "_reshape_alias", "lift_fresh", "empty", "empty_like",
        "empty_strided", "new_empty", "arange", "_local_scalar_dense"}


class OpCount(TorchDispatchMode):
    """Counts the tensor operations run inside it and the bytes of their inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0
        self.by_op: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE:
            return out
        seen, total = set(), 0
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))  # an in-place operation's tensor once
                total += t.numel() * t.element_size()
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        first = 0 if first is None else first.numel() * first.element_size()
        if name in ("index_copy_", "index_put_", "scatter_"):  # writes as much as it reads
            total += sum(a.numel() * a.element_size() for a in args[1:]
                         if isinstance(a, torch.Tensor)) - first
        elif name in ("index", "index_select"):  # a gather reads as much as it writes
            total += out.numel() * out.element_size() - first
        self.ops += 1
        self.bytes += total
        self.by_op[name] += total
        return out


# the tensor_ops functions BatchAugment calls, one stage each in --breakdown
STAGES = ("resized_crops", "brightness", "contrast", "saturation", "hue", "grayscale",
          "gaussian_blur", "solarize", "normalize")
OWN = "BatchAugment itself (subset gathers and scatters, uploads, casts)"


class StageCount(OpCount):
    """:class:`OpCount`, also per stage: the :data:`STAGES` function running, else :data:`OWN`."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = [OWN]
        self.stage_ops: Dict[str, int] = collections.Counter()
        self.stage_bytes: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ops, nbytes = self.ops, self.bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.stage_ops[self.stage[-1]] += self.ops - ops
        self.stage_bytes[self.stage[-1]] += self.bytes - nbytes
        return out


@contextmanager
def stages(device: torch.device, counter: Any = None):
    """Every :data:`STAGES` function of ``tensor_ops`` wrapped for the block: the seconds spent
    in each (the device synchronised before and after it) go to the yielded counter, and its
    operations to ``counter`` (a :class:`StageCount`) when given."""
    seconds: Dict[str, float] = collections.Counter()
    saved = {name: getattr(T, name) for name in STAGES}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if counter is not None:
                counter.stage.append(name)
            sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                seconds[name] += time.perf_counter() - t0
                if counter is not None:
                    counter.stage.pop()
        return run

    for name, fn in saved.items():
        setattr(T, name, wrap(name, fn))
    try:
        yield seconds
    finally:
        for name, fn in saved.items():
            setattr(T, name, fn)


def breakdown(aug: BatchAugment, batch: Dict[str, Any], device: torch.device,
              rounds: int) -> Dict[str, Dict[str, float]]:
    """Operations, bytes and median ms per stage of one batch in CUDA's configuration."""
    side = SIDES[1]
    with configuration(side, device):
        counter = StageCount()
        with stages(device, counter), counter:
            aug(batch)
        per_round: Dict[str, List[float]] = collections.defaultdict(list)
        for _ in range(rounds):
            with stages(device) as seconds:
                total = timed(lambda: aug(batch), device)
            for name in STAGES:
                per_round[name].append(seconds.get(name, 0.0))
            per_round[OWN].append(total - sum(seconds.values()))
    return {name: {"ops": counter.stage_ops.get(name, 0),
                   "bytes": counter.stage_bytes.get(name, 0),
                   "ms": 1e3 * statistics.median(per_round[name])}
            for name in (*STAGES, OWN)}


@contextmanager
def configuration(side: str, device: torch.device):
    """``BatchAugment`` as the package runs it on CUDA, or one crop per product + computed hue."""
    budget, hue = T.CROP_BYTES.get(device.type), T.hue
    if side == SIDES[0]:
        T.CROP_BYTES[device.type], T.hue = 1, T.hue_direct
    else:
        T.CROP_BYTES[device.type], T.hue = T.CROP_BYTES["cuda"], T.hue_lookup
    try:
        yield
    finally:
        T.hue = hue
        if budget is None:
            del T.CROP_BYTES[device.type]
        else:
            T.CROP_BYTES[device.type] = budget


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def make_batch(args: argparse.Namespace, mc: MultiCrop) -> Dict[str, Any]:
    folder = args.work_dir / "photos"
    if len(list(folder.rglob("*.jpg"))) < args.batch:
        make_photos(folder, args.batch)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))[:args.batch]
    data = LabeledImages(paths, np.arange(len(paths)) % 4, [str(i) for i in range(4)])
    ds = DecodedMultiCropDataset(data, mc, seed=0)
    batch = collate_decoded([ds[(1, i)] for i in range(len(paths))])
    if args.device.type == "cuda":  # as the DataLoader hands it over (pin_memory)
        batch = {k: ([t.pin_memory() for t in v] if isinstance(v, list) else v.pin_memory())
                 for k, v in batch.items()}
    return batch


def make_step(args: argparse.Namespace, mc: MultiCrop) -> Callable[[List[torch.Tensor],
                                                                     torch.Tensor], None]:
    """One t-ReX* training step, as trex-train runs it on this device."""
    from trex_hub.train.config import parse_args, projector_config
    from trex_hub.train.loop import build_optimizer
    from trex_hub.train.module import TrainModule

    targs = parse_args(["--preset", "trex_star", "--data", ".", "--output-dir", "."])
    dev, cuda = args.device, args.device.type == "cuda"
    module = TrainModule(args.arch, projector_config(targs), num_classes=1000, tau=targs.tau,
                         memory_size=targs.memory_size)
    torch.backends.cudnn.benchmark = cuda  # as trex-train without --deterministic
    fmt = torch.channels_last if cuda else torch.preserve_format
    module.to(dev, memory_format=fmt).train()
    opt = build_optimizer(module, targs, dev)  # fused on CUDA, momentum buffers zeroed
    for group in opt.param_groups:
        group["lr"] = 0.1
    scaler = torch.amp.GradScaler(dev.type, enabled=cuda)

    def step(crops: List[torch.Tensor], labels: torch.Tensor) -> None:
        with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
            loss, _, _ = module(crops, labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        module.update_ema(0.999)
    return step


def summary(values: List[float]) -> str:
    return f"{min(values) * 1e3:,.1f} / {statistics.median(values) * 1e3:,.1f}"


def table(header: str, rows: List[Tuple[str, List[float], Callable[[float], str]]]) -> None:
    """A markdown table: per row its label, best / median ms, its own cells (from the median)
    and the ratio of the first row's median to its median."""
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    base = statistics.median(rows[0][1])
    for label, values, cells in rows:
        med = statistics.median(values)
        print(f"| {label} | {summary(values)} | {cells(med)} | {base / med:.2f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (CUDA 128, CPU 16)")
    ap.add_argument("--global-size", type=int, default=None, help="global crop px (CUDA 224, "
                    "CPU 112)")
    ap.add_argument("--local-size", type=int, default=None, help="local crop px (CUDA 96, CPU 48)")
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--step", action="store_true", help="also time a t-ReX* training step")
    ap.add_argument("--breakdown", action="store_true",
                    help="also each stage's operations, bytes and time (CUDA's configuration)")
    ap.add_argument("--arch", default=None, help="network of --step (CUDA resnet50, CPU "
                    "resnet18)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/trex-augment-bench"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(name)
    cuda = args.device.type == "cuda"
    args.batch = args.batch or (128 if cuda else 16)
    args.global_size = args.global_size or (224 if cuda else 112)
    args.local_size = args.local_size or (96 if cuda else 48)
    args.arch = args.arch or ("resnet50" if cuda else "resnet18")
    args.work_dir.mkdir(parents=True, exist_ok=True)

    mc = MultiCrop(global_size=args.global_size, global_scale=(0.4, 1.0),
                   local_size=args.local_size, local_scale=(0.05, 0.4), n_local=args.local_crops)
    batch = make_batch(args, mc)
    aug = BatchAugment(mc, args.device, channels_last=cuda)
    step = make_step(args, mc) if args.step else None
    machine = torch.cuda.get_device_name(args.device) if cuda else cpu_model()
    print(f"# {machine}; torch {torch.__version__}; batch {args.batch} photos 500x375, crops "
          f"1 x {args.global_size} + {args.local_crops} x {args.local_size} px; "
          f"{args.rounds} rounds", flush=True)

    outputs, counts = {}, {}
    for side in SIDES:  # warm-up (tables, cuDNN, allocator), outputs and operation counts
        with configuration(side, args.device):
            first = timed(lambda: aug(batch), args.device)
            crops, labels = aug(batch)
            print(f"# {side}: first batch {first:.2f} s", flush=True)
            if step is not None:
                # the first step on a fresh machine: cuDNN tries its algorithms for every
                # convolution (cudnn.benchmark, as trex-train), possibly compiling some
                first = timed(lambda: step(crops, labels), args.device)
                print(f"# {side}: {'first' if side == SIDES[0] else 'next'} training step "
                      f"{first:.2f} s", flush=True)
                step(crops, labels)
            sync(args.device)
            outputs[side] = [c.float().cpu() for c in crops]
            with OpCount() as c:
                aug(batch)
            counts[side] = c
    same = all(torch.equal(a, b) for a, b in zip(*outputs.values()))
    diff = max(float((a - b).abs().max()) for a, b in zip(*outputs.values()))

    times: Dict[str, List[float]] = {s: [] for s in SIDES}
    with_step: Dict[str, List[float]] = {s: [] for s in SIDES}
    beside: List[float] = []
    step_alone: List[float] = []
    side_stream = torch.cuda.Stream(args.device) if cuda and step is not None else None

    def next_beside_step() -> None:
        """The next batch's augmentation on a stream of its own while this batch's step runs
        (what a loader thread augmenting one batch ahead would give)."""
        with torch.cuda.stream(side_stream):
            aug(batch)
        step(crops, labels)
        torch.cuda.current_stream(args.device).wait_stream(side_stream)

    for r in range(args.rounds):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            with configuration(side, args.device):
                times[side].append(timed(lambda: aug(batch), args.device))
                if step is not None:
                    with_step[side].append(timed(lambda: step(*aug(batch)), args.device))
                if side_stream is not None and side == SIDES[1]:
                    beside.append(timed(next_beside_step, args.device))
        if step is not None:
            step_alone.append(timed(lambda: step(crops, labels), args.device))

    table("| augmentation | ms per batch, best / median | operations | bytes read + written "
          "(GB) | vs baseline, medians |",
          [(side, times[side], lambda med, side=side: f"{counts[side].ops:,} | "
            f"{counts[side].bytes / 1e9:.2f}") for side in SIDES])
    print(f"\nsame crops: {'yes, bit for bit' if same else f'no, max difference {diff:.3g}'}")
    result: Dict[str, Any] = {
        "machine": machine, "torch": torch.__version__, "device": args.device.type,
        "batch": args.batch, "same": same, "max_diff": diff,
        "aug_s": times, "ops": {s: counts[s].ops for s in SIDES},
        "bytes": {s: counts[s].bytes for s in SIDES}}
    if step is not None:
        alone = statistics.median(step_alone)
        print(f"\nt-ReX* training step ({args.arch}) alone: {summary(step_alone)} ms "
              f"({args.batch / alone:,.0f} images/s)")
        rows = [(side, with_step[side]) for side in SIDES]
        if beside:
            rows.append((f"{SIDES[1]}, on its own stream beside the step (the next batch's)",
                         beside))
        table("| augmentation + step | ms per batch, best / median | images/s (median) | "
              "augmentation's share | vs baseline, medians |",
              [(label, values, lambda med: f"{args.batch / med:,.0f} | "
                f"{100 * (1.0 - alone / med):.0f}%") for label, values in rows])
        result.update(step_alone_s=step_alone, with_step_s=with_step, beside_s=beside,
                      arch=args.arch)
    if args.breakdown:
        parts = breakdown(aug, batch, args.device, args.rounds)
        total_ms = sum(p["ms"] for p in parts.values())
        print(f"\n{SIDES[1]}, stage by stage (one batch; each stage timed alone, the device "
              "synchronised around it)")
        print("\n| stage | operations | bytes read + written (GB) | ms, median | share of "
              "the time |\n|---|---|---|---|---|")
        for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["ms"]):
            print(f"| {name} | {p['ops']:,} | {p['bytes'] / 1e9:.3f} | {p['ms']:,.1f} | "
                  f"{100 * p['ms'] / max(total_ms, 1e-12):.0f}% |")
        result["breakdown"] = parts
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
