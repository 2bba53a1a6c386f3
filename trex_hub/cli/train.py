"""``trex-train``: train t-ReX / t-ReX* / a supervised baseline, or export a checkpoint.

    trex-train --preset trex_star --data /data/imagenet --output-dir runs/trex_star
    torchrun --nproc_per_node=4 -m trex_hub.cli.train --preset trex --data /data/imagenet ...
    trex-train export runs/trex_star/checkpoint.pth exported/trex_star

Exit codes: 0 done, 1 failure (message on stderr), 2 usage error, 130 interrupted (see
:mod:`trex_hub.cli.common`; ``--debug`` or ``TREX_HUB_DEBUG=1`` adds the traceback).
"""
from __future__ import annotations

import argparse
import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Callable, List, Optional, Sequence

from .common import (EXIT_FAIL, EXIT_OK, add_debug_flag, exit_now, failing_on, run_cli,
                     torchrun_ranks)

PROG = "trex-train"


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trex-train export",
        description="Write a training checkpoint as a zoo folder (model.safetensors + "
                    "config.json + README.md model card), loadable with trex_hub.load(OUT). A "
                    "run with a projector keeps it, its classifier as prototypes (OCM, or the "
                    "learnable cosine classifier; a linear one loses its bias) and the class "
                    "names, so that trex_hub.load(OUT, projector=True) and model.classify() "
                    "work. A run without a projector (--preset baseline, --no-projector) exports "
                    "its backbone only: its classifier is not exported (a line on stderr says "
                    "so).")
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
        out = export_checkpoint(args.checkpoint, args.output, ema=args.ema, name=args.name,
                                note=lambda line: print(f"trex-train export: {line}",
                                                        file=sys.stderr, flush=True))
    print(out)
    return EXIT_OK


def _train(args: argparse.Namespace, after: List[Callable[[], None]]) -> int:
    from ..train.loop import TrainingError, train
    from ..train.runtime import FailedElsewhere, failure_reported
    from ..transforms import ImageLoadError

    after.append(failure_reported)  # under torchrun: the other processes wait for our line
    # an unreadable image is named by the loader (trex_hub.train.data.loader_batches); one read
    # elsewhere still ends in its own line, not in "unexpected ImageLoadError"
    with failing_on(TrainingError, ImageLoadError):
        try:
            train(args)
        except FailedElsewhere:  # another process of the run failed first and says why
            return EXIT_FAIL
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world, local_rank = torchrun_ranks()
    if argv and argv[0] == "export":
        return run_cli("trex-train export", lambda: _export_parser().parse_args(argv[1:]),
                       _export)

    def parse() -> argparse.Namespace:
        from ..train.config import parse_args

        if world == 1 or local_rank == 0:  # train.runtime.reports_alike_errors, without torch
            return parse_args(argv)
        # under torchrun every process meets the same usage error: local rank 0 prints it
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                return parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                from ..train.runtime import linger

                linger()
            raise

    # under torchrun the run's first failure is printed by its process, with its rank; the
    # others end without a word (trex_hub.train.runtime.failure_in_group)
    after: List[Callable[[], None]] = []
    code = run_cli(PROG, parse, lambda args: _train(args, after),
                   interrupted="interrupted; continue with --resume",
                   suffix=f" [rank {rank}]" if world > 1 else "")
    for step in after:  # the line is out
        step()
    return code


if __name__ == "__main__":
    exit_now(main())
