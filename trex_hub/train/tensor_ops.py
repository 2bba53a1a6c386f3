"""Batched tensor versions of the PIL operations of the multi-crop recipe (any device).

Every function takes float32 images ``[n, 3, H, W]`` holding integer levels 0..255 (the values a
PIL ``RGB`` image holds) and returns the same, so that a chain of operations rounds to 8 bits
between steps exactly where Pillow does. Each one follows Pillow's C code (``Resample.c``,
``Blend.c``, ``Convert.c``, ``BoxBlur.c``; Pillow 9-13) and torchvision's PIL functions:

* :func:`resample_weights` + :func:`resized_crop`: ``Image.resize(size, BICUBIC, box=...)``:
  a = -0.5 cubic, antialiased when reducing (support scaled by the reduction), taps clipped to the
  image (not to the box), weights normalised then quantised to 22-bit fixed point, horizontal
  pass first, each pass rounded and clipped to 8 bits. Both passes are batched matrix products
  with per-image weight matrices, so images of different sizes (zero-padded) and boxes go in one
  call; a horizontal flip is folded into the weights.
* :func:`brightness`, :func:`contrast`, :func:`saturation`: ``ImageEnhance`` = ``Image.blend``
  with a black / mean-luma grey / luma image, truncated to 8 bits.
* :func:`hue`: torchvision's PIL ``adjust_hue``: Pillow's 8-bit RGB -> HSV, hue shifted by
  ``int(factor * 255)`` modulo 256, HSV -> RGB. Both conversions map 2**24 triples of levels to
  levels, so on CUDA they are computed once for every triple (:func:`hue_direct`'s arithmetic)
  and looked up (:func:`hue_tables`); the CPU computes them pixel by pixel.
* :func:`grayscale`: ``convert("L").convert("RGB")`` (ITU-R 601-2 luma, 16-bit fixed point).
* :func:`gaussian_blur`: ``ImageFilter.GaussianBlur(radius)``, which Pillow computes as three
  passes of an extended box blur per direction (edge pixels repeated), each rounded to 8 bits.
* :func:`solarize`: ``ImageOps.solarize(threshold=128)``.

Float32 sums of several hundred products can land on the other side of a rounding boundary than
Pillow's integer sums, so single levels may differ now and then (measured in
``tests/test_train_augment.py``); nothing else does.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic filter (a = -0.5, support 2)."""
    a = -0.5
    x = x.abs()
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, inner, torch.where(x < 2.0, outer, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, end: torch.Tensor, in_size: torch.Tensor,
                     out_size: int, length: int,
                     mirror: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[n, out_size, length]`` float32 weights of Pillow's bicubic resampling of the input
    interval ``[start, end)`` (per image) onto ``out_size`` pixels, for inputs of ``in_size``
    valid pixels zero-padded to ``length`` (the padding never gets a weight). Where ``mirror``
    (``[n]`` bool) is set, the output pixels come in reverse order (a flip of the result): the
    same rows, computed for output ``out_size - 1 - j`` at row ``j``.

    The taps of each output pixel are computed in float64 as Pillow does (``precompute_coeffs``),
    on a band of ``ksize`` taps that bounds every possible window, then scattered into the dense
    matrix at distinct columns (deterministic)."""
    dev = start.device
    n = start.shape[0]
    start, end = start.double(), end.double()
    scale = (end - start) / out_size  # [n]
    fscale = scale.clamp_min(1.0)
    support = 2.0 * fscale
    ksize = 2 * int(math.ceil(2.0 * max(length / out_size, 1.0))) + 2
    j = torch.arange(out_size, dtype=torch.float64, device=dev)[None, :].expand(n, out_size)
    if mirror is not None:  # exact: the same integer-valued j, in the other order
        j = torch.where(mirror.reshape(n, 1), (out_size - 1) - j, j)
    center = start[:, None] + (j + 0.5) * scale[:, None]  # [n, out]
    # (int)(v + 0.5) of Pillow; v + 0.5 < 0 only clamps to 0 anyway, so floor == trunc here
    lo = torch.floor(center - support[:, None] + 0.5).clamp_min(0.0)
    hi = torch.minimum(torch.floor(center + support[:, None] + 0.5),
                       in_size.to(dev).double()[:, None])
    x = lo[..., None] + torch.arange(ksize, dtype=torch.float64, device=dev)  # [n, out, k]
    w = _cubic((x - center[..., None] + 0.5) / fscale[:, None, None])
    valid = x < hi[..., None]
    w = torch.where(valid, w, torch.zeros_like(w))
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    one = float(1 << PRECISION_BITS)
    w = torch.copysign(torch.floor(w.abs() * one + 0.5), w) / one  # (int)(w * one +- 0.5)
    cols = torch.where(valid, x, torch.full_like(x, float(length))).long()
    dense = torch.zeros(n, out_size, length + 1, dtype=torch.float32, device=dev)
    dense.scatter_(2, cols, w.float())  # valid columns are distinct; the rest goes to a spare
    return dense[..., :length]


def _round8_(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``clip8`` of a fixed-point sum, in place (``x``: a temporary of the caller's):
    round half up, clip to 0..255."""
    return x.add_(0.5).floor_().clamp_(0.0, 255.0)


def resized_crop(images: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, out_size: int,
                 flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Crop ``boxes`` (``[n, 4]`` float: top, left, height, width in pixels) out of ``images``
    (``[n, 3, H, W]`` levels, image i valid on ``sizes[i] = (h, w)``, zero-padded) and resize each
    to ``out_size`` squared, as ``PIL.Image.resize(..., BICUBIC, box=...)``; ``flip`` (``[n]``
    bool) mirrors the result horizontally."""
    flips = None if flip is None else flip[:, None]
    return resized_crops(images, sizes, boxes[:, None], out_size, flips)[0].contiguous()


# at most this much for the float32 horizontal pass of one call's crops: on CUDA, room for the
# largest products; on the CPU, what its caches hold (there, one large product is slower than
# the same work in slices)
CROP_BYTES = {"cuda": 1 << 30, "cpu": 1 << 24}


def resized_crops(images: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, out_size: int,
                  flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`resized_crop` of ``k`` boxes per image at once (``boxes``: ``[n, k, 4]``, ``flip``:
    ``[n, k]``), returned crop-major: ``[k, n, 3, out_size, out_size]`` (a permuted view).

    The horizontal pass of all ``k`` crops is one matrix product per image (the image is read
    once, the ``k`` weight matrices side by side), the vertical pass one batched product; the
    crops go in slices whose horizontal result stays under :data:`CROP_BYTES` for the device."""
    n, _, height, width = images.shape
    k = boxes.shape[1]
    budget = CROP_BYTES.get(images.device.type, CROP_BYTES["cpu"])
    step = max(1, min(k, budget // max(1, n * 3 * height * out_size * 4)))
    out = []
    for first in range(0, k, step):
        part = boxes[:, first:first + step]
        m = part.shape[1]
        top, left, h, w = part.reshape(n * m, 4).double().unbind(1)
        hw = sizes[:, None].expand(n, m, 2).reshape(n * m, 2)
        mirror = None if flip is None else flip[:, first:first + step].reshape(n * m)
        wx = resample_weights(left, left + w, hw[:, 1], out_size, width, mirror)  # [n m, S, W]
        wy = resample_weights(top, top + h, hw[:, 0], out_size, height)  # [n m, S, H]
        # horizontal: rows (crop, output column), columns (channel, input row): no operand is
        # copied (the transposed image is a BLAS flag), and the result is the vertical pass's
        # left operand as it lies
        flat = images.reshape(n, 3 * height, width).transpose(1, 2)  # [n, W, 3 H]
        tmp = _round8_(torch.bmm(wx.reshape(n, m * out_size, width), flat))  # [n, m S, 3 H]
        tmp = tmp.reshape(n * m, out_size * 3, height)
        res = _round8_(torch.bmm(tmp, wy.transpose(1, 2)))  # [n m, S (column) x 3, S (row)]
        out.append(res.reshape(n, m, out_size, 3, out_size).permute(1, 0, 3, 4, 2))
    return out[0] if len(out) == 1 else torch.cat(out)


def _factor(values, like: torch.Tensor) -> torch.Tensor:
    """Per-image factors (host values: no device read) as ``[n, 1, 1, 1]`` float32 on ``like``'s
    device; Pillow receives the factor as a C ``float``."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return t.to(like.device, non_blocking=True).reshape(-1, 1, 1, 1)


def blend(degenerate: torch.Tensor, images: torch.Tensor, alpha) -> torch.Tensor:
    """``Image.blend(degenerate, image, alpha)``: ``d + alpha (x - d)`` in float32, truncated to
    8 bits (``alpha`` per image)."""
    a = _factor(alpha, images)
    # (UINT8) of a value in [0, 255] truncates; values below 0 clamp to 0 either way: floor
    return torch.floor(degenerate + a * (images - degenerate)).clamp_(0.0, 255.0)


def luma(images: torch.Tensor) -> torch.Tensor:
    """``[n, 1, H, W]`` Pillow ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 32768) >> 16``
    (exact in float32: every intermediate is an integer below 2**24)."""
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    out = r * 19595.0  # one temporary, summed into in place (exact in any order)
    out.add_(g, alpha=38470.0).add_(b, alpha=7471.0)
    return out.add_(32768.0).div_(65536.0).floor_()


def brightness(images: torch.Tensor, factor) -> torch.Tensor:
    """:func:`blend` with black: ``0 + a (x - 0)`` is ``a x`` exactly, so no black image."""
    return torch.floor(images * _factor(factor, images)).clamp_(0.0, 255.0)


def contrast(images: torch.Tensor, factor) -> torch.Tensor:
    """Blend with a grey image at the rounded mean luma (``ImageEnhance.Contrast``)."""
    mean = luma(images).mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64)
    grey = torch.floor(mean + 0.5).float().expand_as(images)
    return blend(grey, images, factor)


def saturation(images: torch.Tensor, factor) -> torch.Tensor:
    return blend(luma(images).expand_as(images), images, factor)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    return luma(images).expand_as(images).contiguous()


def _rgb_to_hsv(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pillow's ``rgb2hsv_row`` (float32 arithmetic where the C code uses ``float``)."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    grey = maxc == minc
    cr = torch.where(grey, torch.ones_like(maxc), maxc - minc)
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h = torch.where(r == maxc, bc - gc,
                    torch.where(g == maxc, (2.0 + rc.double() - bc.double()).float(),
                                (4.0 + gc.double() - rc.double()).float()))
    h = torch.fmod(h.double() / 6.0 + 1.0, 1.0).float()
    uh = torch.floor(h.double() * 255.0).clamp_(0, 255).float()  # (int) of a value >= 0
    us = torch.floor(s.double() * 255.0).clamp_(0, 255).float()
    zero = torch.zeros_like(uh)
    return torch.where(grey, zero, uh), torch.where(grey, zero, us), maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pillow's ``hsv2rgb`` (``[n, H, W]`` levels in, ``[n, 3, H, W]`` out)."""
    h6 = h.double() * 6.0 / 255.0
    i = torch.floor(h6)
    f = (h6 - i).float()
    fs = (s.double() / 255.0).float()
    vd = v.double()
    p = torch.floor(vd * (1.0 - fs.double()) + 0.5).clamp_(0, 255).float()
    q = torch.floor(vd * (1.0 - (fs * f).double()) + 0.5).clamp_(0, 255).float()
    t = torch.floor(vd * (1.0 - fs.double() * (1.0 - f.double())) + 0.5).clamp_(0, 255).float()
    sector = torch.remainder(i, 6).to(torch.int64)
    table = (  # (r, g, b) per sector
        (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    out = []
    for ch in range(3):
        c = table[5][ch]
        for k in range(4, -1, -1):
            c = torch.where(sector == k, table[k][ch], c)
        out.append(torch.where(s == 0, v, c))
    return torch.stack(out, dim=1)


def hue_direct(images: torch.Tensor, factor) -> torch.Tensor:
    """:func:`hue` computed pixel by pixel with Pillow's float arithmetic (what the lookup
    tables of :func:`hue_tables` are made of; about 120 elementwise operations, many in float64,
    against a dozen for :func:`hue`)."""
    h, s, v = _rgb_to_hsv(images)
    h = torch.remainder(h + _factor(_hue_shift(factor), images).reshape(-1, 1, 1), 256.0)
    return _hsv_to_rgb(h, s, v)


def _hue_shift(factor) -> np.ndarray:
    """``int(factor * 255) mod 256`` per image, as torchvision's PIL ``adjust_hue``."""
    return np.remainder(np.trunc(np.asarray(factor, dtype=np.float64) * 255.0), 256.0)


_HUE_TABLES: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
_HUE_LOCK = threading.Lock()
_TABLE_ROWS = 16  # first levels per slice when filling the tables (16 x 65,536 colours)


def _all_levels(first: int, dev: torch.device) -> Tuple[torch.Tensor, ...]:
    """Three ``[1, _TABLE_ROWS * 256, 256]`` float32 planes holding every triple (a, b, c) with
    ``a`` in ``first .. first + _TABLE_ROWS - 1`` and b, c in 0..255, in code order."""
    lv = torch.arange(256, dtype=torch.float32, device=dev)
    a = torch.arange(first, first + _TABLE_ROWS, dtype=torch.float32, device=dev)
    grid = torch.meshgrid(a, lv, lv, indexing="ij")
    return tuple(g.reshape(1, _TABLE_ROWS * 256, 256) for g in grid)


def hue_tables(device: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pillow's 8-bit colour conversions of :func:`hue` as lookup tables on ``device``, made
    once per device (about 2 s on 2 CPU cores; 80 MB) from :func:`_rgb_to_hsv` and
    :func:`_hsv_to_rgb` themselves, so looking up is exactly computing:

    * ``hs[(r << 16) | (g << 8) | b]`` = (hue, saturation) uint8 of the colour (r, g, b)
      (its value is ``max(r, g, b)``);
    * ``rgb[(h << 16) | (s << 8) | v]`` = (r, g, b) uint8 of the 8-bit HSV triple.
    """
    dev = torch.device(device)
    key = str(dev)
    with _HUE_LOCK:
        if key not in _HUE_TABLES:
            hs = torch.empty(1 << 24, 2, dtype=torch.uint8, device=dev)
            rgb = torch.empty(1 << 24, 3, dtype=torch.uint8, device=dev)
            for first in range(0, 256, _TABLE_ROWS):
                rows = slice(first << 16, (first + _TABLE_ROWS) << 16)
                planes = _all_levels(first, dev)  # read as (r, g, b), then as (h, s, v)
                h, s, _ = _rgb_to_hsv(torch.stack(planes, dim=1))
                hs[rows] = torch.stack([h.reshape(-1), s.reshape(-1)], dim=1).to(torch.uint8)
                out = _hsv_to_rgb(*planes)
                rgb[rows] = out.reshape(3, -1).t().to(torch.uint8)
            if dev.type == "cuda":  # once: any stream may read them from now on
                torch.cuda.current_stream(dev).synchronize()
            _HUE_TABLES[key] = (hs, rgb)
        return _HUE_TABLES[key]


def hue(images: torch.Tensor, factor) -> torch.Tensor:
    """torchvision's PIL ``adjust_hue``: Pillow's 8-bit RGB -> HSV, the hue shifted by
    ``int(factor * 255) mod 256`` (``factor``: host values, one per image), HSV -> RGB.

    On CUDA both conversions are looked up (:func:`hue_lookup`: a dozen kernels instead of about
    120, a fifth of the memory traffic); on the CPU, whose caches do not hold the 80 MB of
    tables, they are computed (:func:`hue_direct`, a little faster there). Both give the same
    levels."""
    return hue_lookup(images, factor) if images.is_cuda else hue_direct(images, factor)


def hue_lookup(images: torch.Tensor, factor) -> torch.Tensor:
    """:func:`hue` through :func:`hue_tables` (identical to :func:`hue_direct`)."""
    hs_table, rgb_table = hue_tables(images.device)
    weights = torch.tensor([65536.0, 256.0, 1.0]).to(images.device, non_blocking=True)
    weights = weights.reshape(1, 3, 1, 1)  # (no blocking copy: the device is never waited for)
    code = (images * weights).sum(1).int()  # exact: integer levels, sums below 2**24
    hs = hs_table[code].int()  # [n, H, W, 2]
    shift = torch.as_tensor(_hue_shift(factor).astype(np.int32))
    shift = shift.to(images.device, non_blocking=True).reshape(-1, 1, 1)
    code = (((hs[..., 0] + shift) & 255) << 16) | (hs[..., 1] << 8) | images.amax(1).int()
    return rgb_table[code].permute(0, 3, 1, 2).to(torch.float32,
                                                  memory_format=torch.contiguous_format)


def solarize(images: torch.Tensor, threshold: float = 128.0) -> torch.Tensor:
    return torch.where(images >= threshold, 255.0 - images, images)


def box_blur_params(radius: Sequence[float], passes: int = 3) -> np.ndarray:
    """``[n, 3]`` (integer box radius, centre weight, edge weight) of Pillow's
    ``GaussianBlur(radius)``: ``_gaussian_blur_radius`` then ``ImagingHorizontalBoxBlur``'s
    24-bit weights, computed with the C code's float32 / float64 mix."""
    f32 = np.float32
    out = np.zeros((len(radius), 3), dtype=np.float64)
    for k, rad in enumerate(radius):
        r = f32(rad)
        sigma2 = f32(f32(r * r) / f32(passes))
        big_l = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
        small_l = f32(math.floor((float(big_l) - 1.0) / 2.0))
        a = f32(f32(f32(2) * small_l + f32(1)) * f32(small_l * f32(small_l + f32(1))
                                                   - f32(3) * sigma2))
        a = f32(a / f32(f32(6) * f32(sigma2 - f32(small_l + f32(1)) * f32(small_l + f32(1)))))
        box = f32(small_l + a)
        ri = int(box)
        ww = int(f32(float(1 << 24)) / f32(box * f32(2) + f32(1)))
        fw = ((1 << 24) - (ri * 2 + 1) * ww) // 2
        out[k] = (ri, ww / float(1 << 24), fw / float(1 << 24))
    return out


def _box_matrix(params: np.ndarray, size: int, dev: torch.device) -> torch.Tensor:
    """``[n, size, size]``: one extended-box pass as a matrix (output row, input column), edge
    pixels repeated (``params``: ``[n, 3]`` host array from :func:`box_blur_params`)."""
    rmax = int(params[:, 0].max()) if len(params) else 0
    p = torch.as_tensor(params).to(dev, non_blocking=True)
    radius, ww, fw = p[:, 0], p[:, 1].float(), p[:, 2].float()
    i = torch.arange(size, device=dev)
    cols = torch.arange(size, device=dev)
    mat = torch.zeros(len(params), size, size, device=dev)
    for d in range(-rmax - 1, rmax + 2):
        src = (i + d).clamp(0, size - 1)  # [size]
        hit = (src[:, None] == cols[None, :]).float()  # [size, size]
        dist = abs(d)
        weight = torch.where(dist <= radius, ww, torch.where(dist == radius + 1, fw,
                                                             torch.zeros_like(ww)))
        mat = mat + weight[:, None, None] * hit[None]
    return mat


def gaussian_blur(images: torch.Tensor, params: np.ndarray, passes: int = 3) -> torch.Tensor:
    """``ImageFilter.GaussianBlur``: ``passes`` box passes along x then ``passes`` along y, each
    rounded to 8 bits (``params``: host array from :func:`box_blur_params`, one row per image)."""
    _, _, height, width = images.shape
    mx = _box_matrix(params, width, images.device).transpose(1, 2)[:, None]  # along the rows
    my = _box_matrix(params, height, images.device)[:, None]
    out = images
    for _ in range(passes):
        out = _round8_(torch.matmul(out, mx))
    for _ in range(passes):
        out = _round8_(torch.matmul(my, out))
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``TF.normalize(TF.to_tensor(img), mean, std)`` of 8-bit levels (same float32 steps)."""
    m = torch.as_tensor(mean, dtype=torch.float32).to(images.device, non_blocking=True)
    s = torch.as_tensor(std, dtype=torch.float32).to(images.device, non_blocking=True)
    m, s = m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1)
    return images.div(255.0).sub_(m).div_(s)


__all__ = ["resample_weights", "resized_crop", "resized_crops", "blend", "luma", "brightness",
           "contrast", "saturation", "grayscale", "hue", "hue_direct", "hue_lookup", "hue_tables",
           "solarize", "box_blur_params", "gaussian_blur", "normalize"]
