"""The batched tensor augmentation (``--aug gpu``) against the PIL path, on CPU tensors.

Tolerances, measured on this machine (torch 2.14 CPU, Pillow 13) and asserted below:

* crop boxes and every other drawn parameter: identical;
* brightness, contrast, saturation, hue, grayscale, Gaussian blur, solarisation: identical to the
  8-bit PIL result (tolerance 0 levels);
* crop + bicubic antialiased resize (+ flip): at most 1 level (of 255) off, on at most 1e-4 of
  the values (measured: 8e-6), from float32 sums meeting a rounding boundary;
* the whole pipeline, normalised: a resize level off can move a hue by more, so at most 8 levels
  on at most 2e-3 of the values (measured: max 4, 3e-4);
* JPEG draft decoding (only when every crop still shrinks >= 2x afterwards) against a full decode
  of 1600x1200 photos: mean difference below 1 level (measured 0.16-0.31), 99th percentile 3.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

from trex_hub.datasets import ImageDataset, LabeledImages
from trex_hub.preprocess import IMAGENET_STD
from trex_hub.train import tensor_ops as T
from trex_hub.train.augment import MultiCrop, MultiCropDataset, sample_rng
from trex_hub.train.batch_augment import (BatchAugment, DecodedMultiCropDataset, collate_decoded,
                                          draft_factor)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from extract_bench import make_photos  # noqa: E402  (photo-like JPEGs)
from train_helpers import photo_images  # noqa: E402

STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small ops: threads only contend


def _photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(img + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    arrs = [_photo_like(rng, 40, 36) for _ in range(24)]
    arrs += [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(24)]
    return arrs


def _levels(arrs):
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()


def _pil_levels(imgs):
    return _levels([np.array(im) for im in imgs])


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue", "hue_wide",
                                  "hue_lookup", "grayscale", "blur", "solarize"])
def test_each_colour_op_matches_pil_exactly(images, name):
    rng = np.random.default_rng(1)
    n = len(images)
    ops = {
        "brightness": (TF.adjust_brightness, T.brightness, rng.uniform(0.6, 1.4, n)),
        "contrast": (TF.adjust_contrast, T.contrast, rng.uniform(0.6, 1.4, n)),
        "saturation": (TF.adjust_saturation, T.saturation, rng.uniform(0.8, 1.2, n)),
        "hue": (TF.adjust_hue, T.hue, rng.uniform(-0.1, 0.1, n)),
        "hue_wide": (TF.adjust_hue, T.hue, rng.uniform(-0.5, 0.5, n)),
        "hue_lookup": (TF.adjust_hue, T.hue_lookup, rng.uniform(-0.5, 0.5, n)),  # CUDA's way
        "grayscale": (lambda im, f: im.convert("L").convert("RGB"),
                      lambda x, f: T.grayscale(x), np.zeros(n)),
        "blur": (lambda im, f: im.filter(ImageFilter.GaussianBlur(radius=float(f))),
                 lambda x, f: T.gaussian_blur(x, T.box_blur_params(f)), rng.uniform(0.1, 2, n)),
        "solarize": (lambda im, f: ImageOps.solarize(im, threshold=128),
                     lambda x, f: T.solarize(x), np.zeros(n)),
    }
    pil_fn, tensor_fn, factors = ops[name]
    want = _pil_levels([pil_fn(Image.fromarray(a), f) for a, f in zip(images, factors)])
    got = tensor_fn(_levels(images), factors)
    assert torch.equal(got, want), (got - want).abs().max()


def test_resized_crop_and_flip_within_one_level(images):
    rng = np.random.default_rng(2)
    diffs = []
    for i, arr in enumerate(images):
        height, width = arr.shape[:2]
        for _ in range(4):
            size = int(rng.choice([8, 16, 24, 56]))  # reductions and enlargements
            h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            flip = bool(rng.integers(0, 2))
            ref = Image.fromarray(arr).resize((size, size), Image.BICUBIC,
                                              box=(left, top, left + w, top + h))
            if flip:
                ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
            padded = torch.zeros(1, 3, height + 5, width + 3)  # padding never gets a weight
            padded[0, :, :height, :width] = _levels([arr])[0]
            got = T.resized_crop(padded, torch.tensor([[height, width]]),
                                 torch.tensor([[top, left, h, w]], dtype=torch.float64), size,
                                 torch.tensor([flip]))
            diffs.append((got - _pil_levels([ref])).abs().flatten())
    d = torch.cat(diffs)
    assert d.max() <= 1
    assert (d > 0).float().mean() <= 1e-4


def test_hue_tables_hold_the_computed_conversions():
    """The lookup (CUDA's hue) equals the computation for every hue shift, on greys, black,
    white, saturated and random colours."""
    rng = np.random.default_rng(4)
    colours = rng.integers(0, 256, (256, 3, 8, 8)).astype(np.float32)
    colours[:16] = colours[:16, :1]  # greys
    colours[16:32, :, 0, 0] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 1]] * 4
    x = torch.from_numpy(colours)
    shifts = (np.arange(256) - 128) / 255.0  # every int(factor * 255) mod 256
    assert torch.equal(T.hue_lookup(x, shifts), T.hue_direct(x, shifts))
    hs, rgb = T.hue_tables("cpu")
    assert hs.shape == (1 << 24, 2) and rgb.shape == (1 << 24, 3) and hs.dtype == torch.uint8
    assert T.hue_tables("cpu")[0] is hs  # made once per device


@pytest.mark.parametrize("budget", [1, 1 << 30])
def test_resized_crops_equal_one_crop_at_a_time(images, monkeypatch, budget):
    """k crops per image at once (in slices or in one product) equal k single crops, padding,
    enlargements and flips included."""
    monkeypatch.setitem(T.CROP_BYTES, "cpu", budget)
    rng = np.random.default_rng(5)
    x = torch.zeros(len(images), 3, 44, 40)
    for i, a in enumerate(images):
        x[i, :, :40, :36] = _levels([a])[0]
    sizes = torch.tensor([[40, 36]] * len(images))
    h, w = rng.integers(4, 41, (len(images), 5)), rng.integers(4, 37, (len(images), 5))
    boxes = np.stack([rng.integers(0, 41 - h), rng.integers(0, 37 - w), h, w], axis=-1)
    boxes = torch.from_numpy(boxes.astype(np.float64))
    flip = torch.from_numpy(rng.integers(0, 2, (len(images), 5)).astype(bool))
    for size in (12, 56):
        got = T.resized_crops(x, sizes, boxes, size, flip)
        assert got.shape == (5, len(images), 3, size, size)
        for k in range(5):
            assert torch.equal(got[k], T.resized_crop(x, sizes, boxes[:, k], size, flip[:, k]))


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory):
    return photo_images(tmp_path_factory.mktemp("photos"), (10, (120, 90)), (6, (90, 110)))


def test_drawn_parameters_and_crop_boxes_are_the_pil_paths(photo_data):
    mc = MultiCrop(global_size=48, local_size=20, n_local=3)
    decoded = DecodedMultiCropDataset(photo_data, mc, seed=5, draft=False)
    for epoch in (0, 3):
        for index in range(len(photo_data)):
            img = Image.open(photo_data.items[index])
            want = mc.draw(img.width, img.height, sample_rng(5, epoch, index))
            chw, rows, label = decoded[(epoch, index)]
            assert label == photo_data.labels[index] and chw.dtype == torch.uint8
            assert tuple(chw.shape) == (3, img.height, img.width)
            for p, row in zip(want, rows.numpy()):
                assert tuple(int(v) for v in row[:4]) == p.box
                assert bool(row[4]) == p.flip and bool(row[14]) == p.gray
                assert (row[5] > 0) == (p.jitter is not None)
                if p.jitter is not None:
                    assert tuple(row[6:10].astype(int)) == p.jitter[0]
                    assert tuple(row[10:14]) == p.jitter[1:]
                assert row[15] == (p.blur or 0.0) and bool(row[16]) == p.solarize
    # the PIL path consumes the same draws: draw-then-apply is the crop of the loader
    img = Image.open(photo_data.items[0]).convert("RGB")
    params = mc.draw(img.width, img.height, sample_rng(5, 0, 0))
    direct = mc(img, sample_rng(5, 0, 0))
    assert all(torch.equal(mc.apply(img, s, p), c) for s, p, c in zip(mc.specs, params, direct))


@pytest.mark.parametrize("simple", [False, True])
def test_whole_pipeline_matches_pil_path(photo_data, simple):
    mc = MultiCrop(global_size=48, local_size=20, n_local=3, simple=simple)
    pil = MultiCropDataset(ImageDataset(photo_data), mc, seed=1)
    decoded = DecodedMultiCropDataset(photo_data, mc, seed=1, draft=False)
    aug = BatchAugment(mc, "cpu")
    diffs = []
    for epoch in range(3):
        order = list(range(len(photo_data)))
        random.Random(epoch).shuffle(order)
        batch = collate_decoded([decoded[(epoch, i)] for i in order], group_pixels=30000)
        assert len(batch["groups"]) > 1  # several padded groups, back in sample order
        crops, labels = aug(batch)
        assert labels.tolist() == [int(photo_data.labels[i]) for i in order]
        ref = [pil[(epoch, i)][0] for i in order]
        assert [tuple(c.shape) for c in crops] == [(len(order), 3, 48, 48)] + \
            [(len(order), 3, 20, 20)] * 3
        for k, c in enumerate(crops):
            diffs.append(((c - torch.stack([r[k] for r in ref])) * STD * 255).abs().flatten())
    d = torch.cat(diffs)
    assert d.max() <= 8.01
    assert (d > 0.5).float().mean() <= 2e-3
    assert d.mean() < 0.01


def test_cuda_configuration_gives_the_same_crops(photo_data, monkeypatch):
    """On CUDA the batched path looks hue up and resizes all crops of a size in one product; run
    that way on CPU tensors it gives exactly the CPU configuration's crops."""
    mc = MultiCrop(global_size=48, local_size=20, n_local=4)
    decoded = DecodedMultiCropDataset(photo_data, mc, seed=2, draft=False)
    batch = collate_decoded([decoded[(1, i)] for i in range(len(photo_data))], group_pixels=30000)
    cpu, _ = BatchAugment(mc, "cpu")(batch)
    monkeypatch.setitem(T.CROP_BYTES, "cpu", T.CROP_BYTES["cuda"])
    monkeypatch.setattr(T, "hue", T.hue_lookup)
    like_cuda, _ = BatchAugment(mc, "cpu")(batch)
    assert all(torch.equal(a, b) for a, b in zip(cpu, like_cuda))


def test_arrays_and_channels_last(photo_data):
    rng = np.random.default_rng(3)
    arrays = LabeledImages(rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4),
                           list("abcd"))  # Fashion-MNIST style grey arrays
    mc = MultiCrop(global_size=16, local_size=8, n_local=2)
    decoded = DecodedMultiCropDataset(arrays, mc, seed=0)
    pil = MultiCropDataset(ImageDataset(arrays), mc, seed=0)
    crops, _ = BatchAugment(mc, "cpu", channels_last=True)(
        collate_decoded([decoded[i] for i in range(4)]))
    assert crops[0].is_contiguous(memory_format=torch.channels_last)
    want = torch.stack([pil[i][0][0] for i in range(4)])
    assert ((crops[0] - want) * STD * 255).abs().max() <= 8.01


def test_draft_only_where_exact_enough(tmp_path):
    make_photos(tmp_path, 4, size=(1600, 1200), seed=2)
    paths = sorted(str(p) for p in tmp_path.rglob("*.jpg"))
    data = LabeledImages(paths, np.zeros(len(paths)), ["a"])
    mc = MultiCrop(global_size=112, local_size=48, n_local=2, global_scale=(0.4, 1),
                   local_scale=(0.05, 0.4))
    drafted = DecodedMultiCropDataset(data, mc, draft=True)
    full = DecodedMultiCropDataset(data, mc, draft=False)
    aug = BatchAugment(mc, "cpu")
    a = [drafted[(0, i)] for i in range(len(paths))]
    b = [full[(0, i)] for i in range(len(paths))]
    assert any(x[0].shape[1] < 1200 for x in a)  # some images were decoded at 1/2 or 1/4
    assert all(x[0].shape[1:] == (1200, 1600) for x in b)
    ca, _ = aug(collate_decoded(a))
    cb, _ = aug(collate_decoded(b))
    d = torch.cat([((x - y) * STD * 255).abs().flatten() for x, y in zip(ca, cb)])
    assert d.mean() < 1.0 and d.quantile(0.99) <= 3.01
    # the rule: every crop keeps a reduction of at least 2x after the draft
    from trex_hub.train.augment import CropParams
    assert draft_factor([CropParams((0, 0, 500, 500))], [224]) == 1
    assert draft_factor([CropParams((0, 0, 900, 1000))], [224]) == 2
    assert draft_factor([CropParams((0, 0, 2000, 2000)), CropParams((0, 0, 400, 400))],
                        [224, 96]) == 2
    assert draft_factor([CropParams((0, 0, 4000, 4000))], [224]) == 8


def test_exif_orientation_is_applied_before_drawing(tmp_path):
    """A JPEG stored sideways with an EXIF orientation: both paths crop the upright image."""
    rng = np.random.default_rng(4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "sideways.jpg"
    Image.fromarray(_photo_like(rng, 30, 50)).save(path, exif=exif, quality=95)
    data = LabeledImages([str(path)], np.zeros(1), ["a"])
    mc = MultiCrop(global_size=16, local_size=8, n_local=2)
    chw, rows, _ = DecodedMultiCropDataset(data, mc, seed=0)[0]
    assert tuple(chw.shape) == (3, 50, 30)
    want = mc.draw(30, 50, sample_rng(0, 0, 0))
    assert [tuple(int(v) for v in r[:4]) for r in rows.numpy()] == [p.box for p in want]
    crops, _ = BatchAugment(mc, "cpu")(collate_decoded([(chw, rows, 0)]))
    ref = MultiCropDataset(ImageDataset(data), mc, seed=0)[0][0]
    assert ((crops[0][0] - ref[0]) * STD[0] * 255).abs().max() <= 8.01


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    data = LabeledImages([str(bad)], np.zeros(1), ["a"], name="train")
    ds = DecodedMultiCropDataset(data, MultiCrop(global_size=16, n_local=0), seed=0)
    with pytest.raises(Exception, match="broken.jpg"):
        ds[0]


def test_persistent_workers_see_the_epoch(photo_data):
    """Loader workers live across epochs; the sampler hands them the epoch with every index, so
    their crops equal those made in the main process (and differ between epochs)."""
    import argparse

    from trex_hub.train.data import build_train_loader

    def crops(workers, aug, start="auto"):
        args = argparse.Namespace(global_size=24, global_scale=(0.25, 1.0), global_crops=1,
                                  local_size=12, local_scale=(0.05, 0.25), local_crops=1,
                                  blur_radius=(0.1, 2.0), simple_aug=False, aug=aug, seed=4,
                                  batch_size=4, workers=workers, prefetch_factor=2,
                                  loader_start=start)
        data = build_train_loader(args, photo_data, torch.device("cpu"))
        out = []
        for batches in data.epochs(0, 2):  # one loader iterator through both epochs
            for batch in batches:
                out.append(data.augment(batch)[0][0] if data.augment else batch[0][0])
        return out

    for aug in ("cpu", "gpu"):
        inline, workers = crops(0, aug), crops(2, aug)
        assert len(inline) == 8
        assert all(torch.equal(a, b) for a, b in zip(inline, workers)), aug
        assert not torch.equal(inline[0], inline[4])
        # workers started by a forkserver (--loader-start auto with CUDA): the dataset travels
        # by pickling and gives the same crops
        served = crops(2, aug, "forkserver")
        assert all(torch.equal(a, b) for a, b in zip(inline, served)), aug


class _SlowItems(torch.utils.data.Dataset):
    """Each item takes ``delay`` seconds and is its ``(epoch, index)``."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        import time

        time.sleep(self.delay)
        return torch.tensor(key)


def test_epoch_batches_are_the_per_epoch_loaders_and_workers_go_on_into_the_next_epoch():
    """EpochBatches makes, epoch by epoch, the batches of a loader over the same seeded
    sampler with drop_last; and one iterator through all epochs lets the workers prefetch the
    next epoch while this one's last batches train, where a loader restarted per epoch makes
    the first step of every epoch wait for a whole batch."""
    import time

    from torch.utils.data import DataLoader, DistributedSampler

    from trex_hub.train.augment import EpochBatches
    from trex_hub.train.data import TrainLoader

    items = _SlowItems(10, 0.0)
    inner = DistributedSampler(items, num_replicas=1, rank=0, shuffle=True, seed=3)
    batches = EpochBatches(inner, 4)
    batches.set_epochs(1, 3)
    assert batches.per_epoch == 2 and len(batches) == 4
    got = list(batches)
    for epoch in (1, 2):
        inner.set_epoch(epoch)
        order = list(inner)
        assert got[:2] == [[(epoch, i) for i in order[k * 4:(k + 1) * 4]] for k in (0, 1)]
        got = got[2:]
    assert not got

    slow = _SlowItems(4, 1.0)
    sampler = EpochBatches(DistributedSampler(slow, num_replicas=1, rank=0, shuffle=False), 1)
    loader = DataLoader(slow, batch_sampler=sampler, num_workers=2, persistent_workers=True,
                        prefetch_factor=2)
    data = TrainLoader(loader=loader, dataset=slow, sampler=sampler, mode="cpu")
    seen, waits = [], []
    for batches in data.epochs(0, 2):
        t = time.perf_counter()
        for k, batch in enumerate(batches):
            if k == 0:
                waits.append(time.perf_counter() - t)
            seen.append(tuple(batch[0].tolist()))
            time.sleep(1.5)  # the training step
    assert seen == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert waits[0] >= 0.9  # the workers' start: one item's second
    assert waits[1] < 0.5, waits  # epoch 2's first batch was ready before epoch 1 ended


def test_loader_start_method_follows_the_device():
    from trex_hub.train.data import worker_start_method

    assert worker_start_method("auto", torch.device("cpu")) is None
    # forkserver hung every t-ReX* benchmark run on an H200; fork trained at 1,538 images/s
    assert worker_start_method("auto", torch.device("cuda")) is None
    assert worker_start_method("spawn", torch.device("cpu")) == "spawn"
    with pytest.raises(ValueError, match="--loader-start must be one of"):
        worker_start_method("threads", torch.device("cpu"))


class _StuckAfterTwo(torch.utils.data.Dataset):
    """Two quick items, then one that takes far longer than the loader's timeout (a stuck
    worker)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i >= 2:
            time.sleep(60)
        return torch.tensor([i])


def test_a_stuck_loader_worker_fails_the_run_with_a_fix_instead_of_hanging_it():
    import argparse
    import multiprocessing

    from torch.utils.data import DataLoader

    from trex_hub.train.data import loader_batches, worker_kwargs
    from trex_hub.train.runtime import TrainingError

    args = argparse.Namespace(workers=1, loader_start="auto", loader_timeout=2.0)
    kw = worker_kwargs(args, torch.device("cpu"))
    assert kw == {"timeout": 2.0}
    assert worker_kwargs(argparse.Namespace(workers=0, loader_start="auto",
                                            loader_timeout=2.0), torch.device("cpu")) == {}
    assert "timeout" not in worker_kwargs(argparse.Namespace(
        workers=2, loader_start="auto", loader_timeout=0.0), torch.device("cpu"))
    for persistent in (False, True):  # the training loader's workers are persistent
        loader = DataLoader(_StuckAfterTwo(), batch_size=1, num_workers=1, prefetch_factor=1,
                            persistent_workers=persistent, **kw)
        got = []
        t = time.monotonic()
        with pytest.raises(TrainingError) as err:
            for batch in loader_batches(loader, "training"):
                got.append(int(batch))
        assert got == [0, 1]
        assert time.monotonic() - t < 30
        msg = str(err.value)
        assert "no training batch from the 1 loader workers in 2 s" in msg
        assert "--loader-timeout" in msg and "--workers 0" in msg
        # the stuck worker is gone, though the exception (and the loader) still exist
        assert not multiprocessing.active_children(), persistent
    # a loader without a timeout passes other errors through unchanged
    assert list(loader_batches(DataLoader([1, 2], batch_size=1), "validation")) == [
        torch.tensor([1]), torch.tensor([2])]


class _Broken(torch.utils.data.Dataset):
    """Item 1 raises ``error``."""

    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 3

    def __getitem__(self, i):
        if i == 1:
            raise self.error
        return torch.tensor([i])


def test_a_loader_worker_error_is_its_own_line_without_the_worker_traceback():
    """torch re-raises a worker's exception with the worker's traceback in its message; the
    run's error keeps only what went wrong, and for an image, how to fix it."""
    from torch.utils.data import DataLoader

    from trex_hub.train.data import loader_batches
    from trex_hub.train.runtime import TrainingError
    from trex_hub.transforms import ImageLoadError

    image = ImageLoadError("train item 1 (a/b.png): not a readable image")
    cases = [(image, 1, ["train item 1 (a/b.png): not a readable image", "remove or fix"]),
             (image, 0, ["train item 1 (a/b.png): not a readable image", "remove or fix"]),
             (KeyError("label"), 1, ["training loader worker", "KeyError", "'label'",
                                     "--workers 0"]),
             # no message: the type alone (a bare assert), and out of memory said as such
             (AssertionError(), 1, ["training loader worker 0 failed: AssertionError.",
                                    "--workers 0"]),
             (MemoryError(), 1, ["training loader worker 0 ran out of memory:", "--batch-size"])]
    for error, workers, words in cases:
        loader = DataLoader(_Broken(error), batch_size=1, num_workers=workers)
        with pytest.raises(TrainingError) as err:
            list(loader_batches(loader, "training"))
        msg = str(err.value)
        assert "\n" not in msg and "Traceback" not in msg, msg
        for w in words:
            assert w in msg, (w, msg)
    # in this process a bug stays itself (its traceback is there for --debug)
    with pytest.raises(KeyError):
        list(loader_batches(DataLoader(_Broken(KeyError("label")), batch_size=1), "training"))


def test_loader_timeout_option():
    from trex_hub.train.config import parse_args

    base = ["--data", "x"]
    assert parse_args(base).loader_timeout == 600.0
    assert parse_args(base + ["--loader-timeout", "0"]).loader_timeout == 0.0
    for bad in ("-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            parse_args(base + ["--loader-timeout", bad])


def test_collate_groups_are_sorted_padded_and_bounded():
    """Every image lands once, at its index, zero-padded, in (height, width) order; a group holds
    at most ``group_pixels`` padded pixels unless it is one image; same-size batches make one
    group. (The grouping is linear in the batch size: 4,096 small images take well under a
    second.)"""
    import random
    import time

    rng = random.Random(3)
    samples = []
    for k in range(60):
        h, w = rng.randint(4, 50), rng.randint(4, 50)
        samples.append((torch.randint(1, 256, (3, h, w), dtype=torch.uint8),
                        torch.full((2, 17), float(k), dtype=torch.float64), k % 3))
    batch = collate_decoded(samples, group_pixels=6000)
    seen = []
    for group, idx in zip(batch["groups"], batch["index"]):
        assert len(idx) == 1 or group.shape[0] * group.shape[2] * group.shape[3] <= 6000
        for j, i in enumerate(idx.tolist()):
            img = samples[i][0]
            h, w = img.shape[1:]
            assert torch.equal(group[j, :, :h, :w], img)
            assert not group[j, :, h:, :].any() and not group[j, :, :, w:].any()
            seen.append(i)
    assert sorted(seen) == list(range(60))
    assert [tuple(batch["sizes"][i].tolist()) for i in seen] == sorted(
        tuple(s[0].shape[1:]) for s in samples)
    assert torch.equal(batch["labels"], torch.tensor([k % 3 for k in range(60)]))
    same = [(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.zeros(1, 17, dtype=torch.float64),
             0)] * 4096
    t = time.perf_counter()
    one = collate_decoded(same)
    assert len(one["groups"]) == 1 and one["groups"][0].shape == (4096, 3, 28, 28)
    assert time.perf_counter() - t < 5.0
