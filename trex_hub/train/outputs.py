"""The output folder of a training run: checked writable before anything is built, what an
earlier run left there (refused unless the command continues or replaces it), the epoch log
(trimmed to the checkpoint when a run resumes), and checkpoint writes (:mod:`.runtime`) whose
disk is full told in one line.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..fileio import atomic_write, no_room, room_words, write_problem
from .config import resumes_in_place
from .runtime import CHECKPOINT_NAME, TrainingError, save_checkpoint

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


def prepare_output_dir(out_dir: Path) -> None:
    """Main process, before the data and the network: make ``out_dir`` and check that files can
    be written there (a probe file, made and removed), so that a folder that cannot take the log
    and the checkpoints is refused at once, not after an epoch."""
    why = write_problem(out_dir)
    if why is not None:
        raise TrainingError(f"--output-dir {out_dir}: cannot write there ({why}); give a "
                            "folder you can write to")


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _no_room(path: Path, needed: Optional[int], kept: Optional[int]) -> TrainingError:
    last = path.parent / CHECKPOINT_NAME
    held = (f"the last checkpoint ({last}, epoch {kept}) is kept" if kept else
            "no checkpoint of this run was written yet")
    return TrainingError(f"cannot write {path}: {room_words(path, needed)}; {held}: free space "
                         "(or move the run) and rerun with --resume")


def write_checkpoint(obj: Dict[str, Any], path: Path, kept: Optional[int]) -> None:
    """:func:`~.runtime.save_checkpoint`; a disk, quota or file size limit too small for it is
    one line (torch's zip writer says ``unexpected pos``) that names ``kept``, the epoch of the
    checkpoint left in place (the write is atomic: the old file stays whole)."""
    try:
        save_checkpoint(obj, path)
    except (OSError, RuntimeError) as exc:
        if not no_room(exc):
            raise
        raise _no_room(path, _tensor_bytes(obj), kept) from exc


def append_log(out_dir: Path, record: Dict[str, Any], kept: Optional[int]) -> None:
    """One epoch's record at the end of the log (a full disk: one line, as for checkpoints)."""
    try:
        with open(out_dir / LOG_NAME, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        if not no_room(exc):
            raise
        raise _no_room(out_dir / LOG_NAME, None, kept) from exc


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


__all__ = ["LOG_NAME", "earlier_run", "refuse_earlier_run", "prepare_output_dir",
           "write_checkpoint", "append_log", "clear_earlier_run", "trim_log"]
