"""The main job of `make demo`: fetch t-ReX*, extract features of the sample photos, compare them.

Prints the cosine-similarity table and writes demo_neighbours.png: each photo with its nearest
neighbours among the others and their scores (--neighbours PATH to write it elsewhere, "" to skip).

Weights come from the official URL, or from the mirror in TREX_HUB_BASE_URL, into the cache
(TREX_HUB_CACHE, default ~/.cache/trex_hub); the download happens once.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import trex_hub
from trex_hub.hub.download import DownloadError, get_base_url, get_cache_dir

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="trex_star")
    ap.add_argument("images", nargs="*", help="images to compare (default: samples/)")
    ap.add_argument("--neighbours", default="demo_neighbours.png",
                    help="PNG of each image's nearest neighbours ('' to skip)")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.images] or sorted(
        p for p in SAMPLES.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    print(f"model {args.model} from {get_base_url()} (cache: {get_cache_dir()})")
    try:
        model = trex_hub.load(args.model)
    except DownloadError as exc:
        print(f"error: {exc}\nWithout internet, try `make demo-local` (a mirror on 127.0.0.1 "
              "serving generated weights) or point TREX_HUB_BASE_URL at your own mirror.",
              file=sys.stderr)
        return 1
    start = time.perf_counter()
    feats = model.extract([str(p) for p in paths], normalize=True)
    took = time.perf_counter() - start
    print(f"{len(paths)} images -> features {tuple(feats.shape)} {feats.dtype} in {took:.2f}s\n")
    names = [p.stem[:10] for p in paths]
    sim = (feats @ feats.T).tolist()
    width = max(10, *(len(n) for n in names))
    print("cosine similarity".ljust(width) + "".join(n.rjust(11) for n in names))
    for name, row in zip(names, sim):
        print(name.ljust(width) + "".join(f"{v:11.3f}" for v in row))
    if args.neighbours and len(paths) > 1:
        try:
            from trex_hub.viz import neighbours_figure
        except ImportError as exc:  # pragma: no cover - matplotlib comes with the dev extra
            print(f"\n(no neighbours picture: {exc}; pip install matplotlib)")
            return 0
        out = neighbours_figure(paths, feats, args.neighbours, k=min(3, len(paths) - 1),
                                names=[p.name for p in paths],
                                title=f"{args.model}: nearest neighbours by cosine similarity")
        print(f"\nnearest neighbours: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
