"""Shared helpers of the training tests: a generated learnable image folder and small-run options."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

CLASSES = ("checker", "horizontal", "vertical")


def photo_images(root, *parts):
    """Photo-like JPEGs as :class:`LabeledImages` (3 labels in turn): ``parts`` are
    ``(count, (width, height))``, each written to its own sub-folder with its own seed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from extract_bench import make_photos

    from trex_hub.datasets import LabeledImages

    root = Path(root)
    for k, (count, size) in enumerate(parts):
        make_photos(root / "abcdefgh"[k], count, size=size, seed=k)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    return LabeledImages(paths, np.arange(len(paths)) % 3, ["x", "y", "z"], name="photos")


def make_pattern_folder(root, n_train: int = 24, n_val: int = 12, size: int = 32,
                        seed: int = 0) -> Path:
    """An ImageFolder with train/ and val/ of 3 learnable classes: horizontal stripes, vertical
    stripes, checkerboards, with random period (8-14 px), phase, a dark and a bright random colour
    and pixel noise (the orientation survives crops, flips and colour jitter; colour carries no
    signal)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, n in (("train", n_train), ("val", n_val)):
        for name in CLASSES:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                period, phase = rng.uniform(8, 14), rng.uniform(0, 2 * np.pi)
                if name == "horizontal":
                    pat = np.sin(2 * np.pi * yy / period + phase)
                elif name == "vertical":
                    pat = np.sin(2 * np.pi * xx / period + phase)
                else:
                    pat = np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period)
                a, b = rng.uniform(0, 80, 3), rng.uniform(175, 255, 3)
                t = (pat[..., None] > 0).astype(np.float64)
                img = t * a + (1 - t) * b + rng.normal(0, 10, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def small_args(data, out, *extra: str, preset: str = "trex") -> List[str]:
    """trex-train options of a tiny CPU run: resnet18, 16 px global / 8 px local crops."""
    crops = [] if preset == "baseline" else ["--local-crops", "2", "--memory-size", "32"]
    return ["--preset", preset, "--arch", "resnet18", "--data", str(data), "--output-dir",
            str(out), "--global-size", "16", "--local-size", "8", *crops,
            "--projector-hidden", "64", "--projector-dim", "32",
            "--batch-size", "8", "--workers", "0", "--epochs", "2", "--warmup-epochs", "1",
            "--print-freq", "0", "--device", "cpu", *extra]
