"""The features file written by ``trex-extract``: its format, its committed segments, the merge that
finishes it, and :func:`read_features` that reads it back.

For ``OUT`` = ``feats.npy``, ``feats.safetensors`` or ``feats.pt``::

    feats.npy                 float32 [N_ok, D]: one row per image decoded successfully,
                              in input order
    feats.npy.manifest.jsonl  one JSON object per INPUT file, in input order:
                              {"index": row in feats or null, "path": relative path,
                               "label": str or null, "status": "ok" | "failed",
                               "error": null or why the file was skipped}
    feats.npy.meta.json       the run: model, head, preprocess, precision, dim, counts, and
                              the fingerprint a later --resume is checked against

The manifest and meta names carry the whole output name, so ``feats.npy`` and
``feats.safetensors`` in one folder do not share them. Outputs written before this rule (named
``feats.manifest.jsonl`` / ``feats.meta.json``) are still read.

``.safetensors`` holds one tensor named ``features`` (and the run as string metadata); ``.pt`` is
``torch.save({"features": Tensor, "meta": dict})`` and loads with ``weights_only=True``.

While a run is going, its committed segments live in ``feats.npy.parts/``: ``part-A-B.npy`` with
the features of inputs ``A..B-1``, then ``part-A-B.jsonl`` with their manifest rows as the commit
marker, each written atomically. Segments are cut wherever the run committed (by size or by
time); :func:`merge` checks that they tile ``0..N-1`` and concatenates them in input order, so the
final files do not depend on where the cuts fell. The run
itself (what to compute, resuming, sharding) is :mod:`trex_hub.extract_run`.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .fileio import PathLike, atomic_write, atomic_write_many

OUTPUT_FORMATS = (".npy", ".safetensors", ".pt")
FORMAT_VERSION = 1


class ExtractError(RuntimeError):
    """A run that cannot start or continue (existing output, changed inputs, --strict...)."""


def output_paths(out: PathLike) -> Dict[str, Path]:
    """Where a run writes for ``out``: features, manifest, meta, parts dir."""
    out = Path(out)
    if out.suffix not in OUTPUT_FORMATS:
        raise ValueError(f"output '{out}' must end with one of {', '.join(OUTPUT_FORMATS)}")
    return {"features": out, "manifest": out.with_name(out.name + ".manifest.jsonl"),
            "meta": out.with_name(out.name + ".meta.json"),
            "parts": out.with_name(out.name + ".parts")}


def output_problem(output: PathLike) -> Optional[str]:
    """What the file system already shows wrong with an output path (``None``: nothing): a
    folder of that name, which a run would only fail to replace after computing every feature,
    or a file where one of its folders should be. Checked before any work (trex-extract's
    ``-o`` while parsing, :func:`~trex_hub.extract_run.extract_to_file` first thing)."""
    output = os.fspath(output)
    if os.path.isdir(output):
        return (f"{output} is a folder; give a file name (e.g. "
                f"{os.path.join(output, 'feats.npy')})")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{output}: {parent} is a file, not a folder; choose another output"
    return None


def legacy_paths(out: PathLike) -> Dict[str, Path]:
    """The manifest and meta names of outputs written before they carried the suffix
    (``feats.manifest.jsonl``, shared by ``feats.npy`` and ``feats.pt``)."""
    stem = Path(out).with_suffix("")
    return {"manifest": stem.with_name(stem.name + ".manifest.jsonl"),
            "meta": stem.with_name(stem.name + ".meta.json")}


def existing_paths(out: PathLike) -> Dict[str, Path]:
    """:func:`output_paths`, with the legacy manifest/meta names when only those exist."""
    paths = output_paths(out)
    old = legacy_paths(out)
    if not paths["manifest"].exists() and old["manifest"].exists():
        paths.update(old)
    return paths


def read_meta(out: PathLike) -> Optional[Dict[str, Any]]:
    """The meta file of output ``out`` as a dict (``None``: missing, unreadable or not an
    object), for callers to which a missing record only means "not known"."""
    try:
        meta = json.loads(existing_paths(out)["meta"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def recorded_counts(out: PathLike) -> Optional[Tuple[int, int]]:
    """``(ok, failed)`` as a finished output's meta file records them (``None``: no readable
    record, e.g. an output of a version that did not keep them)."""
    meta = read_meta(out) or {}
    ok, failed = meta.get("ok"), meta.get("failed")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (ok, failed)):
        return None
    return ok, failed


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_features(path: PathLike, *, mmap: bool = False
                  ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Read a ``trex-extract`` output: ``(features, manifest rows)``.

    ``features`` is a float32 ``[N, D]`` array whose row ``i`` belongs to the manifest row with
    ``"index" == i``; ``rows`` has one dict per input file, in input order, with keys
    ``index`` (int, or ``None`` for a failed file), ``path`` (relative path), ``label`` (str or
    ``None``), ``status`` (``"ok"`` / ``"failed"``) and ``error`` (``None`` or the reason).
    ``mmap=True`` maps a ``.npy`` file instead of reading it.
    """
    paths = existing_paths(path)
    out = paths["features"]
    if out.suffix == ".npy":
        feats = np.load(out, mmap_mode="r" if mmap else None, allow_pickle=False)
    elif out.suffix == ".safetensors":
        from safetensors.numpy import load_file

        feats = load_file(str(out))["features"]
    else:
        obj = torch.load(out, map_location="cpu", weights_only=True)
        t = obj["features"] if isinstance(obj, dict) else obj
        feats = t.numpy()
    if feats.dtype != np.float32 or feats.ndim != 2:
        raise ValueError(f"{out}: expected float32 [N, D] features, got {feats.dtype} "
                         f"{feats.shape}")
    if not paths["manifest"].exists():
        raise FileNotFoundError(f"{out}: its manifest {paths['manifest']} is missing")
    with open(paths["manifest"], "r", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    n_ok = sum(1 for r in rows if r.get("index") is not None)
    if n_ok != feats.shape[0]:
        raise ValueError(f"{out}: {feats.shape[0]} feature rows but the manifest lists "
                         f"{n_ok} successful files")
    return feats, rows


# --------------------------------------------------------------------------------------------
# Committed segments
# --------------------------------------------------------------------------------------------


def segment_files(parts: Path, start: int, stop: int) -> Tuple[Path, Path]:
    """(features, manifest rows) files of the segment of inputs ``start..stop-1``."""
    name = f"part-{start:010d}-{stop:010d}"
    return parts / f"{name}.npy", parts / f"{name}.jsonl"


def committed_segments(parts: Path) -> List[Tuple[int, int]]:
    """``(start, stop)`` of every committed segment (its rows file exists), sorted."""
    found = []
    for rows in parts.glob("part-*-*.jsonl"):
        try:
            start, stop = (int(x) for x in rows.stem.split("-")[1:3])
        except ValueError:
            continue
        if segment_files(parts, start, stop)[0].exists():
            found.append((start, stop))
    return sorted(found)


def write_segment(parts: Path, start: int, stop: int, feats: np.ndarray,
                  rows: List[Dict[str, Any]]) -> None:
    """Commit inputs ``start..stop-1``: their features, then their manifest rows (the commit
    marker)."""
    fpath, rpath = segment_files(parts, start, stop)
    atomic_write(fpath, lambda fh: np.save(fh, np.ascontiguousarray(feats, dtype=np.float32),
                                            allow_pickle=False))
    # the rows file is the commit marker: written last
    atomic_write(rpath, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows)), "w")


def _segment_rows(parts: Path, seg: Tuple[int, int]):
    with open(segment_files(parts, *seg)[1], "r", encoding="utf-8") as src:
        for line in src:
            yield json.loads(line)


def tiling(parts: Path, total: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """The committed segments that cover ``0..total-1`` in order, and the gaps left."""
    segs, gaps, pos = [], [], 0
    for start, stop in committed_segments(parts):
        if start < pos:  # overlapping leftover of a cut elsewhere: the first one wins
            continue
        if start > pos:
            gaps.append((pos, start))
        segs.append((start, stop))
        pos = stop
    if pos < total:
        gaps.append((pos, total))
    return segs, gaps


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def _npy_header(rows: int, dim: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (rows, dim)})
    return buf.getvalue()


def _safetensors_header(rows: int, dim: int, meta: Dict[str, Any]) -> bytes:
    header = {"__metadata__": {k: v if isinstance(v, str) else json.dumps(v)
                               for k, v in meta.items()},
              "features": {"dtype": "F32", "shape": [rows, dim],
                           "data_offsets": [0, rows * dim * 4]}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def merge(paths: Dict[str, Path], total: int, dim: int, meta: Dict[str, Any]) -> Tuple[int, int]:
    """Concatenate the committed segments of inputs ``0..total-1`` into the final files;
    returns (ok, failed)."""
    parts = paths["parts"]
    out = paths["features"]
    segs, gaps = tiling(parts, total)
    if gaps:
        raise ExtractError(f"{parts}: inputs {', '.join(f'{a}..{b - 1}' for a, b in gaps[:5])} "
                           "were never committed (a rank failed, or another run changed this "
                           "folder); rerun with --resume")
    n_ok = n_failed = 0
    for seg in segs:
        n_ok += np.load(segment_files(parts, *seg)[0], mmap_mode="r").shape[0]
        n_failed += sum(1 for row in _segment_rows(parts, seg) if row["status"] != "ok")
    meta = dict(meta, ok=n_ok, failed=n_failed)

    def copy_rows(fh) -> None:
        for seg in segs:
            arr = np.load(segment_files(parts, *seg)[0], mmap_mode="r")
            if arr.shape[0]:
                fh.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())

    if out.suffix == ".npy":
        def write_features(fh) -> None:
            fh.write(_npy_header(n_ok, dim))
            copy_rows(fh)
    elif out.suffix == ".safetensors":
        def write_features(fh) -> None:
            fh.write(_safetensors_header(n_ok, dim, meta))
            copy_rows(fh)
    else:
        merged = parts / "merged.npy"
        atomic_write(merged, lambda fh: (fh.write(_npy_header(n_ok, dim)), copy_rows(fh)))
        # copy-on-write map: torch.save streams the rows from the page cache, no private copy
        tensor = (torch.from_numpy(np.load(merged, mmap_mode="c")) if n_ok
                  else torch.zeros(0, dim, dtype=torch.float32))

        def write_features(fh) -> None:
            torch.save({"features": tensor, "meta": meta}, fh)

    def write_manifest(fh) -> None:
        index = 0
        for seg in segs:
            for row in _segment_rows(parts, seg):
                if row["status"] == "ok":
                    row["index"] = index
                    index += 1
                fh.write(_manifest_line(row))

    # all three written before any is renamed: an old output is never left half replaced
    atomic_write_many([(paths["meta"], lambda fh: fh.write(
                           (json.dumps(meta, indent=2) + "\n").encode("utf-8")), "wb"),
                       (paths["manifest"], write_manifest, "wb"),
                       (out, write_features, "wb")])
    return n_ok, n_failed


def _manifest_line(row: Dict[str, Any]) -> bytes:
    """One JSON line in UTF-8. A path that is not valid UTF-8 (a file name in another encoding,
    which Python decodes with surrogate escapes) is written with ``\\u`` escapes instead:
    ``json.loads`` gives back the same string, which ``os.fsencode`` turns into the name's
    bytes."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode("ascii")


__all__ = ["OUTPUT_FORMATS", "FORMAT_VERSION", "ExtractError", "output_paths", "output_problem",
           "legacy_paths", "read_meta", "recorded_counts",
           "existing_paths", "read_features", "segment_files", "committed_segments",
           "write_segment", "tiling", "merge"]
