"""``trex-train``: train t-ReX / t-ReX* / a supervised baseline, or export a checkpoint.

    trex-train --preset trex_star --data /data/imagenet --output-dir runs/trex_star
    torchrun --nproc_per_node=4 -m trex_hub.cli.train --preset trex --data /data/imagenet ...
    trex-train export runs/trex_star/checkpoint.pth exported/trex_star

Exit codes: 0 done, 1 failure (message on stderr), 2 usage error, 130 interrupted (see
:mod:`trex_hub.cli.common`; ``--debug`` or ``TREX_HUB_DEBUG=1`` adds the traceback).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .common import EXIT_OK, add_debug_flag, exit_now, failing_on, run_cli

PROG = "trex-train"


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
    add_debug_flag(p)
    return p


def _export(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, CheckpointReadError
    from ..train.export import export_checkpoint

    with failing_on(CheckpointError, CheckpointReadError):
        out = export_checkpoint(args.checkpoint, args.output, ema=args.ema, name=args.name)
    print(out)
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from ..train.loop import TrainingError, train
    from ..transforms import ImageLoadError

    # an unreadable image is named by the loader (trex_hub.train.data.loader_batches); one read
    # elsewhere still ends in its own line, not in "unexpected ImageLoadError"
    with failing_on(TrainingError, ImageLoadError):
        train(args)
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return run_cli("trex-train export", lambda: _export_parser().parse_args(argv[1:]),
                       _export)

    def parse() -> argparse.Namespace:
        from ..train.config import parse_args

        return parse_args(argv)

    return run_cli(PROG, parse, _train, interrupted="interrupted; continue with --resume")


if __name__ == "__main__":
    exit_now(main())
