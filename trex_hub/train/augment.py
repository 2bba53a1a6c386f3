"""Multi-crop augmentation of the t-ReX recipe (TREX_SPEC.md section 2).

Every random draw comes from an explicit :class:`random.Random` handed to the transform, seeded
per (run seed, epoch, sample index) by :class:`MultiCropDataset`. The crops of a sample therefore
do not depend on the number of data-loader workers, on the number of processes, or on what else
consumed the global RNGs, which is what makes ``--resume`` bit-for-bit.

Per crop (PIL image in, normalised float tensor out):

* ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3))`` with bicubic interpolation;
* horizontal flip p=0.5;
* ``ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)`` with p=0.8, its four
  operations in random order;
* grayscale p=0.2;
* Gaussian blur (radius uniform in [0.1, 2.0]) with p=0.2 on global crops, p=0.5 on local crops;
* solarisation (threshold 128) with p=0.2 on global crops only;
* ImageNet mean/std normalisation.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def sample_crop_box(width: int, height: int, scale: Tuple[float, float], rng: random.Random,
                    ratio: Tuple[float, float] = RATIO) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random-resized-crop window (10 tries, then a central crop)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    # fallback: the whole image, with its aspect ratio clamped into ``ratio``
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, size: int, scale: Tuple[float, float],
                 rng: random.Random) -> Image.Image:
    top, left, h, w = sample_crop_box(img.width, img.height, scale, rng)
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


JitterParams = Tuple[Tuple[int, ...], float, float, float, float]  # order, b, c, s, h


def draw_jitter(rng: random.Random, brightness: float = 0.4, contrast: float = 0.4,
                saturation: float = 0.2, hue: float = 0.1) -> JitterParams:
    """torchvision's ColorJitter draws with our RNG: the order of the four operations (0
    brightness, 1 contrast, 2 saturation, 3 hue), then factors uniform in ``[1-x, 1+x]`` (hue in
    ``[-hue, hue]``)."""
    order = list(range(4))
    rng.shuffle(order)
    b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    h = rng.uniform(-hue, hue)
    return tuple(order), b, c, s, h


def apply_jitter(img: Image.Image, params: JitterParams) -> Image.Image:
    order, b, c, s, h = params
    for op in order:
        if op == 0:
            img = TF.adjust_brightness(img, b)
        elif op == 1:
            img = TF.adjust_contrast(img, c)
        elif op == 2:
            img = TF.adjust_saturation(img, s)
        else:
            img = TF.adjust_hue(img, h)
    return img


def color_jitter(img: Image.Image, rng: random.Random, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> Image.Image:
    """torchvision's ColorJitter semantics with our RNG: factors uniform in ``[1-x, 1+x]`` (hue
    in ``[-hue, hue]``), applied in a random order."""
    return apply_jitter(img, draw_jitter(rng, brightness, contrast, saturation, hue))


@dataclass
class CropSpec:
    """One crop type: size, scale range, and the probabilities of its extra augmentations."""

    size: int
    scale: Tuple[float, float]
    blur_p: float
    solarize_p: float
    photometric: bool = True  # colour jitter / grayscale / blur / solarise (off: crop + flip only)


class MultiCrop:
    """``n_global`` global crops then ``n_local`` local crops of one image (a list of tensors).

    ``simple=True`` keeps only crop + flip (the plain supervised baseline).
    """

    def __init__(self, global_size: int = 224, global_scale: Sequence[float] = (0.25, 1.0),
                 n_global: int = 1, local_size: int = 96,
                 local_scale: Sequence[float] = (0.05, 0.25), n_local: int = 8,
                 blur_radius: Sequence[float] = (0.1, 2.0), simple: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if n_global < 1:
            raise ValueError("at least one global crop is needed")
        self.specs: List[CropSpec] = (
            [CropSpec(global_size, tuple(global_scale), 0.2, 0.2, not simple)] * n_global
            + [CropSpec(local_size, tuple(local_scale), 0.5, 0.0, not simple)] * n_local)
        self.n_global, self.n_local = n_global, n_local
        self.blur_radius = (float(blur_radius[0]), float(blur_radius[1]))
        self.mean, self.std = list(mean), list(std)

    def draw(self, width: int, height: int, rng: random.Random) -> List["CropParams"]:
        """Every random parameter of the crops of one ``width`` x ``height`` image, in the order
        the recipe consumes ``rng`` (the PIL and the batched tensor paths both start here)."""
        return [draw_crop_params(width, height, spec, rng, self.blur_radius)
                for spec in self.specs]

    def apply(self, img: Image.Image, spec: CropSpec, params: "CropParams") -> torch.Tensor:
        """One crop with PIL (image in, normalised float tensor out)."""
        top, left, h, w = params.box
        out = img.resize((spec.size, spec.size), Image.BICUBIC,
                         box=(left, top, left + w, top + h))
        if params.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if params.jitter is not None:
            out = apply_jitter(out, params.jitter)
        if params.gray:
            out = out.convert("L").convert("RGB")
        if params.blur is not None:
            out = out.filter(ImageFilter.GaussianBlur(radius=params.blur))
        if params.solarize:
            out = ImageOps.solarize(out, threshold=128)
        return TF.normalize(TF.to_tensor(out), self.mean, self.std)

    def crop(self, img: Image.Image, spec: CropSpec, rng: random.Random) -> torch.Tensor:
        params = draw_crop_params(img.width, img.height, spec, rng, self.blur_radius)
        return self.apply(img, spec, params)

    def __call__(self, img: Image.Image, rng: random.Random) -> List[torch.Tensor]:
        return [self.crop(img, spec, rng) for spec in self.specs]


@dataclass
class CropParams:
    """The random draws of one crop: ``box`` = (top, left, height, width) in pixels of the
    image it was drawn for; ``jitter`` None = no colour jitter; ``blur`` None or the radius."""

    box: Tuple[int, int, int, int]
    flip: bool = False
    jitter: Optional[JitterParams] = None
    gray: bool = False
    blur: Optional[float] = None
    solarize: bool = False


def draw_crop_params(width: int, height: int, spec: CropSpec, rng: random.Random,
                     blur_radius: Tuple[float, float] = (0.1, 2.0)) -> CropParams:
    """Draw one crop's parameters: crop box, flip p=0.5, then (photometric crops) jitter p=0.8,
    grayscale p=0.2, blur ``spec.blur_p``, solarise ``spec.solarize_p``; one ``rng.random()``
    per coin even when its probability is 0, so every crop type consumes ``rng`` alike."""
    params = CropParams(sample_crop_box(width, height, spec.scale, rng))
    params.flip = rng.random() < 0.5
    if spec.photometric:
        if rng.random() < 0.8:
            params.jitter = draw_jitter(rng)
        params.gray = rng.random() < 0.2
        if rng.random() < spec.blur_p:
            params.blur = rng.uniform(*blur_radius)
        params.solarize = rng.random() < spec.solarize_p
    return params


def eval_transform(size: int):
    """Validation preprocessing: Resize(size * 256/224, bilinear) -> CenterCrop(size)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(int(round(size * 256 / 224)),
                               interpolation=T.InterpolationMode.BILINEAR),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The RNG of one sample in one epoch (string seeds are hashed with SHA-512: stable)."""
    return random.Random(f"trex-train:{seed}:{epoch}:{index}")


class MultiCropDataset(torch.utils.data.Dataset):
    """``(list of crops, label)`` from a dataset of ``(RGB PIL image, label)``.

    The index may be ``(epoch, index)`` (what :class:`EpochBatches` yields): loader workers that
    live across epochs (``persistent_workers``) never see :meth:`set_epoch`, the sampler's
    indices do carry the epoch.
    """

    def __init__(self, base: Any, transform: MultiCrop, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def split_index(self, item: Any) -> Tuple[int, int]:
        if isinstance(item, (tuple, list)):
            return int(item[0]), int(item[1])
        return self.epoch, int(item)

    def __getitem__(self, item: Any):
        epoch, index = self.split_index(item)
        img, label = self.base[index]
        return self.transform(img, sample_rng(self.seed, epoch, index)), int(label)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` for every epoch from ``start`` to ``end`` (exclusive), one
    epoch after the other, for a loader's ``batch_sampler``: each epoch's batches are the wrapped
    sampler's order for that epoch (``set_epoch``) cut into ``batch_size``, the tail dropped,
    i.e. what a loader over that sampler with ``drop_last`` makes each epoch. One iterator runs
    through every epoch, so persistent workers prefetch the next epoch's first batches while
    this epoch's last ones train; a loader iterated once per epoch starts each epoch with idle
    workers and a step that waits for a whole batch to be decoded."""

    def __init__(self, sampler: Any, batch_size: int, end: int = 1):
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.start, self.end = 0, int(end)

    def set_epochs(self, start: int, end: int) -> None:
        """The epochs the next iterator runs through: ``start`` .. ``end - 1``."""
        self.start, self.end = int(start), int(end)

    @property
    def per_epoch(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        size = self.batch_size
        for epoch in range(self.start, self.end):
            self.sampler.set_epoch(epoch)
            order = [int(i) for i in self.sampler]
            for k in range(self.per_epoch):
                yield [(epoch, i) for i in order[k * size:(k + 1) * size]]

    def __len__(self) -> int:
        return self.per_epoch * max(0, self.end - self.start)


__all__ = ["MultiCrop", "MultiCropDataset", "EpochBatches", "CropSpec", "CropParams",
           "sample_crop_box", "draw_crop_params", "draw_jitter", "apply_jitter", "color_jitter",
           "eval_transform", "sample_rng"]
