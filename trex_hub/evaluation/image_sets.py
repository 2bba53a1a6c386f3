"""The image datasets of ``trex-eval run``, with ``--classes`` and the limits applied.

:func:`_select_classes` and :func:`_apply_limits` also subset pre-extracted feature rows
(:mod:`.feature_sets`), so both formats keep the same images.
"""
from __future__ import annotations

from typing import Dict, Optional

from .. import datasets as dsets
from .options import DataOptions, EvalError


def _select_classes(parts: Dict[str, dsets.LabeledImages],
                    spec: Optional[str]) -> Dict[str, dsets.LabeledImages]:
    """Keep the ``--classes`` of both sides, relabelled in the order given."""
    if not spec:
        return parts
    sel = dsets.parse_classes(spec, parts["train"].class_names) or []
    out = {}
    for key, part in parts.items():
        keep, new = dsets.select_classes(part.labels, sel)
        sub = part.subset(keep)
        sub.labels = new
        sub.class_names = [part.class_names[c] for c in sel]  # type: ignore[index]
        out[key] = sub
    return out


def _apply_limits(parts: Dict[str, dsets.LabeledImages],
                  opts: DataOptions) -> Dict[str, dsets.LabeledImages]:
    """The class-balanced ``--train-limit`` / ``--test-limit`` subsets, then the size check."""
    parts = dict(parts)
    for key, limit in (("train", opts.train_limit), ("test", opts.test_limit)):
        if limit:
            parts[key] = parts[key].subset(dsets.balanced_subset(parts[key].labels, limit,
                                                                 opts.subset_seed))
    if len(parts["train"]) < 2 or len(parts["test"]) < 1:
        raise EvalError(f"dataset too small: {len(parts['train'])} trainval and "
                        f"{len(parts['test'])} test images")
    return parts


def load_image_dataset(opts: DataOptions) -> Dict[str, dsets.LabeledImages]:
    """{"train": trainval, "test": test} for the image formats, limits applied."""
    if opts.format == "fashion-mnist":
        parts = {s: dsets.load_fashion_mnist(opts.data, s, classes=opts.classes)
                 for s in ("train", "test")}
    elif opts.format == "imagefolder":
        if not opts.data:
            raise EvalError("--format imagefolder needs --data ROOT")
        parts = dsets.load_image_folder(opts.data, test_fraction=opts.test_fraction,
                                        seed=opts.split_seed, classes=opts.classes)
    else:
        if not opts.data:
            raise EvalError(f"--format {opts.format} needs --data ROOT (the torchvision root)")
        parts = dsets.load_torchvision_dataset(opts.format, opts.data,
                                               test_fraction=opts.test_fraction,
                                               seed=opts.split_seed)
        parts = _select_classes(parts, opts.classes)
    return _apply_limits(parts, opts)
