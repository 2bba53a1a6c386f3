"""Options of ``trex-train``: every hyper-parameter of the recipe, with the paper's defaults, and the
presets that fill the ones that differ between t-ReX, t-ReX* and the plain supervised baseline."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..cli.common import add_debug_flag, float_in, int_at_least

# how data-loader workers start (trex_hub.train.data.worker_start_method)
LOADER_STARTS = ("auto", "fork", "forkserver", "spawn")

PRESETS: Dict[str, Dict[str, Any]] = {
    # t-ReX: 3 hidden projector blocks, global crops (0.25, 1), local crops (0.05, 0.25)
    "trex": {"projector_layers": 3, "no_projector": False, "global_scale": (0.25, 1.0),
             "local_scale": (0.05, 0.25), "local_crops": 8, "memory_size": 8192,
             "classifier": "cosine", "simple_aug": False},
    # t-ReX*: 1 hidden projector block, global crops (0.40, 1), local crops (0.05, 0.40)
    "trex_star": {"projector_layers": 1, "no_projector": False, "global_scale": (0.40, 1.0),
                  "local_scale": (0.05, 0.40), "local_crops": 8, "memory_size": 8192,
                  "classifier": "cosine", "simple_aug": False},
    # plain supervised: no projector, one crop (random-resized-crop + flip), linear classifier
    "baseline": {"projector_layers": 0, "no_projector": True, "global_scale": (0.08, 1.0),
                 "local_scale": (0.05, 0.25), "local_crops": 0, "memory_size": 0,
                 "classifier": "linear", "simple_aug": True},
}
PRESET_ALIASES = {"trex-star": "trex_star", "trexstar": "trex_star", "t-rex": "trex",
                  "t-rex*": "trex_star", "supervised": "baseline"}

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")

DESCRIPTION = """\
Train t-ReX / t-ReX* (Sariyildiz et al., ICLR 2023) or a plain supervised baseline.

Recipe (defaults = the paper's ImageNet-1K recipe, 4 GPUs x 64 images):
  network    torchvision ResNet (--arch) + expendable projector: L2-norm -> L x
             [Linear(2048) -> BatchNorm1d -> GELU] -> Linear(256, no bias); L=3 (t-ReX) or 1 (t-ReX*)
  classifier cosine softmax, tau 0.1, over OCM prototypes: the L2-normalised per-class sums of a
             FIFO memory of 8192 EMA-projector outputs on the global crops (all processes, rank
             order); prototypes are computed before each step's memory update.
             --memory-size 0: a learnable cosine classifier instead.
  EMA        full copy of backbone + projector, p_ema = 0.999 p_ema + 0.001 p (parameters only,
             batch statistics in train mode)
  crops      1 global 224 px + 8 local 96 px, RandomResizedCrop (bicubic); scales t-ReX global
             (0.25, 1) local (0.05, 0.25), t-ReX* global (0.40, 1) local (0.05, 0.40); every crop:
             flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2; global crops blur 0.2 +
             solarise 0.2, local crops blur 0.5. The backbone runs once per crop resolution, the
             projector once over all crops; cross-entropy over all crops, equal weights.
  optimiser  SGD momentum 0.9 (not Nesterov), weight decay 1e-4 on ndim > 1 parameters only;
             lr 0.1 x global batch / 256, set every iteration: 10 warm-up epochs from 0, then
             cosine to 1e-6; 100 epochs; drop_last.
  precision  fp16 autocast + GradScaler on CUDA; fp32 (or --amp bf16) on CPU.
  multi-GPU  torchrun --nproc_per_node=N [--nnodes ...] -m trex_hub.cli.train ...: DDP (NCCL on
             GPUs, gloo on CPU) with SyncBatchNorm on CUDA; on CPU/gloo each process keeps
             per-process BatchNorm statistics (SyncBatchNorm needs CUDA) and DDP broadcasts rank
             0's running statistics every step.

Outputs in --output-dir (default runs/trex, whatever the preset): checkpoint.pth (released
full-checkpoint layout, written atomically every epoch; trex_hub.load(path, projector=True) reads
it), log.jsonl (one JSON line per epoch: loss, top-1, lr, images/s), and with --resume the run
continues where it stopped (bit for bit on CPU; on CUDA with --deterministic). A folder that holds
a run is refused unless --resume continues it or --overwrite replaces it.

Export for the zoo:  trex-train export OUTPUT_DIR/checkpoint.pth EXPORT_DIR
"""

EPILOG = """\
Presets (--preset, default trex):
  trex       projector L=3, global scale (0.25, 1), local scale (0.05, 0.25), OCM memory 8192
  trex_star  projector L=1, global scale (0.40, 1), local scale (0.05, 0.40), OCM memory 8192
  baseline   no projector, one crop (RandomResizedCrop (0.08, 1) + flip only), no local crops,
             learnable linear classifier with bias (plain supervised training)
Any option given explicitly overrides the preset.

Examples:
  # t-ReX* on ImageNet-1K, 4 GPUs
  torchrun --nproc_per_node=4 -m trex_hub.cli.train --preset trex_star --data /data/imagenet \\
      --output-dir runs/trex_star
  # small CPU run: 1,000 Fashion-MNIST images of classes 0-4, 3 epochs of 31 steps, 2 workers
  trex-train --preset trex_star --arch resnet18 --dataset fashion-mnist --classes 0-4 \\
      --train-limit 1000 --global-size 16 --local-size 8 --epochs 3 --warmup-epochs 1 \\
      --batch-size 32 --workers 2 --output-dir runs/fm
  trex-train export runs/fm/checkpoint.pth exported/fm
"""


# ---------------------------------------------------------------------------------------------
# typed options: a bad value is a usage error naming the option and what it takes (argparse adds
# "argument --OPTION:"), instead of a library error deep in the run or a run that means nothing
# ---------------------------------------------------------------------------------------------
_positive = int_at_least(1)
_count = int_at_least(0)
_seed = int_at_least(0, 2**32 - 1)  # numpy's seeds
_scale = float_in(0.0, 1.0, open_low=True, open_high=False)  # a share of the image area
_fraction = float_in(0.0, 1.0)  # a momentum: 1 would never move
_non_negative = float_in(0.0)
_positive_float = float_in(0.0, open_low=True)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0 (0: no limit), got {text!r}")
    return value


def build_parser(prog: str = "trex-train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="trex",
                   help="trex | trex_star | baseline (default: trex)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="ImageFolder root with train/ and val/ (or test/) class folders; for "
                        "--dataset fashion-mnist the folder of the idx files (default "
                        "/usr/share/datasets/fashion-mnist or $TREX_FASHION_MNIST)")
    g.add_argument("--dataset", default="imagefolder", choices=("imagefolder", "fashion-mnist"),
                   help="what --data holds (imagefolder)")
    g.add_argument("--classes", default=None,
                   help="train on a class subset, e.g. 0-4 or 0,3,7 (relabelled 0..k-1; "
                        "default: all classes)")
    g.add_argument("--train-limit", type=_positive, default=None,
                   help="use a seeded class-balanced subset of this many training images "
                        "(default: all)")
    g.add_argument("--val-limit", type=_positive, default=None,
                   help="use a seeded class-balanced subset of this many validation images "
                        "(default: all)")
    g.add_argument("--data-seed", type=_seed, default=0,
                   help="seed of the --train-limit / --val-limit subsets (0; kept apart from "
                        "--seed so that runs with different seeds see the same images)")
    g.add_argument("--no-val", action="store_true", help="skip validation")
    g.add_argument("--workers", type=_count, default=8,
                   help="data-loader processes per GPU/process (8; 0: load in the training "
                        "process)")
    g.add_argument("--loader-start", choices=LOADER_STARTS,
                   default="auto",
                   help="how loader workers start (auto: the platform's default, fork on "
                        "Linux; forkserver hung the t-ReX* benchmark on an H200)")
    g.add_argument("--prefetch-factor", type=_positive, default=4,
                   help="batches each (persistent) loader worker prepares ahead (4)")
    g.add_argument("--loader-timeout", type=_seconds, default=600.0, metavar="SECONDS",
                   help="stop with an error when the loader workers deliver no batch for this "
                        "long, instead of waiting for ever on a stuck worker (600; 0: no limit)")

    g = p.add_argument_group("network")
    g.add_argument("--arch", default="resnet50", choices=ARCHS,
                   help="torchvision ResNet backbone (resnet50)")
    g.add_argument("--projector-layers", type=_count, default=None,
                   help="hidden projector blocks L (preset: 3 t-ReX, 1 t-ReX*)")
    g.add_argument("--no-projector", action="store_true", default=None,
                   help="no projector: the classifier sits on the pooled backbone feature")
    g.add_argument("--projector-hidden", type=_positive, default=2048, help="hidden width (2048)")
    g.add_argument("--projector-dim", type=_positive, default=256, help="bottleneck width (256)")
    g.add_argument("--no-projector-l2-norm", dest="projector_l2_norm", action="store_false",
                   help="do not L2-normalise the projector input (normalised by default)")
    g.add_argument("--tau", type=_positive_float, default=0.1,
                   help="cosine softmax temperature (0.1)")
    g.add_argument("--memory-size", type=_count, default=None,
                   help="OCM memory entries (preset: 8192, baseline 0); 0 = learnable "
                        "classifier (--classifier)")
    g.add_argument("--classifier", choices=("cosine", "linear"), default=None,
                   help="classifier when --memory-size is 0 (cosine for trex*, linear for baseline)")
    g.add_argument("--ema-momentum", type=_fraction, default=0.999, help="EMA momentum (0.999)")

    g = p.add_argument_group("multi-crop augmentation")
    g.add_argument("--global-crops", type=_positive, default=1, help="global crops per image (1)")
    g.add_argument("--global-size", type=_positive, default=224, help="global crop size (224)")
    g.add_argument("--global-scale", type=_scale, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop scale of global crops (preset)")
    g.add_argument("--local-crops", type=_count, default=None,
                   help="local crops per image (preset: 8, baseline 0)")
    g.add_argument("--local-size", type=_positive, default=96, help="local crop size (96)")
    g.add_argument("--local-scale", type=_scale, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop scale of local crops (preset)")
    g.add_argument("--blur-radius", type=_non_negative, nargs=2, default=(0.1, 2.0),
                   metavar=("MIN", "MAX"), help="Gaussian blur radius range in pixels (0.1 2.0)")
    g.add_argument("--simple-aug", action="store_true", default=None,
                   help="crop + flip only (no colour jitter, grayscale, blur, solarise)")
    g.add_argument("--aug", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where the crops are made (auto): cpu = PIL in the loader workers; "
                        "gpu = the workers only decode, the crops are made batched on the "
                        "training device (on a CPU-only machine: batched on the CPU); auto = gpu "
                        "on CUDA, cpu elsewhere. Same random draws either way (docs/training.md)")
    g.add_argument("--aug-ahead", action="store_true",
                   help="--aug gpu: augment the next batch while this one trains, on a CUDA "
                        "stream of its own (same crops; off by default until measured on a GPU: "
                        "benchmarks/augment_bench.py --step)")
    g.add_argument("--no-jpeg-draft", action="store_true",
                   help="--aug gpu: always decode JPEGs at full size (by default a large JPEG is "
                        "decoded at 1/2-1/8 scale when every crop still shrinks >= 2x after it)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=_positive, default=100, help="epochs (100)")
    g.add_argument("--batch-size", type=_positive, default=64, help="images per process (64)")
    g.add_argument("--lr", type=_non_negative, default=0.1,
                   help="learning rate per --lr-ref-batch images (0.1)")
    g.add_argument("--lr-ref-batch", type=_count, default=256,
                   help="linear scaling: peak lr = lr x global batch / this (256; 0 = no scaling)")
    g.add_argument("--warmup-epochs", type=_non_negative, default=10.0,
                   help="linear warm-up from 0 (10 epochs)")
    g.add_argument("--min-lr", type=_non_negative, default=1e-6,
                   help="final lr of the cosine (1e-6)")
    g.add_argument("--momentum", type=_fraction, default=0.9,
                   help="SGD momentum (0.9, not Nesterov)")
    g.add_argument("--weight-decay", "--wd", type=_non_negative, default=1e-4,
                   help="weight decay on parameters with ndim > 1 (1e-4)")
    g.add_argument("--wd-all", action="store_true",
                   help="also decay biases and 1-D (BatchNorm) parameters")
    g.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto",
                   help="autocast (auto: fp16 + GradScaler on CUDA, fp32 on CPU)")
    g.add_argument("--sync-bn", choices=("auto", "on", "off"), default="auto",
                   help="SyncBatchNorm under DDP (auto: on with CUDA; CPU cannot)")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/trex",
                   help="checkpoints and logs (runs/trex, whatever the preset: give each run "
                        "its own folder; one that holds another run is refused)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: OUTPUT_DIR/checkpoint.pth); the options "
                        "that define what is learnt must be the checkpoint's")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUTPUT_DIR that holds an earlier run, deleting its "
                        "checkpoint.pth, checkpointNNNN.pth and log.jsonl (without it, or "
                        "--resume, such a folder is refused); with --resume CKPT from another "
                        "folder, this folder goes on from CKPT")
    g.add_argument("--checkpoint-every", type=_count, default=1,
                   help="rewrite checkpoint.pth every N epochs (1; always after the last epoch "
                        "and at --stop-after-epoch)")
    g.add_argument("--save-every", type=_count, default=0,
                   help="also keep checkpoint{EPOCH:04d}.pth every N epochs (0: only the latest)")
    g.add_argument("--eval-every", type=_count, default=1, help="validate every N epochs (1)")
    g.add_argument("--seed", type=_seed, default=0,
                   help="seed of the initialisation, the crops and the sampler order (0)")
    g.add_argument("--device", default="auto",
                   help="auto | cpu | cuda (auto: cuda where available)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic cuDNN / CUDA kernels, no cuDNN autotuning (slower; CPU "
                        "runs are deterministic anyway)")
    g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="NHWC network and crops (auto: on with CUDA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the online and EMA networks (a minute or more of "
                        "compilation in the first steps, and again the first time validation "
                        "runs; checkpoints are unchanged)")
    g.add_argument("--check-finite-every", type=_count, default=0, metavar="N",
                   help="read the non-finite-loss flag every N steps (0 = auto: every step on "
                        "CPU, 50 on CUDA, where each read waits for the GPU); the error names "
                        "the first bad step however late it is noticed")
    g.add_argument("--print-freq", type=_count, default=50,
                   help="progress line every N steps (50; 0: none)")
    g.add_argument("--stop-after-epoch", type=_positive, default=None,
                   help="exit after this epoch as if interrupted (the schedule still spans "
                        "--epochs; continue with --resume)")
    g.add_argument("--debug-dump", default=None, help=argparse.SUPPRESS)
    add_debug_flag(p)  # also keeps --debug from being taken as a prefix of --debug-dump
    return p


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    name = PRESET_ALIASES.get(args.preset.lower(), args.preset.lower())
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{args.preset}'; choose one of {', '.join(PRESETS)}")
    args.preset = name
    for key, value in PRESETS[name].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.global_scale = tuple(float(x) for x in args.global_scale)
    args.local_scale = tuple(float(x) for x in args.local_scale)
    args.blur_radius = tuple(float(x) for x in args.blur_radius)
    check_options(args)
    return args


def resumes_in_place(resume: str, out_dir: Path) -> bool:
    """Whether ``--resume`` continues the run of ``out_dir`` (its own checkpoint, or one of its
    ``--save-every`` files), not a checkpoint from elsewhere."""
    return resume == "auto" or Path(resume).absolute().parent == out_dir.absolute()


def check_options(args: argparse.Namespace) -> None:
    """The rules between options (each value alone was checked when parsed); ``ValueError``
    names the options and the fix."""
    for option, key in (("--global-scale", "global_scale"), ("--local-scale", "local_scale"),
                        ("--blur-radius", "blur_radius")):
        low, high = getattr(args, key)
        if low > high:
            raise ValueError(f"{option} {low:g} {high:g}: MIN must not exceed MAX; give "
                             f"{option} {high:g} {low:g}")
    if args.no_projector and args.memory_size > 0:
        raise ValueError("the OCM memory stores projector outputs; with --no-projector use "
                         "--memory-size 0")
    resume = getattr(args, "resume", None)
    if getattr(args, "overwrite", False) and resume and resumes_in_place(
            resume, Path(args.output_dir)):
        raise ValueError("--overwrite deletes the run in --output-dir, which --resume continues: "
                         "give one of them (--overwrite with --resume CKPT from another folder "
                         "starts this folder from CKPT)")


# What a checkpoint learnt with: --resume refuses other values (trex_hub.train.runtime), as the
# weights, the OCM memory's labels, the crops or the sampler order would no longer fit them.
# Options of speed, logging and validation may change; the lr schedule is compared on its own.
RESUME_MUST_MATCH: Dict[str, str] = {
    "arch": "--arch", "no_projector": "--no-projector", "projector_layers": "--projector-layers",
    "projector_hidden": "--projector-hidden", "projector_dim": "--projector-dim",
    "projector_l2_norm": "projector L2-norm (--no-projector-l2-norm)",
    "memory_size": "--memory-size", "classifier": "--classifier", "tau": "--tau",
    "ema_momentum": "--ema-momentum", "global_crops": "--global-crops",
    "global_size": "--global-size", "global_scale": "--global-scale",
    "local_crops": "--local-crops", "local_size": "--local-size", "local_scale": "--local-scale",
    "blur_radius": "--blur-radius", "simple_aug": "--simple-aug", "momentum": "--momentum",
    "weight_decay": "--weight-decay", "wd_all": "--wd-all", "dataset": "--dataset",
    "class_names": "class names (--data, --classes)", "train_limit": "--train-limit",
    "data_seed": "--data-seed", "seed": "--seed",
}


def projector_config(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    if args.no_projector:
        return None
    return {"num_layers": int(args.projector_layers), "hidden_dim": int(args.projector_hidden),
            "out_dim": int(args.projector_dim), "l2_norm": bool(args.projector_l2_norm)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return apply_preset(args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # pragma: no cover


def plain_namespace(args: argparse.Namespace, **extra: Any) -> argparse.Namespace:
    """A copy of ``args`` holding only plain Python values (safe for ``weights_only`` loading)."""

    def plain(v: Any) -> Any:
        if v is None:
            return None
        for kind in (bool, int, float, str):  # numpy scalars subclass these: unwrap them
            if isinstance(v, kind):
                return kind(v)
        if isinstance(v, (list, tuple)):
            return type(v)(plain(x) for x in v)
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)

    ns = argparse.Namespace(**{k: plain(v) for k, v in vars(args).items()})
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


__all__: List[str] = ["PRESETS", "build_parser", "apply_preset", "check_options",
                      "parse_args", "projector_config", "plain_namespace", "RESUME_MUST_MATCH",
                      "resumes_in_place"]
