"""``trex-train``: train t-ReX / t-ReX* / a supervised baseline, or export a checkpoint.

    trex-train --preset trex_star --data /data/imagenet --output-dir runs/trex_star
    torchrun --nproc_per_node=4 -m trex_hub.cli.train --preset trex --data /data/imagenet ...
    trex-train export runs/trex_star/checkpoint.pth exported/trex_star

Exit codes: 0 done, 1 failure (message on stderr), 2 usage error, 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trex-train export",
        description="Write a training checkpoint as a zoo folder (model.safetensors + "
                    "config.json + README.md model card), loadable with "
                    "trex_hub.load(OUT, projector=True); OCM prototypes and class names are kept "
                    "so that model.classify() works.")
    p.add_argument("checkpoint", help="checkpoint.pth written by trex-train (or a released full "
                                      "training checkpoint)")
    p.add_argument("output", help="folder to write")
    p.add_argument("--ema", action="store_true", help="export the EMA copy instead of the "
                                                      "online network")
    p.add_argument("--name", default=None, help="model name in config.json (default: folder name)")
    return p


def _export(argv: List[str]) -> int:
    from ..checkpoint import CheckpointError
    from ..train.export import export_checkpoint

    args = _export_parser().parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output, ema=args.ema, name=args.name)
    except CheckpointError as exc:
        print(f"trex-train export: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "export":
            return _export(argv[1:])
        from ..train.config import parse_args

        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2

    from ..train.loop import TrainingError, train

    try:
        train(args)
    except TrainingError as exc:
        print(f"trex-train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("trex-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
