"""The output folder of a training run, beyond its checkpoints (:mod:`.runtime`): what an
earlier run left there (refused unless the command continues or replaces it), and the epoch log,
trimmed to the checkpoint when a run resumes.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import List

from ..fileio import atomic_write
from .config import resumes_in_place
from .runtime import CHECKPOINT_NAME, TrainingError

LOG_NAME = "log.jsonl"


def earlier_run(out_dir: Path) -> List[str]:
    """The files of an earlier run in ``out_dir`` that a new run would replace or append to."""
    return [name for name in (CHECKPOINT_NAME, LOG_NAME) if (out_dir / name).exists()]


def refuse_earlier_run(args: argparse.Namespace, out_dir: Path) -> None:
    """A run that neither continues (``--resume``) nor replaces (``--overwrite``) the run
    already in ``out_dir`` would overwrite its checkpoint after one epoch and mix its own
    records into the old log: stop before anything is built. ``--resume`` of a checkpoint from
    another folder continues that run, not this folder's: it needs ``--overwrite`` too."""
    if getattr(args, "overwrite", False) or (args.resume and resumes_in_place(args.resume,
                                                                             out_dir)):
        return
    found = earlier_run(out_dir)
    if found and args.resume:
        raise TrainingError(
            f"{out_dir} already holds another run ({', '.join(found)}) and --resume "
            f"{args.resume} continues one from elsewhere: add --overwrite to replace that run "
            "with this one, or give another (empty) --output-dir")
    if found:
        raise TrainingError(
            f"{out_dir} already holds an earlier run ({', '.join(found)}): add --resume to "
            "continue it, --overwrite to start afresh and replace it, or give another (empty) "
            "--output-dir")


def clear_earlier_run(out_dir: Path) -> None:
    """``--overwrite``: delete what an earlier run wrote, so that no later ``--resume`` picks
    up its checkpoints and the log holds this run's epochs only."""
    names = [CHECKPOINT_NAME, LOG_NAME] + [p.name for p in out_dir.glob("checkpoint*.pth")
                                           if re.fullmatch(r"checkpoint\d{4,}\.pth", p.name)]
    for name in names:
        (out_dir / name).unlink(missing_ok=True)


def trim_log(path: Path, epochs_done: int) -> int:
    """Keep the records of the first ``epochs_done`` epochs of ``path`` (a log of this loop);
    returns how many lines were dropped. On resume the epochs after the checkpoint are trained
    again, so their earlier records (and a line cut short by a crash) would otherwise appear
    twice. The kept lines are unchanged; the file is rewritten atomically, only when needed."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _log_epoch(line) <= epochs_done]
    if len(kept) == len(lines) and all(line.endswith("\n") for line in kept):
        return 0
    text = "".join(line if line.endswith("\n") else line + "\n" for line in kept)
    atomic_write(path, lambda fh: fh.write(text), mode="w")
    return len(lines) - len(kept)


def _log_epoch(line: str) -> float:
    """The epoch of a log line; infinity for a line that is no record (cut short)."""
    try:
        epoch = json.loads(line)["epoch"]
    except (ValueError, TypeError, KeyError):
        return float("inf")
    return epoch if isinstance(epoch, int) else float("inf")


__all__ = ["LOG_NAME", "earlier_run", "refuse_earlier_run", "clear_earlier_run", "trim_log"]
