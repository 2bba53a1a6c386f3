"""The features file written by ``trex-extract``: its format, its committed chunks, the merge that
finishes it, and :func:`read_features` that reads it back.

For ``OUT`` = ``feats.npy``, ``feats.safetensors`` or ``feats.pt``::

    feats.npy                 float32 [N_ok, D]: one row per image decoded successfully,
                              in input order
    feats.manifest.jsonl      one JSON object per INPUT file, in input order:
                              {"index": row in feats or null, "path": relative path,
                               "label": str or null, "status": "ok" | "failed",
                               "error": null or why the file was skipped}
    feats.meta.json           the run: model, head, preprocess, precision, dim, counts, ...

``.safetensors`` holds one tensor named ``features`` (and the run as string metadata); ``.pt`` is
``torch.save({"features": Tensor, "meta": dict})`` and loads with ``weights_only=True``.

While a run is going, its committed chunks live in ``feats.npy.parts/`` (``chunk-K.npy`` with the
features, then ``chunk-K.jsonl`` with the manifest rows as the commit marker, each written
atomically); :func:`merge` writes the final files atomically from them, in chunk order. The run
itself (what to compute, resuming, sharding) is :mod:`trex_hub.extract_run`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from .fileio import PathLike, atomic_write

OUTPUT_FORMATS = (".npy", ".safetensors", ".pt")
FORMAT_VERSION = 1


class ExtractError(RuntimeError):
    """A run that cannot start or continue (existing output, changed inputs, --strict...)."""


def output_paths(out: PathLike) -> Dict[str, Path]:
    """Where a run writes for ``out``: features, manifest, meta, parts dir."""
    out = Path(out)
    if out.suffix not in OUTPUT_FORMATS:
        raise ValueError(f"output '{out}' must end with one of {', '.join(OUTPUT_FORMATS)}")
    stem = out.with_suffix("")
    return {"features": out, "manifest": stem.with_name(stem.name + ".manifest.jsonl"),
            "meta": stem.with_name(stem.name + ".meta.json"),
            "parts": out.with_name(out.name + ".parts")}


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
    paths = output_paths(path)
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
# Committed chunks
# --------------------------------------------------------------------------------------------


def chunk_files(parts: Path, k: int) -> Tuple[Path, Path]:
    """(features, manifest rows) files of chunk ``k``."""
    return parts / f"chunk-{k:08d}.npy", parts / f"chunk-{k:08d}.jsonl"


def chunk_done(parts: Path, k: int) -> bool:
    feats, rows = chunk_files(parts, k)
    return rows.exists() and feats.exists()


def write_chunk(parts: Path, k: int, feats: np.ndarray, rows: List[Dict[str, Any]]) -> None:
    """Commit chunk ``k``: its features, then its manifest rows (the commit marker)."""
    fpath, rpath = chunk_files(parts, k)
    atomic_write(fpath, lambda fh: np.save(fh, np.ascontiguousarray(feats, dtype=np.float32),
                                            allow_pickle=False))
    # the rows file is the commit marker: written last
    atomic_write(rpath, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows)), "w")


def _chunk_rows(parts: Path, k: int):
    with open(chunk_files(parts, k)[1], "r", encoding="utf-8") as src:
        for line in src:
            yield json.loads(line)


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


def merge(paths: Dict[str, Path], n_chunks: int, dim: int, meta: Dict[str, Any]) -> Tuple[int, int]:
    """Concatenate the committed chunks into the final files; returns (ok, failed)."""
    parts = paths["parts"]
    out = paths["features"]
    missing = [k for k in range(n_chunks) if not chunk_done(parts, k)]
    if missing:
        raise ExtractError(f"{parts}: chunk(s) {missing[:10]} were never committed (did a rank "
                           "fail?); rerun with --resume")
    n_ok = n_failed = 0
    for k in range(n_chunks):
        n_ok += np.load(chunk_files(parts, k)[0], mmap_mode="r").shape[0]
        n_failed += sum(1 for row in _chunk_rows(parts, k) if row["status"] != "ok")
    meta = dict(meta, ok=n_ok, failed=n_failed)

    def copy_rows(fh) -> None:
        for k in range(n_chunks):
            arr = np.load(chunk_files(parts, k)[0], mmap_mode="r")
            if arr.shape[0]:
                fh.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())

    if out.suffix == ".npy":
        atomic_write(out, lambda fh: (fh.write(_npy_header(n_ok, dim)), copy_rows(fh)))
    elif out.suffix == ".safetensors":
        atomic_write(out, lambda fh: (fh.write(_safetensors_header(n_ok, dim, meta)),
                                       copy_rows(fh)))
    else:
        merged = parts / "merged.npy"
        atomic_write(merged, lambda fh: (fh.write(_npy_header(n_ok, dim)), copy_rows(fh)))
        # copy-on-write map: torch.save streams the rows from the page cache, no private copy
        tensor = (torch.from_numpy(np.load(merged, mmap_mode="c")) if n_ok
                  else torch.zeros(0, dim, dtype=torch.float32))
        atomic_write(out, lambda fh: torch.save({"features": tensor, "meta": meta}, fh))

    def write_manifest(fh) -> None:
        index = 0
        for k in range(n_chunks):
            for row in _chunk_rows(parts, k):
                if row["status"] == "ok":
                    row["index"] = index
                    index += 1
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(paths["manifest"], write_manifest, "w")
    atomic_write(paths["meta"], lambda fh: fh.write(json.dumps(meta, indent=2) + "\n"), "w")
    return n_ok, n_failed


__all__ = ["OUTPUT_FORMATS", "FORMAT_VERSION", "ExtractError", "output_paths", "read_features",
           "chunk_files", "chunk_done", "write_chunk", "merge"]
