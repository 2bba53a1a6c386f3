"""Feature extraction engine: images in, features out, fast and resumable.

Three layers, each usable on its own:

* :func:`extract_features` (what ``model.extract(...)`` calls): in-memory inputs -> an
  ``[N, D]`` tensor or array. Decoding runs in threads and overlaps the forward pass; the forward
  pass runs on the prepared fast path of :mod:`trex_hub.inference` (BatchNorm folded,
  channels_last, inference mode, optional autocast on CUDA).
* :func:`extract_to_file` (what ``trex-extract`` calls): a list of files -> a features file plus a
  manifest, written chunk by chunk as results arrive, resumable after any interruption, skipping
  bad files, sharded across ``torchrun`` ranks.
* :func:`read_features`: read such an output back.

Output format of :func:`extract_to_file` (``OUT`` is ``feats.npy``, ``feats.safetensors`` or
``feats.pt``)::

    feats.npy                 float32 [N_ok, D]: one row per image decoded successfully,
                              in input order
    feats.manifest.jsonl      one JSON object per INPUT file, in input order:
                              {"index": row in feats or null, "path": relative path,
                               "label": str or null, "status": "ok" | "failed",
                               "error": null or why the file was skipped}
    feats.meta.json           the run: model, head, preprocess, precision, dim, counts, ...

``.safetensors`` holds one tensor named ``features`` (and the run as string metadata); ``.pt`` is
``torch.save({"features": Tensor, "meta": dict})`` and loads with ``weights_only=True``.
Input order: folders are walked recursively and their files sorted by relative path; text file
lists keep their order; several inputs are concatenated in the order given.

While running, committed chunks live in ``feats.npy.parts/``; the final files are written
atomically once every chunk is done, and the folder is then removed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional,
                    Sequence, Tuple, Union)

import numpy as np
import torch
import torch.nn.functional as F

from .fileio import atomic_write
from .inference import PRECISIONS, InferenceModel, prepare
from .transforms import Decoder, ImageLoadError, build_transform, preset_geometry

_SINGLE = (str, os.PathLike)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm",
                    "pbm", "pnm", "jfif", "jpe", "tga", "ico")
OUTPUT_FORMATS = (".npy", ".safetensors", ".pt")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# In-memory inputs
# --------------------------------------------------------------------------------------------


def _is_single(images: Any) -> bool:
    from PIL import Image

    if isinstance(images, (*_SINGLE, Image.Image)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (1, 3, 4)
                                    and images.shape[0] > 4)
    if isinstance(images, torch.Tensor):
        return images.ndim == 3
    return False


def _split_inputs(images: Any) -> Tuple[Optional[torch.Tensor], List[Any]]:
    """(float batch, []) for an already-normalised batch, else (None, list of items)."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim == 4:
            return images, []
        if images.ndim == 3:
            return images.unsqueeze(0), []
        raise ImageLoadError(f"a float tensor input must be a normalised [N, 3, H, W] batch or a "
                             f"[3, H, W] image; got shape {tuple(images.shape)}")
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return None, list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return None, list(images)
    if _is_single(images):
        return None, [images]
    if isinstance(images, (bytes, dict)) or not isinstance(images, Iterable):
        raise ImageLoadError(f"unsupported input type {type(images).__name__}; pass an image or "
                             "a list of images")
    return None, list(images)


# --------------------------------------------------------------------------------------------
# Decode pipeline
# --------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """A decoded batch: ``data`` holds the items at ``positions`` (uint8 ``[n, H, W, 3]``, or
    float ``[n, 3, H, W]`` when an input was an already-normalised tensor; ``None`` when every
    item failed); ``failures`` lists ``(position, reason)`` of the items that could not be used."""

    positions: List[int]
    data: Optional[torch.Tensor]
    failures: List[Tuple[int, str]]


def _decode_one(decoder: Decoder, item: Any, what: str) -> Union[np.ndarray, torch.Tensor]:
    if isinstance(item, torch.Tensor) and item.is_floating_point():
        if item.ndim != 3 or item.shape[0] != 3:
            raise ImageLoadError(f"{what}: a float tensor item must be a normalised [3, H, W] "
                                 f"image; got {tuple(item.shape)}")
        return item.detach().float().cpu()
    return decoder(item, what)


def _stack(positions: List[int], arrays: List[Union[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    shapes = {tuple(a.shape) for a in arrays}
    floats = any(isinstance(a, torch.Tensor) for a in arrays)
    if floats:
        from .preprocess import IMAGENET_MEAN, IMAGENET_STD

        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        arrays = [a if isinstance(a, torch.Tensor) else
                  (torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255.0 - mean) / std
                  for a in arrays]
        shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        raise ImageLoadError(f"items {positions[0]}..{positions[-1]} have different sizes "
                             f"{sorted(shapes)}; use a preprocess preset to resize them")
    if floats:
        return torch.stack(arrays)
    return torch.from_numpy(np.stack(arrays))


def decode_batches(groups: Iterable[Sequence[int]], fetch: Callable[[int], Any],
                   decoder: Decoder, *, num_workers: int = 0, prefetch: int = 2,
                   strict: bool = True, describe: Callable[[int], str] = "item {}".format,
                   catch_all: bool = False) -> Iterator[Batch]:
    """Decode ``fetch(i)`` for the positions of each group into one :class:`Batch` per group,
    in order. With ``num_workers > 0`` a thread pool decodes up to ``prefetch`` groups ahead of
    the consumer (PIL releases the GIL while decoding and resizing, so this overlaps the forward
    pass). ``strict`` raises the first :class:`ImageLoadError`; otherwise failures are reported
    in the batch. ``catch_all`` also turns unexpected exceptions into failures.
    """

    def work(pos: int):
        try:
            return _decode_one(decoder, fetch(pos), describe(pos)), None
        except ImageLoadError as exc:
            if strict:
                raise
            return None, str(exc)
        except Exception as exc:
            if strict or not catch_all:
                raise
            return None, f"{describe(pos)}: {type(exc).__name__}: {exc}"

    def assemble(group: Sequence[int], results) -> Batch:
        ok_pos, arrays, failures = [], [], []
        for pos, (arr, err) in zip(group, results):
            if err is None:
                ok_pos.append(pos)
                arrays.append(arr)
            else:
                failures.append((pos, err))
        data = _stack(ok_pos, arrays) if arrays else None
        return Batch(ok_pos, data, failures)

    if num_workers <= 0:
        for group in groups:
            yield assemble(group, [work(p) for p in group])
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="trex-decode")
    try:
        it = iter(groups)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) <= prefetch:
                group = next(it, None)
                if group is None:
                    return
                group = list(group)
                pending.append((group, [pool.submit(work, p) for p in group]))

        fill()
        while pending:
            group, futures = pending.popleft()
            results = [f.result() for f in futures]
            fill()  # keep the workers busy while the consumer runs the model
            yield assemble(group, results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_batches(items: Sequence[Any], *, batch_size: int, preprocess: Optional[str],
                 num_workers: int = 0, draft: bool = True) -> Iterator[torch.Tensor]:
    """Decode and preprocess ``items`` into normalised float batches ``[n, 3, H, W]``."""
    decoder = Decoder(preprocess, draft=draft)
    groups = [range(s, min(s + batch_size, len(items))) for s in range(0, len(items), batch_size)]
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for b in decode_batches(groups, items.__getitem__, decoder, num_workers=num_workers):
        if b.data.dtype == torch.uint8:
            yield (b.data.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        else:
            yield b.data


def default_workers() -> int:
    """Decoding threads by default: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _progress(total: int, enabled: bool, desc: str = "extract"):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr)


def extract_features(model: torch.nn.Module, images: Any, *, batch_size: int = 32,
                     preprocess: Optional[str] = "transfer", normalize: bool = False,
                     output: str = "torch", num_workers: Optional[int] = None,
                     device: Union[str, torch.device, None] = None, precision: str = "fp32",
                     compile: bool = False, fast: bool = True, draft: bool = True,
                     progress: bool = False) -> Union[torch.Tensor, np.ndarray]:
    """Features of ``images`` from the model's active head (backbone or projector).

    Args:
        images: a path, PIL image, uint8 HxW/HxWxC numpy array, uint8 CxHxW tensor, a list or
            iterable of those, or an already-normalised float batch [N, 3, H, W].
        batch_size: images per forward pass.
        preprocess: ``"transfer"`` (default; Resize 224 bicubic + CenterCrop 224, the paper's
            protocol), ``"imagenet"`` (Resize 256 + CenterCrop 224) or ``None``.
        normalize: L2-normalise each feature vector.
        output: ``"torch"`` (float32 CPU tensor) or ``"numpy"``.
        num_workers: decoding threads; ``None`` picks one per core when there is more than one
            image, ``0`` decodes in the calling thread.
        device: where to run (default: the model's device). The model itself is not moved.
        precision: ``"fp32"`` (default), or ``"bf16"`` / ``"fp16"`` autocast (meant for CUDA;
            on CPU bf16 is only fast with AVX512-BF16/AMX).
        compile: ``torch.compile`` the prepared model (tens of seconds up front; pays off only
            on long runs).
        fast: use the prepared fast path (BatchNorm folded, channels_last). ``False`` runs the
            model as it is, in eval mode.
        draft: let JPEG decoding skip resolution the preset throws away (large photos only).
        progress: show a progress bar with images/s.

    Returns:
        ``[N, D]`` float32 features on the CPU (``D = model.out_dim``); ``[0, D]`` for no input.
        A bad image raises :class:`~trex_hub.transforms.ImageLoadError` naming it.
    """
    if output not in ("torch", "numpy"):
        raise ValueError(f"output must be 'torch' or 'numpy', not {output!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    preset_geometry(preprocess)  # validates the name
    runner = prepare(model, device, precision, compile=compile, channels_last=fast,
                     fold_bn=fast)
    batch, items = _split_inputs(images)
    outs: List[torch.Tensor] = []
    total = batch.shape[0] if batch is not None else len(items)
    bar = _progress(total, progress)
    try:
        if batch is not None:
            for s in range(0, batch.shape[0], batch_size):
                outs.append(runner(batch[s:s + batch_size]))
                if bar is not None:
                    bar.update(outs[-1].shape[0])
        elif items:
            workers = num_workers if num_workers is not None else (
                default_workers() if len(items) > 1 else 0)
            decoder = Decoder(preprocess, draft=draft)
            groups = [range(s, min(s + batch_size, len(items)))
                      for s in range(0, len(items), batch_size)]
            for b in decode_batches(groups, items.__getitem__, decoder, num_workers=workers):
                outs.append(runner(b.data))
                if bar is not None:
                    bar.update(len(b.positions))
    finally:
        if bar is not None:
            bar.close()
    dim = getattr(model, "out_dim", None) or 0
    feats = torch.cat(outs) if outs else torch.empty(0, dim)
    if normalize and feats.numel():
        feats = F.normalize(feats, dim=-1)
    return feats.numpy() if output == "numpy" else feats


# --------------------------------------------------------------------------------------------
# Inputs on disk
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One input file: where to read it, how the manifest names it, and its label."""

    path: str
    rel: str
    label: Optional[str] = None


def _ext_set(extensions: Optional[Iterable[str]]) -> frozenset:
    exts = IMAGE_EXTENSIONS if extensions is None else extensions
    return frozenset(e.lower().lstrip(".") for e in exts if e.strip())


def _has_ext(name: str, exts: frozenset) -> bool:
    return name.rsplit(".", 1)[-1].lower() in exts if "." in name else False


def _walk(root: Path, exts: frozenset) -> List[Tuple[str, str]]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if _has_ext(name, exts):
                full = os.path.join(dirpath, name)
                found.append((Path(os.path.relpath(full, root)).as_posix(), full))
    found.sort(key=lambda x: x[0])
    return found


def collect_inputs(inputs: Sequence[Union[str, os.PathLike]], *,
                   extensions: Optional[Iterable[str]] = None,
                   labels: str = "none") -> List[Entry]:
    """Expand INPUTs (image files, folders searched recursively, text file lists) into entries
    in a deterministic order.

    * folder: its files with an image extension, sorted by relative path (``rel`` is relative
      to the folder);
    * image file: itself (``rel`` as given);
    * any other file: a list, one ``path`` or ``path<TAB>label`` per line (blank lines and
      ``#`` comments skipped), relative paths resolved against the list's folder, order kept
      (``rel`` as written).

    ``labels="folder"`` labels each file by its parent folder's name (list labels win).
    """
    if labels not in ("none", "folder"):
        raise ValueError(f"labels must be 'none' or 'folder', not {labels!r}")
    exts = _ext_set(extensions)
    entries: List[Entry] = []

    def folder_label(full: str) -> Optional[str]:
        return Path(os.path.abspath(full)).parent.name if labels == "folder" else None

    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            for rel, full in _walk(p, exts):
                entries.append(Entry(full, rel, folder_label(full)))
        elif p.is_file() and _has_ext(p.name, exts):
            entries.append(Entry(str(p), Path(raw).as_posix(), folder_label(str(p))))
        elif p.is_file():
            base = p.parent
            with open(p, "r", encoding="utf-8") as fh:
                for line in fh:
                    line = line.rstrip("\r\n")
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    name, _, lab = line.partition("\t")
                    full = Path(name).expanduser()
                    full = full if full.is_absolute() else base / full
                    entries.append(Entry(str(full), name, lab if lab else folder_label(str(full))))
        else:
            raise FileNotFoundError(f"input '{raw}' is neither a file nor a folder")
    return entries


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


def output_paths(out: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Where :func:`extract_to_file` writes for ``out``: features, manifest, meta, parts dir."""
    out = Path(out)
    if out.suffix not in OUTPUT_FORMATS:
        raise ValueError(f"output '{out}' must end with one of {', '.join(OUTPUT_FORMATS)}")
    stem = out.with_suffix("")
    return {"features": out, "manifest": stem.with_name(stem.name + ".manifest.jsonl"),
            "meta": stem.with_name(stem.name + ".meta.json"),
            "parts": out.with_name(out.name + ".parts")}


def _npy_header(rows: int, dim: int) -> bytes:
    import io

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


def read_features(path: Union[str, os.PathLike], *, mmap: bool = False
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
# Streaming, resumable, sharded extraction
# --------------------------------------------------------------------------------------------


class ExtractError(RuntimeError):
    """A run that cannot start or continue (existing output, changed inputs, --strict...)."""


@dataclass
class Summary:
    total: int
    ok: int
    failed: int
    dim: int
    seconds: float
    computed: int
    failures: List[Tuple[str, str]]
    out: Optional[Path]

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entries_digest(entries: Sequence[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.path}\0{e.rel}\0{e.label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _chunk_names(parts: Path, k: int) -> Tuple[Path, Path]:
    return parts / f"chunk-{k:08d}.npy", parts / f"chunk-{k:08d}.jsonl"


def _chunk_done(parts: Path, k: int) -> bool:
    feats, rows = _chunk_names(parts, k)
    return rows.exists() and feats.exists()


def _write_chunk(parts: Path, k: int, feats: np.ndarray, rows: List[Dict[str, Any]]) -> None:
    fpath, rpath = _chunk_names(parts, k)
    atomic_write(fpath, lambda fh: np.save(fh, np.ascontiguousarray(feats, dtype=np.float32),
                                            allow_pickle=False))
    # the rows file is the commit marker: written last
    atomic_write(rpath, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows)), "w")


def _merge(paths: Dict[str, Path], n_chunks: int, dim: int, meta: Dict[str, Any]) -> Tuple[int, int]:
    """Concatenate the committed chunks into the final files; returns (ok, failed)."""
    parts = paths["parts"]
    out = paths["features"]
    missing = [k for k in range(n_chunks) if not _chunk_done(parts, k)]
    if missing:
        raise ExtractError(f"{parts}: chunk(s) {missing[:10]} were never committed (did a rank "
                           "fail?); rerun with --resume")
    n_ok = n_failed = 0
    for k in range(n_chunks):
        n_ok += np.load(_chunk_names(parts, k)[0], mmap_mode="r").shape[0]
        with open(_chunk_names(parts, k)[1], "r", encoding="utf-8") as src:
            n_failed += sum(1 for line in src if json.loads(line)["status"] != "ok")
    meta = dict(meta, ok=n_ok, failed=n_failed)

    def copy_rows(fh) -> None:
        for k in range(n_chunks):
            arr = np.load(_chunk_names(parts, k)[0], mmap_mode="r")
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
            with open(_chunk_names(parts, k)[1], "r", encoding="utf-8") as src:
                for line in src:
                    row = json.loads(line)
                    if row["status"] == "ok":
                        row["index"] = index
                        index += 1
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(paths["manifest"], write_manifest, "w")
    atomic_write(paths["meta"], lambda fh: fh.write(json.dumps(meta, indent=2) + "\n"), "w")
    return n_ok, n_failed


def extract_to_file(model: torch.nn.Module, entries: Sequence[Entry],
                    out: Union[str, os.PathLike], *, batch_size: int = 32,
                    num_workers: Optional[int] = None, preprocess: Optional[str] = "transfer",
                    normalize: bool = False, precision: str = "fp32",
                    device: Union[str, torch.device, None] = None, compile: bool = False,
                    draft: bool = True, max_pixels: Optional[int] = None,
                    chunk_size: int = 1024, resume: bool = False, overwrite: bool = False,
                    strict: bool = False, keep_parts: bool = False, progress: bool = False,
                    rank: int = 0, world_size: int = 1,
                    barrier: Optional[Callable[[], None]] = None,
                    info: Optional[Dict[str, Any]] = None,
                    log: Callable[[str], None] = lambda msg: None,
                    engine: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Summary:
    """Extract features of ``entries`` (from :func:`collect_inputs`) into ``out``, streaming.

    Work is cut into chunks of ``chunk_size`` inputs (a multiple of ``batch_size``); each chunk
    is committed to ``<out>.parts/`` as soon as it is computed (features, then its manifest rows
    as the commit marker, each written atomically and synced). ``resume=True`` continues a run
    that was interrupted, computing only the chunks not committed yet; the final file is
    identical to that of an uninterrupted run. Bad files are skipped and listed as failed in the
    manifest unless ``strict`` (then the first one raises :class:`ExtractError`).

    Under ``torchrun``, pass ``rank`` / ``world_size`` and a ``barrier``: rank ``r`` computes
    chunks ``r, r + world_size, ...``; rank 0 prepares the run and merges every chunk in input
    order once all ranks are done. The parts folder must be on a filesystem every rank sees.

    ``engine`` replaces the PyTorch fast path with another batch runner of the same interface
    (e.g. :class:`trex_hub.onnx_export.OnnxRuntimeModel`): uint8 NHWC batch in, float32 out.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    preset_geometry(preprocess)
    paths = output_paths(out)
    parts = paths["parts"]
    barrier = barrier or (lambda: None)
    chunk_size = int(math.ceil(chunk_size / batch_size) * batch_size)
    dim = int(getattr(model, "out_dim", 0) or 0)
    fingerprint = {
        "format_version": FORMAT_VERSION, "inputs": _entries_digest(entries),
        "count": len(entries), "weights": _weights_digest(model), "dim": dim,
        "preprocess": preprocess, "normalize": bool(normalize), "precision": precision,
        "draft": bool(draft), "max_pixels": max_pixels, "batch_size": batch_size,
        "chunk_size": chunk_size,
    }
    if engine is not None:  # a resumed run must not mix engines
        fingerprint["engine"] = type(engine).__name__
    state_path = parts / "state.json"
    t_start = time.perf_counter()

    if rank == 0:
        if parts.exists():
            if overwrite:
                shutil.rmtree(parts)
            elif not resume:
                raise ExtractError(f"{parts} holds an unfinished run; pass --resume to continue "
                                   "it or --overwrite to start again")
            else:
                try:
                    old = json.loads(state_path.read_text())
                except (OSError, ValueError):
                    old = None
                if old is None:  # killed before the state was written: nothing committed
                    shutil.rmtree(parts)
                else:
                    # batch and chunk sizes only shape the work: keep the run's own
                    for key in ("batch_size", "chunk_size"):
                        if key in old and old[key] != fingerprint[key]:
                            log(f"resuming with the run's {key.replace('_', ' ')} {old[key]}")
                            fingerprint[key] = old[key]
                if old is not None and old != fingerprint:
                    diff = sorted(k for k in set(old) | set(fingerprint)
                                  if old.get(k) != fingerprint.get(k))
                    raise ExtractError(f"cannot resume {parts}: the run changed ({', '.join(diff)}"
                                       "); pass --overwrite to start again")
        elif paths["features"].exists() and paths["manifest"].exists() and not overwrite:
            if resume:
                log(f"{paths['features']} is already complete; nothing to do")
                barrier()
                return Summary(len(entries), -1, -1, dim, 0.0, 0, [], paths["features"])
            raise ExtractError(f"{paths['features']} exists; pass --overwrite to replace it")
        if not parts.exists():
            parts.mkdir(parents=True)
            atomic_write(state_path, lambda fh: fh.write(json.dumps(fingerprint, indent=2)), "w")
        for leftover in parts.glob("*.tmp"):
            leftover.unlink()
    barrier()
    if rank != 0 and not parts.exists():  # rank 0 found the run already complete
        return Summary(len(entries), -1, -1, dim, 0.0, 0, [], None)
    state = json.loads(state_path.read_text())
    batch_size, chunk_size = int(state["batch_size"]), int(state["chunk_size"])

    n_chunks = max(1, math.ceil(len(entries) / chunk_size)) if entries else 0
    mine = [k for k in range(rank, n_chunks, world_size) if not _chunk_done(parts, k)]
    skipped = sum(1 for k in range(rank, n_chunks, world_size)) - len(mine)
    if skipped:
        log(f"rank {rank}: resuming, {skipped} committed chunk(s) kept")
    todo = sum(min(chunk_size, len(entries) - k * chunk_size) for k in mine)

    runner = (engine or prepare(model, device, precision, compile=compile)) if mine else None
    decoder = Decoder(preprocess, draft=draft, max_pixels=max_pixels)
    workers = num_workers if num_workers is not None else default_workers()

    groups: List[List[int]] = []
    for k in mine:
        start, stop = k * chunk_size, min((k + 1) * chunk_size, len(entries))
        groups += [list(range(s, min(s + batch_size, stop))) for s in range(start, stop, batch_size)]

    bar = _progress(todo, progress and rank == 0, desc="trex-extract")
    failures: List[Tuple[str, str]] = []
    computed = 0
    current: Optional[int] = None
    feats_acc: List[np.ndarray] = []
    rows_acc: List[Dict[str, Any]] = []

    def flush(k: int) -> None:
        arr = np.concatenate(feats_acc) if feats_acc else np.zeros((0, dim), np.float32)
        if normalize and arr.shape[0]:
            arr = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
        rows_acc.sort(key=lambda r: r["_pos"])
        for r in rows_acc:
            del r["_pos"]
        _write_chunk(parts, k, arr.astype(np.float32, copy=False), rows_acc)
        feats_acc.clear()
        rows_acc.clear()

    try:
        batches = decode_batches(groups, lambda i: entries[i].path, decoder,
                                 num_workers=workers, strict=False, catch_all=True,
                                 describe=lambda i: entries[i].rel)
        for b in batches:
            k = (b.positions or [b.failures[0][0]])[0] // chunk_size
            if current is not None and k != current:
                flush(current)
            current = k
            if b.failures and strict:
                raise ExtractError(f"--strict: {b.failures[0][1]}")
            if b.data is not None:
                y = runner(b.data)
                feats_acc.append(y.numpy())
            for pos in b.positions:
                e = entries[pos]
                rows_acc.append({"_pos": pos, "index": None, "path": e.rel, "label": e.label,
                                 "status": "ok", "error": None})
            for pos, why in b.failures:
                e = entries[pos]
                prefix = f"{e.rel} ({e.path}): "
                why = why[len(prefix):] if why.startswith(prefix) else why
                rows_acc.append({"_pos": pos, "index": None, "path": e.rel, "label": e.label,
                                 "status": "failed", "error": why})
                failures.append((e.rel, why))
            n = len(b.positions) + len(b.failures)
            computed += n
            if bar is not None:
                bar.update(n)
                if failures:
                    bar.set_postfix(failed=len(failures), refresh=False)
        if current is not None:
            flush(current)
    finally:
        if bar is not None:
            bar.close()
    if dim == 0 and runner is not None:
        dim = runner.out_dim or dim
    barrier()
    seconds = time.perf_counter() - t_start
    if rank != 0:
        return Summary(len(entries), -1, len(failures), dim, seconds, computed, failures, None)
    meta = dict(info or {}, format_version=FORMAT_VERSION, dim=dim, total=len(entries),
                preprocess=preprocess, normalize=bool(normalize), precision=precision,
                draft=bool(draft), weights_sha256=fingerprint["weights"], world_size=world_size,
                manifest=paths["manifest"].name)
    n_ok, n_failed = _merge(paths, n_chunks, dim, meta)
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    return Summary(len(entries), n_ok, n_failed, dim, seconds, computed, failures,
                   paths["features"])


__all__ = ["extract_features", "extract_to_file", "read_features", "collect_inputs", "Entry",
           "decode_batches", "iter_batches", "output_paths", "ExtractError", "ImageLoadError",
           "PRECISIONS", "IMAGE_EXTENSIONS", "InferenceModel", "build_transform"]
