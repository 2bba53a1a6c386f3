"""Serve generated checkpoints, in the exact released formats, from 127.0.0.1 and run a command.

For machines without internet (and for CI): the weights are RANDOM, so numbers are meaningless,
but every byte goes through the real download, cache and loading code. The command runs with
TREX_HUB_BASE_URL pointing at the mirror and TREX_HUB_CACHE at a private cache, so the generated
files never enter your real cache.

    python examples/local_mirror.py --run "python examples/demo.py"
    python examples/local_mirror.py --serve        # keep serving; prints the URL
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import factories  # noqa: E402  (tests/factories.py: the released-layout writers)
from http_server import FileServer  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402

from trex_hub.registry import MODELS  # noqa: E402
from trex_hub.transforms import build_transform, open_image  # noqa: E402

SAMPLES = ROOT / "samples"


def calibrated_backbone(seed: int) -> dict:
    """Random ResNet-50 weights whose BatchNorm statistics are measured on the sample photos, so
    that the demo's features are not all alike (purely random statistics collapse them)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Identity()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    transform = build_transform("transfer")
    batch = torch.stack([transform(open_image(p)) for p in sorted(SAMPLES.glob("*.[jp][pn]g"))])
    with torch.no_grad():
        net.train()(batch)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def generate(folder: Path, full: bool) -> None:
    for seed, entry in enumerate(MODELS.values()):
        torch.save(calibrated_backbone(seed), folder / entry.backbone_file.filename)
        if full and entry.full_file is not None:
            factories.write_full_checkpoint(folder / entry.full_file.filename,
                                            num_layers=entry.projector.num_layers, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="command to run against the mirror")
    ap.add_argument("--serve", action="store_true", help="serve until interrupted")
    ap.add_argument("--full", action="store_true",
                    help="also generate the full training checkpoints (~1 GB)")
    args = ap.parse_args(argv)
    if not args.run and not args.serve:
        ap.error("give --run COMMAND or --serve")
    with tempfile.TemporaryDirectory(prefix="trex_mirror_") as tmp:
        files, cache = Path(tmp) / "files", Path(tmp) / "cache"
        files.mkdir()
        generate(files, args.full)
        with FileServer(files) as server:
            env = dict(os.environ, TREX_HUB_BASE_URL=server.url, TREX_HUB_CACHE=str(cache))
            print(f"local mirror of generated (random) weights at {server.url}", flush=True)
            if args.serve:
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    return 0
            return subprocess.call(shlex.split(args.run), env=env)


if __name__ == "__main__":
    sys.exit(main())
