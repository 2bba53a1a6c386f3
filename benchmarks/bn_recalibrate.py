"""Diagnostic for the Fashion-MNIST reproduction (docs/training.md, "32 px"): recompute a trained
backbone's BatchNorm running statistics on un-augmented training images at the probe's resolution,
and save the result as a model folder that ``trex-eval run --models FOLDER`` probes like any other.

Multi-crop training updates the running statistics alternately with global (e.g. 32 px) and local
(16 px) batches; at such small sizes the deep layers see 1x1 maps in both, but with different
statistics, and eval mode uses the mixture. If the probe's top-1 moves a lot once the statistics are
those of 32 px images alone, the mixture (not the learned weights) drives the transfer figure.

    python benchmarks/bn_recalibrate.py results/repro32/trex_star-s0/checkpoint.pth OUT_FOLDER \\
        --classes 0-4 --limit 10000 --image-size 32

Only the running means and variances change (the average of the per-batch statistics over every
image, train-mode forward without gradients); the weights are the checkpoint's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trex_hub  # noqa: E402
from trex_hub.datasets import load_fashion_mnist  # noqa: E402
from trex_hub.evaluation.features import build_resize_transform  # noqa: E402
from trex_hub.transforms import open_image  # noqa: E402


def recalibrate(model: torch.nn.Module, images, transform, batch_size: int = 256) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them over ``images``."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the mean of the per-batch statistics
    model.train()
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.stack([transform(open_image(images[i], f"image {i}"))
                             for i in range(s, min(len(images), s + batch_size))])
            model(x)
    model.eval()
    return len(bns)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a trex-train checkpoint (or any trex_hub.load name)")
    ap.add_argument("out", help="folder to write (save_pretrained layout)")
    ap.add_argument("--data", default=None, help="Fashion-MNIST idx folder")
    ap.add_argument("--classes", default="0-4", help="the training classes (default 0-4)")
    ap.add_argument("--limit", type=int, default=10000, help="training images used (seeded)")
    ap.add_argument("--data-seed", type=int, default=0, help="the training subset's seed")
    ap.add_argument("--image-size", type=int, default=32, help="the probe's resolution")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = trex_hub.load(args.checkpoint, device="cpu")
    data = load_fashion_mnist(args.data, "train", classes=args.classes, limit=args.limit,
                              seed=args.data_seed)
    tf = build_resize_transform(args.image_size, model)
    n = recalibrate(model, data.items, tf)
    out = trex_hub.save_pretrained(model, args.out)
    print(f"{n} BatchNorm layers re-estimated on {len(data.items)} images at {args.image_size} px "
          f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
