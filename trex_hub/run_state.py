"""What is on disk for a ``trex-extract`` output, and whether a run may write there.

:func:`prepare_parts` (rank 0, before any work) decides between a fresh start, a resume of the
unfinished run in ``OUT.parts/``, "already complete" and a refusal, and takes the run's lock:

* the fingerprint of a run (model weights digest, options, input list, the decoder and the
  normalisation it uses: :func:`fingerprint`) is kept in ``OUT.parts/state.json`` while it runs
  and in the meta file once it is merged; ``--resume`` compares it with the current run in both
  cases and says in words what differs (:func:`describe_changes`);
* ``OUT.parts/lock`` is ``flock``-ed by the process writing the parts (released on exit, even
  on SIGKILL; forked decoding workers close their copy at once, so one outliving a killed run
  cannot keep it; created as the umask allows, and opened read-only where this user may not
  write it: ``flock`` needs no more): a second run of the same output (plain, ``--resume`` or
  ``--overwrite``) while the first runs is refused with a line naming the other run, instead of
  both writing the same files;
* :func:`write_errors` turns the ``OSError`` of a write (read-only folder, full disk or numpy's
  short write, parts removed by another process) into one
  :class:`~trex_hub.featurefile.ExtractError` line that says what to do.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import torch

from .extract import choose_decoding, default_workers
from .featurefile import FORMAT_VERSION, ExtractError, committed_segments, existing_paths
from .fileio import atomic_write, room_words, short_write
from .imagefiles import Entry
from .inference import normalisation, resolve_device
from .model import weights_digest
from .transforms import preprocess_record

PARTS_LAYOUT = 2  # part-A-B segments (1: chunk-K files)


def _entries_digest(entries: Sequence[Entry], spelled: bool = False) -> str:
    """The input list as a digest: each file's path with its folder resolved (``imgs``,
    ``/data/imgs`` and a link to it are one input, also under a linked working folder), its
    name in the manifest and its label. ``spelled``: the paths as the command line spelled
    them, the digest of older versions."""
    h = hashlib.sha256()
    folders: Dict[str, str] = {}  # one realpath per folder: a million files share a few
    for e in entries:
        path = e.path
        if not spelled:
            folder, name = os.path.split(path)
            if folder not in folders:
                folders[folder] = os.path.realpath(folder or ".")
            path = os.path.join(folders[folder], name)
        h.update(f"{path}\0{e.rel}\0{e.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _changes(old: Dict[str, Any], fp: Dict[str, Any], entries: Sequence[Entry]) -> List[str]:
    """:func:`describe_changes`, taking an older run's digest of the spelled paths as equal
    to this run's when this run spells its inputs the same way."""
    if old.get("inputs") not in (None, fp["inputs"]) and \
            old["inputs"] == _entries_digest(entries, spelled=True):
        old = dict(old, inputs=fp["inputs"])
    return describe_changes(old, fp)


def fingerprint(model: torch.nn.Module, entries: Sequence[Entry], opts: Any
                ) -> Dict[str, Any]:
    """What a resumed run must share with the one it continues (``state.json``); ``opts`` is
    the run's :class:`~trex_hub.extract_run.RunOptions`."""
    chunk_size = int(math.ceil(opts.chunk_size / opts.batch_size) * opts.batch_size)
    fp = {
        "format_version": FORMAT_VERSION, "inputs": _entries_digest(entries),
        "count": len(entries), "weights": weights_digest(model),
        "dim": int(getattr(model, "out_dim", 0) or 0),
        "preprocess": preprocess_record(opts.preprocess, model),
        "normalisation": [list(v) for v in normalisation(model)],
        "normalize": bool(opts.normalize), "precision": opts.precision,
        "draft": bool(opts.draft), "max_pixels": opts.max_pixels, "decode": opts.decode,
        "batch_size": opts.batch_size, "chunk_size": chunk_size, "parts": PARTS_LAYOUT,
    }
    if opts.engine is not None:  # a resumed run must not mix engines
        fp["engine"] = type(opts.engine).__name__
    # which decoder --decode auto picks depends on the device and the number of workers: a
    # resumed run must not append nvJPEG rows to PIL rows (or the reverse)
    kind = decoding_kind(model, len(entries), opts)
    fp["decoder"] = {"tensor": "gpu", "hybrid": "hybrid"}.get(kind, "cpu")
    return fp


def _run_device(model: torch.nn.Module, opts: Any) -> torch.device:
    """The device the run computes on (an engine's own, else the model's or ``opts.device``)."""
    if opts.engine is not None:
        return torch.device(getattr(opts.engine, "device", "cpu"))
    try:
        return resolve_device(opts.device, model)
    except ValueError:  # no CUDA here: prepare() says so in its own words later
        return torch.device("cpu")


def decoding_kind(model: torch.nn.Module, count: int, opts: Any,
                  device: Optional[torch.device] = None) -> str:
    """The decoding path the run takes (``choose_decoding``'s answer for its device)."""
    workers = opts.num_workers if opts.num_workers is not None else default_workers()
    return choose_decoding(opts.decode, opts.workers_mode, device or _run_device(model, opts),
                           opts.preprocess, True, count, workers)


# the keys of a fingerprint, in words for the user
_WORDS = {"format_version": "the file format version", "parts": "the parts layout",
          "inputs": "the input list", "count": "the number of inputs",
          "weights": "the model weights (another model or checkpoint)",
          "dim": "the feature size (--head)", "preprocess": "--preprocess",
          "normalize": "--normalize", "precision": "--precision", "draft": "--no-draft",
          "max_pixels": "--max-pixels", "decode": "--decode", "engine": "--engine",
          "decoder": "the decoder the run uses (gpu: nvJPEG, cpu: PIL, hybrid: both; what "
                     "--decode auto chooses depends on the device and the number of workers, -j)",
          "normalisation": "the mean / std of the model's preprocessing config"}
# sizes that only shape the work: a resume keeps the run's own
SHAPING = ("batch_size", "chunk_size")
_SHOW_VALUES = ("count", "dim", "preprocess", "normalize", "precision", "draft", "max_pixels",
                "decode", "engine", "decoder", "normalisation")
# recorded from later versions on: an older output without one is taken as made the same way
_NEWER = ("decoder", "normalisation")


def describe_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """What differs between two fingerprints, one phrase per key (shaping sizes ignored)."""
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: list(_WORDS).index(k)
                      if k in _WORDS else len(_WORDS)):
        if key in SHAPING or old.get(key) == new.get(key) or (key in _NEWER and key not in old):
            continue
        what = _WORDS.get(key, key)
        if key in _SHOW_VALUES:
            what += f" (was {old.get(key)!r}, now {new.get(key)!r})"
        elif key in ("inputs", "weights"):
            what += " differs"
        out.append(what)
    return out


def _legacy_fingerprint(meta: Dict[str, Any], rows: List[Dict[str, Any]],
                        entries: Sequence[Entry], fp: Dict[str, Any]) -> Dict[str, Any]:
    """An output written before the meta kept its fingerprint: rebuild what can be compared
    (weights digest and options from the meta, the input list from the manifest)."""
    # older versions decoded with PIL only and recorded no max_pixels: those are taken as given
    old = {k: v for k, v in fp.items() if k in ("format_version", "parts", "max_pixels",
                                                 "decode")}
    if "engine" in fp or meta.get("engine"):  # only --engine onnxruntime was ever recorded
        old["engine"] = "OnnxRuntimeModel" if meta.get("engine") == "onnxruntime" else None
    old.update(weights=meta.get("weights_sha256"), dim=meta.get("dim"),
               preprocess=meta.get("preprocess"), normalize=meta.get("normalize"),
               precision=meta.get("precision"), draft=meta.get("draft"), count=len(rows))
    same = [(r.get("path"), r.get("label")) for r in rows] == [(e.rel, e.label) for e in entries]
    old["inputs"] = fp["inputs"] if same else "?"
    return old


def check_complete(out: Path, fp: Dict[str, Any], entries: Sequence[Entry]) -> None:
    """``--resume`` on a finished output: refuse unless it was made by this very run."""
    paths = existing_paths(out)
    try:
        meta = json.loads(paths["meta"].read_text(encoding="utf-8"))
        with open(paths["manifest"], "r", encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError) as exc:
        raise ExtractError(f"cannot resume {out}: its manifest or meta file is missing or "
                           f"unreadable ({exc.__class__.__name__}); pass --overwrite to replace "
                           "it") from None
    old = meta.get("fingerprint")
    if not isinstance(old, dict):
        old = _legacy_fingerprint(meta, rows, entries, fp)
    changes = _changes(old, fp, entries)
    if changes:
        raise ExtractError(f"cannot resume {out}: it is complete but was made by a different run "
                           f"({'; '.join(changes)}); pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------
# The lock of a parts folder
# --------------------------------------------------------------------------------------------


def _another_run(out: Path, parts: Path) -> ExtractError:
    return ExtractError(f"another trex-extract process is writing {out} (it holds "
                        f"{parts / 'lock'}); wait for it to finish, or stop it and rerun with "
                        "--resume")


#: the lock fds this process holds. An ``flock`` belongs to the open file, which a forked child
#: shares: a decoding worker outliving a killed run would keep the run locked, and every
#: ``--resume`` refused. Each forked child closes its copies at once (the parent's lock stays).
_HELD: Set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _open_lock(path: Path) -> int:
    """The lock file, created as every output file is (the umask decides: a group-shared folder
    gives a group-writable lock); one this user may not write (another user's, under a stricter
    umask) is opened read-only, which is all ``flock`` needs."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        if not path.exists():  # the folder itself is not writable: write_errors says so
            raise
    try:
        return os.open(path, os.O_RDONLY)
    except PermissionError as exc:
        st = path.stat()
        raise ExtractError(f"cannot open {path}: {exc.strerror} (owner uid {st.st_uid}, mode "
                           f"{st.st_mode & 0o777:04o}); ask its owner to make it readable "
                           f"(chmod a+r {path}), or remove it if no trex-extract runs there"
                           ) from None


def _held_elsewhere(parts: Path) -> bool:
    """Whether another process holds ``parts/lock`` now (nothing created, nothing kept)."""
    try:
        import fcntl

        fd = os.open(parts / "lock", os.O_RDONLY)
    except (ImportError, OSError):  # no lock file (or no locks here): nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _lock(parts: Path, out: Path) -> Optional[int]:
    """Hold ``parts/lock`` (an fd, ``None`` where file locks are unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = _open_lock(parts / "lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _another_run(out, parts) from None
    except OSError:  # no locks on this filesystem: go on without
        pass
    _HELD.add(fd)
    return fd


def _still_ours(parts: Path, lock: Optional[int]) -> bool:
    """Whether ``parts`` is still the folder whose lock this process holds (another run may have
    removed it and made its own meanwhile)."""
    try:
        return lock is not None and os.fstat(lock).st_ino == os.stat(parts / "lock").st_ino
    except OSError:
        return False


def drop_unused_parts(paths: Dict[str, Path], lock: Optional[int]) -> None:
    """After a failed run: remove its parts folder when no segment was committed (a device that
    fails, a model that does not fit, Ctrl-C before the first commit). There is nothing to
    resume, and a plain rerun would otherwise be refused for "an unfinished run"."""
    parts = paths["parts"]
    if _still_ours(parts, lock) and not committed_segments(parts):
        shutil.rmtree(parts, ignore_errors=True)


def release(fd: Optional[int]) -> None:
    if fd is not None:
        _HELD.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass


def _fresh(paths: Dict[str, Path], fp: Dict[str, Any]) -> Optional[int]:
    parts, out = paths["parts"], paths["features"]
    parts.parent.mkdir(parents=True, exist_ok=True)
    try:
        parts.mkdir()
    except FileExistsError:
        raise ExtractError(f"another trex-extract process started writing {out} at the same "
                           "time; let it finish, then rerun with --resume") from None
    fd = _lock(parts, out)
    atomic_write(parts / "state.json", lambda fh: fh.write(json.dumps(fp, indent=2)), "w")
    return fd


def _adopt(paths: Dict[str, Path], fp: Dict[str, Any], entries: Sequence[Entry],
           log: Callable[[str], None]) -> None:
    """--resume: keep the parts folder if its run is this run, else refuse."""
    parts = paths["parts"]
    try:
        old = json.loads((parts / "state.json").read_text())
    except (OSError, ValueError):
        old = None
    if old is None:  # killed before the state was written: nothing committed
        for p in parts.iterdir():
            if p.name != "lock":
                p.unlink() if not p.is_dir() else shutil.rmtree(p)
        atomic_write(parts / "state.json", lambda fh: fh.write(json.dumps(fp, indent=2)), "w")
        return
    for key in SHAPING:
        if key in old and old[key] != fp[key]:
            log(f"resuming with the run's {key.replace('_', ' ')} {old[key]}")
            fp[key] = old[key]
    changes = _changes(old, fp, entries)
    if changes:
        raise ExtractError(f"cannot resume {parts}: the run changed ({'; '.join(changes)}); "
                           "pass --overwrite to start again")


def prepare_parts(paths: Dict[str, Path], fp: Dict[str, Any], entries: Sequence[Entry],
                  resume: bool, overwrite: bool, log: Callable[[str], None]):
    """Rank 0: make ``parts`` hold this run's state, locked; returns ``(True, lock fd)``, or
    ``(False, None)`` when ``resume`` finds the output complete and made by this run."""
    parts, out = paths["parts"], paths["features"]
    for attempt in (0, 1):  # once more if another run finished while we looked
        try:
            if not parts.exists():
                if out.exists() and not overwrite:
                    if not resume:
                        raise ExtractError(f"{out} exists; pass --overwrite to replace it (or "
                                           "--resume to check it is complete)")
                    check_complete(out, fp, entries)
                    log(f"{out} is already complete; nothing to do")
                    return False, None
                return True, _fresh(paths, fp)
            if not (resume or overwrite):
                if _held_elsewhere(parts):  # a run in progress, not an unfinished one
                    raise _another_run(out, parts)
                raise ExtractError(f"{parts} holds an unfinished run; pass --resume to continue "
                                   "it or --overwrite to start again")
            fd = _lock(parts, out)
            try:
                if overwrite:
                    for p in parts.iterdir():
                        if p.name != "lock":
                            p.unlink() if not p.is_dir() else shutil.rmtree(p)
                    atomic_write(parts / "state.json",
                                 lambda fh: fh.write(json.dumps(fp, indent=2)), "w")
                else:
                    _adopt(paths, fp, entries, log)
                for leftover in parts.glob("*.tmp"):
                    leftover.unlink()
            except BaseException:
                release(fd)
                raise
            return True, fd
        except FileNotFoundError:
            if attempt:
                raise ExtractError(f"{parts} was removed by another process while this run "
                                   "started; rerun once the other trex-extract has finished")
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Write errors
# --------------------------------------------------------------------------------------------


@contextmanager
def write_errors(paths: Dict[str, Path]) -> Iterator[None]:
    """Turn the ``OSError`` of writing the output into one actionable :class:`ExtractError`."""
    try:
        yield
    except ExtractError:
        raise
    except OSError as exc:
        where = exc.filename or paths["parts"]
        why = exc.strerror or str(exc)
        keep = ("committed chunks are kept: free space (or move the output) and rerun with "
                "--resume")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise ExtractError(f"cannot write {where}: {why}; {keep}") from exc
        cut = short_write(exc)
        if cut is not None:  # numpy says neither ENOSPC nor the file's name
            raise ExtractError(f"cannot write {where}: {room_words(paths['parts'])}, numpy "
                               f"wrote {cut[1]} of {cut[0]} values; {keep}") from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ExtractError(f"cannot write {where}: {why}; choose an -o path in a folder "
                               "you can write to") from exc
        if exc.errno == errno.ENOENT and not paths["parts"].exists():
            raise ExtractError(f"{paths['parts']} was removed by another process during this "
                               "run (a concurrent --overwrite or --resume?); run one "
                               "trex-extract per output, then rerun with --resume") from exc
        raise ExtractError(f"cannot write {where}: {why}") from exc


__all__ = ["fingerprint", "decoding_kind", "describe_changes", "check_complete", "prepare_parts",
           "release", "drop_unused_parts", "write_errors", "SHAPING", "PARTS_LAYOUT"]
