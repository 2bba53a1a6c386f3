"""Decoding JPEGs as tensors, in batches: nvJPEG on a GPU, libjpeg on the CPU (same code).

:func:`tensor_batches` reads the files' bytes in threads, decodes each batch of JPEGs with one
``torchvision.io.decode_jpeg`` call on ``device`` (``"cuda"``: nvJPEG; ``"cpu"``: the same path,
which is what the tests run), then resizes (antialiased, the preset's bicubic / bilinear) and
centre-crops every image as a tensor, with the geometry of the model's
:class:`~trex_hub.preprocess.PreprocessConfig` (on CUDA one batched call per distinct image
size). The result is the uint8 NHWC batch every other decoding path produces, already on
``device``. Decoding and resizing run in a thread of their own, one batch ahead of the caller's
forward pass (:func:`~trex_hub.decoding.in_background`).

Whatever this path cannot reproduce exactly goes to the reference PIL decoder
(:class:`~trex_hub.transforms.Decoder`) for that file alone, never failing the run: non-JPEG
files (PNG, ...), CMYK / YCCK JPEGs, JPEGs with an EXIF rotation (nvJPEG ignores it), truncated
JPEGs (no end marker: nvJPEG decodes those without an error), progressive JPEGs with data after
their end marker, in-memory inputs, and any file the batched decoder refuses (corrupt data).

It is not bit-exact with the PIL path: libjpeg's IDCT / chroma upsampling and the tensor
resampling kernels differ in rounding. ``docs/benchmarks.md`` gives the measured distance on
features; ``decode="cpu"`` stays the exact reference.
"""
from __future__ import annotations

import contextlib
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch

from .decoding import Batch, decode_item, in_background
from .preprocess import PreprocessConfig
from .transforms import Decoder, ImageLoadError, pixel_limit, resized_pixels_ok

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _exif_orientation(seg: Union[bytes, bytearray]) -> int:
    """The orientation tag of an APP1 Exif payload (1 when absent or unreadable)."""
    if not seg.startswith(b"Exif\0\0") or len(seg) < 14:
        return 1
    tiff = seg[6:]
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
        for i in range(count):
            at = ifd + 2 + 12 * i
            tag, _kind, _n = struct.unpack(order + "HHI", tiff[at:at + 8])
            if tag == 0x0112:
                return struct.unpack(order + "H", tiff[at + 8:at + 10])[0]
    except struct.error:
        return 1
    return 1


_SEQUENTIAL = {0xC0, 0xC1}  # sequential Huffman frames (baseline, extended)
_EOI = b"\xff\xd9"


def jpeg_extent(data: Union[bytes, bytearray], max_pixels: Optional[int] = None,
                resize: Optional[int] = None) -> Optional[int]:
    """How many leading bytes of ``data`` the tensor path decodes, or ``None`` when it would not
    decode them as PIL does. It takes JPEGs of 1 (grey) or 3 (YCbCr) components without an
    EXIF rotation, up to their end-of-image marker, and with ``max_pixels`` no more pixels than
    that, nor after ``Resize(resize)`` (the PIL path refuses a larger one with the usual
    message, whichever decoder runs).
    Reads the markers up to the first scan.

    The end marker keeps truncated files away from nvJPEG, which decodes them without an error
    (seen on an H100: half a JPEG was not refused) where PIL refuses them. A file normally ends
    with it. Data after it (a phone's motion-photo video, a camera's trailer) is cut off when
    the JPEG is sequential with all its components in one scan: in that scan the marker's two
    bytes cannot occur (an entropy-coded 0xFF is followed by 0x00 or a restart marker), so the
    first ones after the scan header end the image. Other JPEGs with data after their end (a
    progressive one, or one scan per component) go to PIL, which decodes them."""
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff":
        return None
    at, orientation, frame, components = 2, 1, None, 0
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        (length,) = struct.unpack(">H", data[at + 2:at + 4])
        seg = data[at + 4:at + 2 + length]
        if marker == 0xE1 and frame is None:
            orientation = _exif_orientation(seg)
        elif marker in _SOF and frame is None:
            if len(seg) < 6 or seg[5] not in (1, 3) or orientation != 1:
                return None
            height, width = struct.unpack(">HH", seg[1:5])
            if max_pixels is not None and not 0 < height * width <= max_pixels:
                return None  # 0: a height given later (DNL), which PIL handles
            if max_pixels is not None and resize and not resized_pixels_ok(
                    width, height, resize, max_pixels):
                return None
            frame, components = marker, seg[5]
        elif marker == 0xDA:  # the first scan
            if frame is None:  # a scan before any frame header: malformed
                return None
            if data[-2:] == _EOI:
                return len(data)
            if frame not in _SEQUENTIAL or len(seg) < 1 or seg[0] != components:
                return None
            end = data.find(_EOI, at + 2 + length)
            return None if end < 0 else end + 2
        at += 2 + length
    return None


def jpeg_fits(data: Union[bytes, bytearray]) -> bool:
    """Whether the tensor path decodes ``data`` (or its JPEG part) as PIL would:
    :func:`jpeg_extent` is not ``None``."""
    return jpeg_extent(data) is not None


READ_CHUNK = 32  # files per reader task (see :func:`submit_chunks`)
MAX_JPEG_BYTES = 1 << 28  # larger files go to the PIL path unread (it checks the pixel limit)


def file_bytes(path: Union[str, os.PathLike],
               max_bytes: Optional[int] = None) -> Optional[bytearray]:
    """The whole content of a file in one writable buffer (``torch.frombuffer`` shares it), or
    ``None`` when it holds more than ``max_bytes``, without reading it then.

    An unbuffered ``readinto`` of the size ``fstat`` gives: less than half ``Path.read_bytes``'s
    Python time per file (about 19 against 45 us on 30 kB photos, 2 cores), which matters in a
    stage that holds the GIL beside the model's launches. A file that changed size meanwhile is
    still read whole."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            return None
        buf = bytearray(size)
        got = 0
        with memoryview(buf) as view:
            while got < len(buf):
                n = fh.readinto(view[got:])
                if not n:
                    break
                got += n
        del buf[got:]
        # grown since fstat, or a special file that reports no size
        rest = fh.read() if max_bytes is None else fh.read(max_bytes - got + 1)
    if rest:
        buf += rest
    if max_bytes is not None and len(buf) > max_bytes:
        return None
    return buf


def read_jpeg_file(path: Union[str, os.PathLike], max_pixels: Optional[int] = None,
                   resize: Optional[int] = None) -> Optional[torch.Tensor]:
    """The JPEG bytes of ``path`` (:func:`jpeg_extent`: without data after the end marker) as a
    uint8 tensor when the tensor path decodes them as PIL would; ``None`` otherwise: unreadable
    files, images over ``max_pixels`` (before or after ``Resize(resize)``), and files over
    :data:`MAX_JPEG_BYTES`, which are not read into memory (the PIL fallback then decides, or
    names the problem)."""
    try:
        data = file_bytes(path, MAX_JPEG_BYTES)
    except OSError:
        return None
    if data is None:
        return None
    n = jpeg_extent(data, max_pixels, resize)
    if n is None:
        return None
    raw = torch.frombuffer(data, dtype=torch.uint8)
    return raw if n == len(data) else raw[:n]


def submit_chunks(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any],
                  workers: int, min_chunk: int = READ_CHUNK) -> List[Any]:
    """Futures of ``[fn(item) for item in chunk]`` over consecutive chunks of ``items``: at most
    ``workers`` chunks, each of at least ``min_chunk`` items (but the last).

    One task per file cost more than the read itself: each future, and each of 16 threads
    taking the GIL back after its system calls, slowed the thread that launches the model.
    ``benchmarks/read_stage_bench.py`` measures it."""
    items = list(items)
    size = max(min_chunk, -(-len(items) // max(1, workers)), 1)
    return [pool.submit(lambda part: [fn(i) for i in part], items[at:at + size])
            for at in range(0, len(items), size)]


_DECODE_STREAMS: Dict[int, Any] = {}


def _decode_jpegs(datas: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """``decode_jpeg`` on a batch; on CUDA on a stream of its own.

    torchvision's CUDA decoder allocates its outputs on the caller's current stream and lets
    nvJPEG (whose hardware engine does not wait for queued work) write them at once. On the
    caller's stream the caching allocator may hand it a block that queued kernels of the previous
    batch still read, which corrupts that batch (wrong features, NaN; seen on an H100). A block
    allocated on a private stream is only ever reused on that stream, and ``record_stream``
    keeps each output from being reused before the caller's kernels that read it have run."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io -> torchcodec notice
        if device.type != "cuda":
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = _DECODE_STREAMS.get(index)
        if stream is None:
            stream = _DECODE_STREAMS[index] = torch.cuda.Stream(index)
        consumer = torch.cuda.current_stream(index)
        with torch.cuda.stream(stream):
            out = list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        consumer.wait_stream(stream)
        for img in out:
            img.record_stream(consumer)
    return out


class TensorGeometry:
    """Resize the shorter side (antialiased) and centre-crop ``[..., 3, H, W]`` uint8 tensors, as
    ``transforms.Resize`` / ``CenterCrop`` do on tensors."""

    def __init__(self, cfg: PreprocessConfig):
        from torchvision.transforms import InterpolationMode

        self.cfg = cfg
        self.mode = InterpolationMode(cfg.interpolation)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        img = TF.resize(img, [self.cfg.resize], interpolation=self.mode, antialias=True)
        return TF.center_crop(img, [self.cfg.crop, self.cfg.crop])

    def batch(self, imgs: Sequence[torch.Tensor], grouped: Optional[bool] = None) -> torch.Tensor:
        """``crop x crop`` uint8 NHWC of ``[3, H, W]`` images of any sizes, in their order.

        ``grouped`` (default: on CUDA) resizes the images of one size in one batched call; the
        kernels work plane by plane, so the pixels are those of one call per image. On a GPU
        that cuts the Python work and kernel launches of a batch of photos from several per
        image to several per distinct size. On the CPU torch's uint8 kernel is slower on a
        batch than image by image (one batch of 64 photos of 500x375, 2 cores, best of 3, two
        runs: 158-159 against 299-318 images/s, i.e. 0.5x; ``benchmarks/gpu_pipeline_profile.py
        --device cpu --images 64 --batch 64 --rounds 3``), so there each image has its call."""
        if not imgs:
            raise ValueError("no images to resize")
        if not (imgs[0].is_cuda if grouped is None else grouped):
            return torch.stack([self(img).permute(1, 2, 0) for img in imgs])
        by_size: Dict[Tuple[int, int], List[int]] = {}
        for i, img in enumerate(imgs):
            by_size.setdefault((img.shape[-2], img.shape[-1]), []).append(i)
        rows: List[Optional[torch.Tensor]] = [None] * len(imgs)
        for idx in by_size.values():
            group = imgs[idx[0]][None] if len(idx) == 1 else torch.stack([imgs[i] for i in idx])
            out = self(group).permute(0, 2, 3, 1)
            if len(idx) == len(imgs):
                return out.contiguous()
            for k, i in enumerate(idx):
                rows[i] = out[k]
        return torch.stack(rows)  # type: ignore[arg-type]


def callers_stream(device: torch.device) -> Callable[[], Any]:
    """A context factory that enters, in another thread, the calling thread's CUDA device and
    current stream (a no-op off CUDA): kernels queued there run in order with the caller's."""
    if device.type != "cuda":
        return contextlib.nullcontext
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(index))
        stack.enter_context(torch.cuda.stream(stream))
        return stack

    return enter


def tensor_batches(groups: Iterable[Sequence[int]], fetch: Callable[[int], Any],
                   decoder: Decoder, cfg: PreprocessConfig, *,
                   device: Union[str, torch.device] = "cpu", num_workers: int = 4,
                   prefetch: int = 2, strict: bool = True,
                   describe: Callable[[int], str] = "item {}".format,
                   catch_all: bool = False, background: bool = True) -> Iterator[Batch]:
    """Batches of ``crop x crop`` uint8 NHWC tensors on ``device`` (see the module docstring).
    ``decoder`` is the PIL fallback (same preset); failures follow
    :func:`trex_hub.decoding.decode_batches` (``strict`` raises, else they are reported).

    Three stages overlap: up to ``num_workers`` threads read files (and check their headers)
    in chunks of at least :data:`READ_CHUNK` files per task (:func:`submit_chunks`), one
    thread decodes and resizes batch k + 1 (nvJPEG waits for its stream with the GIL released),
    and the caller runs the model on batch k. On CUDA the resize kernels are queued on the
    caller's current stream, so the caller's kernels see finished batches without a sync.
    ``background=False`` decodes and resizes in the iterating thread instead (a caller that
    runs this in a thread of its own: :mod:`trex_hub.decode_hybrid`)."""
    device = torch.device(device)
    geometry = TensorGeometry(cfg)
    limit = pixel_limit(getattr(decoder, "max_pixels", None))

    def fallback(pos: int, item: Any) -> Tuple[Optional[np.ndarray], Optional[str]]:
        return decode_item(decoder, lambda: item, describe(pos), strict=strict,
                           catch_all=catch_all)

    def read(pos: int):
        """(pos, (item, JPEG bytes as a uint8 tensor), None) for the batched decoder, else
        (pos, None, PIL result)."""
        try:
            item = fetch(pos)
        except ImageLoadError as exc:  # an input known to be unreadable before decoding
            if strict:
                raise
            return pos, None, (None, str(exc))
        if isinstance(item, (str, os.PathLike)):
            raw = read_jpeg_file(item, limit, cfg.resize)
            if raw is not None:
                return pos, (item, raw), None
        return pos, None, fallback(pos, item)

    def decode(raw: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        try:
            return list(_decode_jpegs(raw, device))
        except RuntimeError:  # one bad file fails the batched call: retry one by one
            imgs: List[Optional[torch.Tensor]] = []
            for r in raw:
                try:
                    imgs.append(_decode_jpegs([r], device)[0])
                except RuntimeError:
                    imgs.append(None)
            return imgs

    def assemble(results) -> Batch:
        jpegs = [(pos, jd) for pos, jd, _ in results if jd is not None]
        imgs = decode([raw for _, (_, raw) in jpegs]) if jpegs else []
        fine = [img for img in imgs if img is not None]
        resized = geometry.batch(fine) if fine else None
        if resized is not None and len(fine) == len(results):  # every file by nvJPEG
            return Batch([pos for pos, _, _ in results], resized, [])
        decoded: Dict[int, torch.Tensor] = {}
        k = 0
        for (pos, _), img in zip(jpegs, imgs):
            if img is not None:
                decoded[pos] = resized[k]  # type: ignore[index]
                k += 1
        ok, tensors, failures = [], [], []
        for pos, jd, res in results:
            if pos in decoded:
                pix = decoded[pos]
            else:
                if jd is not None:  # refused by the batched decoder: the PIL path
                    res = fallback(pos, jd[0])
                if res[0] is None:
                    failures.append((pos, res[1]))
                    continue
                pix = torch.from_numpy(np.array(res[0]))  # PIL's array is read-only
                # pinned: the upload queues behind the model's work instead of waiting for it
                pix = (pix.pin_memory() if device.type == "cuda" else pix).to(
                    device, non_blocking=True)
            ok.append(pos)
            tensors.append(pix)
        data = torch.stack(tensors) if tensors else None
        return Batch(ok, data, failures)

    def produce() -> Iterator[Batch]:
        pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="trex-read")
        try:
            it = iter(groups)
            pending: List[list] = []

            def fill() -> None:
                while len(pending) <= prefetch:
                    group = next(it, None)
                    if group is None:
                        return
                    pending.append(submit_chunks(pool, read, group, num_workers))

            fill()
            while pending:
                futures = pending.pop(0)
                results = [r for f in futures for r in f.result()]
                fill()
                yield assemble(results)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    if not background:
        return produce()
    return in_background(produce, depth=1, name="trex-decode", context=callers_stream(device))


__all__ = ["tensor_batches", "jpeg_fits", "jpeg_extent", "TensorGeometry", "file_bytes",
           "read_jpeg_file", "submit_chunks", "callers_stream"]
