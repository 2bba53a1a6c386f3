"""How close the tensor decode path (``decode="gpu"``, run here on the CPU through the same
``decode_jpeg`` code) comes to the PIL reference, on ResNet-50 features of photo-like JPEGs.

    python benchmarks/decode_accuracy.py --images 32

Prints, for each preset, the max relative difference of the features (max |a - b| / max |b|)
against ``decode="cpu", draft=False`` (the exact reference) and, for comparison, the default
PIL path with JPEG draft mode, plus the mean absolute pixel difference of the decoded batches.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", default="500x375")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="trex-dec-"))
    try:
        return _measure(args, work)
    finally:
        if not args.work_dir:  # a folder of its own: its generated photos go with it
            shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, work: Path) -> int:
    import factories as fx
    from extract_bench import make_photos

    import trex_hub
    from trex_hub.decoding import batch_ranges, decode_batches
    from trex_hub.preprocess import PRESETS
    from trex_hub.tensor_decode import tensor_batches
    from trex_hub.transforms import Decoder

    w, h = (int(v) for v in args.size.split("x"))
    data = work / f"photos-{w}x{h}-{args.images}"
    make_photos(data, args.images, size=(w, h), seed=7)
    ckpt = work / f"{args.arch}.pth"
    if not ckpt.exists():
        fx.write_backbone_file(ckpt, arch=args.arch, seed=0)
    model = trex_hub.load(ckpt)
    files = sorted(data.rglob("*.jpg"))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    print(f"{len(files)} JPEGs {w}x{h}, {args.arch}, torch {torch.__version__}")
    print("| preset | tensor path vs PIL exact | PIL draft vs PIL exact | mean abs pixel diff "
          "(tensor vs PIL) |")
    print("|---|---|---|---|")
    for preset in ("transfer", "imagenet"):
        ref = model.extract(files, preprocess=preset, decode="cpu", draft=False)
        drafted = model.extract(files, preprocess=preset, decode="cpu", draft=True)
        tens = model.extract(files, preprocess=preset, decode="gpu")
        dec = Decoder(preset, draft=False)
        groups = batch_ranges(len(files), 16)
        a = torch.cat([b.data for b in decode_batches(groups, files.__getitem__, dec)])
        t = torch.cat([b.data for b in tensor_batches(groups, files.__getitem__, dec,
                                                      PRESETS[preset])])
        pix = float((a.int() - t.int()).abs().float().mean())
        print(f"| {preset} | {rel(tens, ref):.1e} | {rel(drafted, ref):.1e} | {pix:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
