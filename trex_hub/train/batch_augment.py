"""The batched multi-crop path (``--aug gpu``): loader workers decode, the device augments.

Workers (:class:`DecodedMultiCropDataset`, :func:`collate_decoded`) only

1. read the image size from the file header and draw every crop's parameters from the
   per-(seed, epoch, index) ``random.Random`` with :meth:`MultiCrop.draw`, the same call and
   order as the PIL path, so the crops depend neither on the workers nor on the processes;
2. decode (JPEG draft mode only where every crop still shrinks by at least 2x after it, see
   :func:`draft_factor`);
3. hand over uint8 ``[n, 3, H, W]`` tensors, zero-padded in groups of similar sizes, plus the
   drawn parameters as one float64 ``[B, crops, 17]`` tensor.

:class:`BatchAugment` then runs on the training device (CUDA, or the CPU for tests and for
``--aug gpu`` on a CPU-only machine): per-image crop + bicubic antialiased resize + flip as two
batched matrix products, then colour jitter (each image's own random order), grayscale, Gaussian
blur and solarisation batched over all crops of one size, and the mean/std normalisation, with
:mod:`.tensor_ops` (Pillow's arithmetic, so the result matches the PIL path to a level or so).
Which images an operation touches is decided on the host from the drawn parameters: the device
is never read.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from . import tensor_ops as T
from .augment import CropParams, MultiCrop, MultiCropDataset, sample_rng

# columns of the per-crop parameter rows
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER = 0, 1, 2, 3, 4, 5
ORDER = slice(6, 10)
BRIGHT, CONTRAST, SATUR, HUE, GRAY, BLUR, SOLAR = 10, 11, 12, 13, 14, 15, 16
NUM_COLS = 17
GROUP_PIXELS = 1 << 25  # at most this many (padded) pixels per decoded group


def pack_params(params: Sequence[CropParams], sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    """``[crops, 17]`` float64 rows; the box is scaled by ``(sx, sy)`` into the decoded image."""
    out = np.zeros((len(params), NUM_COLS), dtype=np.float64)
    for k, p in enumerate(params):
        top, left, h, w = p.box
        out[k, :4] = (top * sy, left * sx, h * sy, w * sx)
        out[k, FLIP] = float(p.flip)
        if p.jitter is not None:
            order, b, c, s, h_ = p.jitter
            out[k, JITTER] = 1.0
            out[k, ORDER] = order
            out[k, BRIGHT:HUE + 1] = (b, c, s, h_)
        out[k, GRAY] = float(p.gray)
        out[k, BLUR] = 0.0 if p.blur is None else float(p.blur)
        out[k, SOLAR] = float(p.solarize)
    return out


def draft_factor(params: Sequence[CropParams], sizes: Sequence[int]) -> int:
    """The JPEG draft reduction (1, 2, 4 or 8) allowed for these crops: the largest ``r`` such
    that every crop box is still at least ``2 r`` times its output size on its shorter side, i.e.
    after the DCT-domain reduction by ``r`` the bicubic resize still antialiases a reduction of
    at least 2x (measured difference to a full decode: tests/test_train_augment.py)."""
    shrink = min(min(p.box[2], p.box[3]) / float(size) for p, size in zip(params, sizes))
    r = 1
    while r < 8 and shrink >= 4 * r:
        r *= 2
    return r


class DecodedMultiCropDataset(MultiCropDataset):
    """``(uint8 [3, H, W] tensor, float64 [crops, 17] parameters, label)`` per sample.

    ``base`` is a :class:`trex_hub.datasets.LabeledImages` (paths, arrays or PIL images).
    ``draft=False`` always decodes at full resolution.
    """

    def __init__(self, base: Any, transform: MultiCrop, seed: int = 0, draft: bool = True):
        super().__init__(base, transform, seed)
        self.draft = bool(draft)
        self.sizes = [spec.size for spec in transform.specs]

    def _decode(self, item: Any, what: str, epoch: int,
                index: int) -> Tuple[np.ndarray, List[CropParams], float, float]:
        from ..transforms import open_image, to_rgb

        if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__"):
            try:
                with Image.open(item) as img:
                    raw_w, raw_h = img.size
                    limit = Image.MAX_IMAGE_PIXELS
                    if limit and raw_w * raw_h > limit:
                        raise ValueError("over the pixel limit")
                    # to_rgb applies the EXIF orientation: draw on the size the PIL path sees
                    turned = img.getexif().get(0x0112) in (5, 6, 7, 8)
                    w, h = (raw_h, raw_w) if turned else (raw_w, raw_h)
                    params = self.transform.draw(w, h, sample_rng(self.seed, epoch, index))
                    r = draft_factor(params, self.sizes) if (self.draft and
                                                             img.format == "JPEG") else 1
                    if r > 1:
                        img.draft("RGB", (math.ceil(raw_w / r), math.ceil(raw_h / r)))
                    img.load()
                    rgb = to_rgb(img)
                    return np.asarray(rgb), params, rgb.width / w, rgb.height / h
            except Exception:
                pass  # open_image below names the file and the problem (or reads it after all)
        img = open_image(item, what)  # a fresh generator: the draws above may be half done
        params = self.transform.draw(img.width, img.height, sample_rng(self.seed, epoch, index))
        return np.asarray(img), params, 1.0, 1.0

    def __getitem__(self, item: Any):
        epoch, index = self.split_index(item)
        name = getattr(self.base, "name", None) or "dataset"
        arr, params, sx, sy = self._decode(self.base.items[index], f"{name} item {index}", epoch,
                                           index)
        chw = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return chw, torch.from_numpy(pack_params(params, sx, sy)), int(self.base.labels[index])


def collate_decoded(samples: Sequence[Tuple[torch.Tensor, torch.Tensor, int]],
                    group_pixels: int = GROUP_PIXELS) -> Dict[str, Any]:
    """Batch of decoded samples: images sorted by (height, width) into zero-padded groups of at
    most ``group_pixels`` padded pixels (one image alone may exceed it), with their positions.
    Linear in the batch size: each group keeps its running padded height and width."""
    hw = [(int(s[0].shape[1]), int(s[0].shape[2])) for s in samples]
    order = sorted(range(len(samples)), key=hw.__getitem__)
    groups: List[torch.Tensor] = []
    index: List[torch.Tensor] = []

    def flush(cur: List[int], hmax: int, wmax: int) -> None:
        imgs = [samples[i][0] for i in cur]
        if all(hw[i] == (hmax, wmax) for i in cur):
            g = torch.stack(imgs)
        else:
            g = torch.zeros(len(cur), 3, hmax, wmax, dtype=torch.uint8)
            for j, img in enumerate(imgs):
                g[j, :, :img.shape[1], :img.shape[2]] = img
        groups.append(g)
        index.append(torch.tensor(cur, dtype=torch.int64))

    cur: List[int] = []
    hmax = wmax = 0
    for i in order:
        h, w = max(hmax, hw[i][0]), max(wmax, hw[i][1])
        if cur and (len(cur) + 1) * h * w > group_pixels:
            flush(cur, hmax, wmax)
            cur, h, w = [], hw[i][0], hw[i][1]
        cur.append(i)
        hmax, wmax = h, w
    if cur:
        flush(cur, hmax, wmax)
    return {"groups": groups, "index": index,
            "sizes": torch.tensor(hw, dtype=torch.int64).reshape(len(samples), 2),
            "params": torch.stack([s[1] for s in samples]),
            "labels": torch.tensor([s[2] for s in samples], dtype=torch.int64)}


class BatchAugment:
    """Runs the crops of a :func:`collate_decoded` batch on ``device``: returns the list of
    normalised ``[B, 3, S, S]`` float32 crop batches (crop-major, as the PIL path's loader) and the
    labels on the device."""

    def __init__(self, transform: MultiCrop, device: Any = "cpu", channels_last: bool = False):
        self.transform = transform
        self.device = torch.device(device)
        self.channels_last = bool(channels_last)

    def _to(self, array: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        t = torch.as_tensor(array) if dtype is None else torch.as_tensor(array, dtype=dtype)
        return t.to(self.device, non_blocking=True)

    def crop_sizes(self) -> List[Tuple[int, List[int]]]:
        """``(size, crop indices)`` per crop resolution, largest first."""
        specs = self.transform.specs
        return [(size, [k for k, s in enumerate(specs) if s.size == size])
                for size in sorted({s.size for s in specs}, reverse=True)]

    def crops(self, batch: Dict[str, Any]) -> Dict[int, torch.Tensor]:
        """Crop + resize + flip of every crop (levels 0..255, float32): per crop size, the
        crop-major ``[k, B, 3, size, size]`` tensor of its ``k`` crops (:meth:`crop_sizes`)."""
        params = batch["params"].numpy()
        n = params.shape[0]
        by_size = self.crop_sizes()
        out = {size: torch.empty(len(ks), n, 3, size, size, device=self.device)
               for size, ks in by_size}
        sizes = batch["sizes"]
        for group, index in zip(batch["groups"], batch["index"]):
            x = group.to(self.device, non_blocking=True).float()
            idx = index.numpy()
            idx_dev = self._to(idx)
            size_dev = self._to(sizes[index])
            for size, ks in by_size:
                rows = params[idx][:, ks]  # [m, k, 17]
                boxes = self._to(np.ascontiguousarray(rows[..., :4]))
                flip = self._to(rows[..., FLIP] > 0.5)
                out[size].index_copy_(1, idx_dev, T.resized_crops(x, size_dev, boxes, size, flip))
        return out

    def colour(self, x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
        """Jitter (per-image order), grayscale, blur, solarise on ``x`` (levels) with the rows
        ``p`` ([m, 17], host) of its crops."""
        jitter = p[:, JITTER] > 0.5
        order = p[:, ORDER].astype(np.int64)
        ops = ((T.brightness, BRIGHT), (T.contrast, CONTRAST), (T.saturation, SATUR),
               (T.hue, HUE))
        for step in range(4):
            for op, (fn, col) in enumerate(ops):
                sel = np.nonzero(jitter & (order[:, step] == op))[0]
                if len(sel):
                    idx = self._to(sel)
                    x.index_copy_(0, idx, fn(x.index_select(0, idx), p[sel, col]))
        sel = np.nonzero(p[:, GRAY] > 0.5)[0]
        if len(sel):
            idx = self._to(sel)
            x.index_copy_(0, idx, T.grayscale(x.index_select(0, idx)))
        sel = np.nonzero(p[:, BLUR] > 0)[0]
        if len(sel):
            idx = self._to(sel)
            blur = T.box_blur_params(p[sel, BLUR])
            x.index_copy_(0, idx, T.gaussian_blur(x.index_select(0, idx), blur))
        sel = np.nonzero(p[:, SOLAR] > 0.5)[0]
        if len(sel):
            idx = self._to(sel)
            x.index_copy_(0, idx, T.solarize(x.index_select(0, idx)))
        return x

    def __call__(self, batch: Dict[str, Any]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        levels = self.crops(batch)
        params = batch["params"].numpy()
        specs = self.transform.specs
        n = params.shape[0]
        result: List[Optional[torch.Tensor]] = [None] * len(specs)
        for size, ks in self.crop_sizes():
            x = levels[size].view(len(ks) * n, 3, size, size)  # crop-major, as the rows below
            rows = np.concatenate([params[:, k] for k in ks])
            photometric = np.repeat([specs[k].photometric for k in ks], n)
            sel = np.nonzero(photometric)[0]
            if len(sel) == len(rows):
                x = self.colour(x, rows)
            elif len(sel):
                idx = self._to(sel)
                x.index_copy_(0, idx, self.colour(x.index_select(0, idx), rows[sel]))
            x = T.normalize(x, self.transform.mean, self.transform.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for j, part in enumerate(x.split(n)):
                result[ks[j]] = part
        labels = batch["labels"].to(self.device, non_blocking=True)
        return [r for r in result if r is not None], labels


__all__ = ["DecodedMultiCropDataset", "collate_decoded", "BatchAugment", "pack_params",
           "draft_factor", "NUM_COLS"]
