"""Issue 11 on a CPU: precision flags, worker-process decoding, the tensor (nvJPEG) decode path,
the asynchronous pipeline; the CUDA-only checks are marked ``cuda``."""
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trex_hub
from trex_hub import extract as ex
from trex_hub.decode_procs import process_batches
from trex_hub.decoding import batch_ranges, decode_batches
from trex_hub.inference import _tf32_flags, fp32_mode, prepare
from trex_hub.tensor_decode import jpeg_extent, jpeg_fits, tensor_batches
from trex_hub.transforms import Decoder, ImageLoadError

from test_extract import make_bad_files, photos, r18_path, rel_err  # noqa: F401 (fixture)


def flag_values():
    return [getattr(obj, attr) for obj, attr in _tf32_flags()]


def jpeg_bytes(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Photos of several sizes and orientations (JPEG), a PNG, a greyscale JPEG."""
    root = tmp_path_factory.mktemp("scale")
    sizes = [(300, 220), (180, 260), (500, 375), (230, 230), (400, 250), (260, 400)]
    for i, size in enumerate(sizes * 2):
        (root / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(photos(1, size, seed=i)[0]))
    Image.fromarray(photos(1, (240, 240), seed=40)[0]).save(root / "q.png")
    Image.fromarray(photos(1, (250, 240), seed=41)[0][:, :, 0]).save(root / "grey.jpg")
    return root


# ---------------------------------------------------------------------- precision flags ----
def test_fp32_mode_sets_and_restores_the_tf32_flags():
    before = flag_values()
    with fp32_mode("fp32"):
        assert set(flag_values()) <= {"ieee", False}
    with fp32_mode("tf32"):
        assert set(flag_values()) <= {"tf32", True}
    with pytest.raises(RuntimeError):
        with fp32_mode("fp32"):
            raise RuntimeError("boom")
    with fp32_mode("bf16"):
        assert flag_values() == before
    assert flag_values() == before


@pytest.mark.parametrize("precision,inside", [("fp32", {"ieee", False}),
                                              ("tf32", {"tf32", True})])
def test_extract_runs_under_its_precision_and_leaves_flags_untouched(r18_path, precision,  # noqa: F811
                                                                     inside):
    model = trex_hub.load(r18_path)
    before = flag_values()
    seen = []
    runner = prepare(model, "cpu", precision)
    handle = runner.module.register_forward_hook(lambda *a: seen.append(flag_values()))
    try:
        out = model.extract(photos(2), precision=precision)
    finally:
        handle.remove()
    assert out.shape == (2, 512) and seen and set(seen[0]) <= inside
    assert flag_values() == before
    if precision == "tf32":  # on a CPU TF32 changes nothing
        assert rel_err(out, model.extract(photos(2))) < 1e-6


def test_precisions_include_tf32_in_the_cli():
    from trex_hub.cli.extract import build_parser

    args = build_parser().parse_args(["m", "x", "-o", "f.npy", "--precision", "tf32",
                                      "--decode", "gpu", "--workers-mode", "processes"])
    assert (args.precision, args.decode, args.workers_mode) == ("tf32", "gpu", "processes")


# ------------------------------------------------------------------- process decoding ------
def _collect(batches):
    return [(b.positions, None if b.data is None else b.data.clone(), b.failures)
            for b in batches]


def test_process_batches_equal_thread_batches_byte_for_byte(folder, tmp_path):
    make_bad_files(tmp_path)
    files = sorted(folder.iterdir()) + sorted(tmp_path.iterdir())
    dec = Decoder("transfer", max_pixels=10_000_000)
    groups = batch_ranges(len(files), 5)
    kw = dict(strict=False, describe=lambda i: files[i].name)
    threads = _collect(decode_batches(groups, files.__getitem__, dec, num_workers=2, **kw))
    procs = _collect(process_batches(groups, files.__getitem__, dec, num_workers=2, crop=224,
                                     **kw))
    assert len(threads) == len(procs) == len(groups)
    n_fail = 0
    for (tp, td, tf), (pp_, pd, pf) in zip(threads, procs):
        assert tp == pp_ and tf == pf
        n_fail += len(tf)
        assert (td is None and pd is None) or torch.equal(td, pd)
    assert n_fail == 5  # the five bad files, reported by their names


def test_process_batches_strict_raises_naming_the_file(tmp_path):
    make_bad_files(tmp_path)
    files = [tmp_path / "zero.jpg"]
    with pytest.raises(ImageLoadError, match="zero.jpg.*empty file"):
        list(process_batches([[0]], files.__getitem__, Decoder("transfer"), num_workers=1,
                             crop=224, describe=lambda i: str(files[i])))


def test_extract_in_processes_equals_threads(r18_path, folder):  # noqa: F811
    model = trex_hub.load(r18_path)
    files = sorted(folder.iterdir())
    ref = model.extract(files, batch_size=4, workers_mode="threads")
    got = model.extract(files, batch_size=4, workers_mode="processes", num_workers=2)
    assert torch.equal(ref, got)


def test_choose_decoding_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    choose = ex.choose_decoding
    assert choose("auto", "auto", cpu, "transfer", True, 10, 2) == "threads"
    assert choose("auto", "auto", cpu, "transfer", True, 5000, 16) == "processes"
    assert choose("auto", "auto", cpu, "transfer", False, 5000, 16) == "threads"  # in memory
    assert choose("auto", "auto", cpu, None, True, 5000, 16) == "threads"  # no fixed size
    assert choose("auto", "auto", cuda, "transfer", True, 10, 2) == "tensor"
    # auto on CUDA below 32 decode workers: nvJPEG and worker processes at once where processes
    # would decode (hybrid beat both alone on an H200, fp16 and fp32), else nvJPEG alone; from
    # 32 on the exact path is expected to keep up
    assert choose("auto", "auto", cuda, "transfer", True, 5000, 16) == "hybrid"
    assert choose("auto", "auto", cuda, "transfer", True, 5000, 31) == "hybrid"
    assert choose("auto", "auto", cuda, "transfer", True, 5000, 3) == "tensor"
    assert choose("auto", "auto", cuda, "transfer", True, 100, 16) == "tensor"
    assert choose("auto", "threads", cuda, "transfer", True, 5000, 16) == "tensor"
    assert choose("auto", "auto", cuda, "transfer", True, 5000, 32) == "processes"
    assert choose("gpu", "auto", cuda, "transfer", True, 5000, 64) == "tensor"
    assert choose("cpu", "threads", cuda, "transfer", True, 5000, 16) == "threads"
    assert choose("gpu", "auto", cpu, "imagenet", True, 1, 1) == "tensor"
    assert choose("cpu", "processes", cpu, "transfer", True, 1, 2) == "processes"
    with pytest.raises(ValueError, match="decode='gpu' resizes to a preset"):
        choose("gpu", "auto", cpu, None, True, 1, 1)
    with pytest.raises(ValueError, match="workers_mode='threads' for in-memory"):
        choose("cpu", "processes", cpu, "transfer", False, 1, 2)
    with pytest.raises(ValueError, match="decode must be one of"):
        choose("nvjpeg", "auto", cpu, "transfer", True, 1, 1)


def test_default_workers_follow_the_affinity_not_a_cap(monkeypatch):
    import os

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ex.default_workers() == len(os.sched_getaffinity(0))


def test_default_workers_share_the_machine_among_torchrun_ranks(monkeypatch):
    """8 ranks on 64 cores: 8 workers each, unless the launcher already bound each rank to its
    own cores (the affinity then says so)."""
    import trex_hub.decoding as dec

    monkeypatch.setattr(dec.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(dec, "available_cores", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert dec.default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "100")
    assert dec.default_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert dec.default_workers() == 64
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(dec, "available_cores", lambda: 8)  # bound to 8 of the 64 cores
    assert dec.default_workers() == 8
    monkeypatch.setattr(dec, "available_cores", lambda: 16)
    assert dec.default_workers() == 16


# ------------------------------------------------------------- the background stage ----
def test_in_background_keeps_order_and_raises_where_the_error_was():
    import threading

    from trex_hub.decoding import in_background

    seen_in = []

    def make():
        for i in range(5):
            seen_in.append(threading.current_thread().name)
            if i == 3:
                raise ValueError("item 3 is bad")
            yield i

    got = []
    with pytest.raises(ValueError, match="item 3 is bad"):
        for x in in_background(make, depth=2, name="trex-test"):
            got.append(x)
    assert got == [0, 1, 2] and set(seen_in) == {"trex-test"}
    assert list(in_background(lambda: iter(range(7)))) == list(range(7))
    assert list(in_background(lambda: iter(()))) == []


def test_in_background_stops_and_cleans_up_when_the_consumer_leaves():
    import threading

    from trex_hub.decoding import in_background

    produced, closed, entered = [], [], []

    def make():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.append(threading.current_thread().name)

    class Context:
        def __enter__(self):
            entered.append(threading.current_thread().name)

        def __exit__(self, *exc):
            entered.append("exit")

    it = in_background(make, depth=1, name="trex-leave", context=Context)
    assert next(it) == 0 and next(it) == 1
    it.close()
    assert closed == ["trex-leave"] and entered == ["trex-leave", "exit"]
    assert len(produced) <= 4  # a bounded distance ahead, not the whole source
    assert not [t for t in threading.enumerate() if t.name == "trex-leave"]
    unused = in_background(make, name="trex-unused")  # never iterated: no thread
    assert not [t for t in threading.enumerate() if t.name == "trex-unused"]
    del unused


# ---------------------------------------------------------------------- tensor decoding ----
def _exif_rotated(arr):
    """A JPEG whose EXIF says 'rotate 90' (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(arr, exif=exif.tobytes())


def test_jpeg_fits_reads_the_headers(folder):
    arr = photos(1, (120, 90))[0]
    assert jpeg_fits(jpeg_bytes(arr))
    assert jpeg_fits((folder / "grey.jpg").read_bytes())
    assert not jpeg_fits(_exif_rotated(arr))
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, format="JPEG")
    assert not jpeg_fits(cmyk.getvalue())
    assert not jpeg_fits((folder / "q.png").read_bytes())
    assert not jpeg_fits(b"") and not jpeg_fits(b"\xff\xd8\xff\xe0" + struct.pack(">H", 200))
    # truncated: PIL's (nvJPEG decodes those without an error)
    whole = jpeg_bytes(arr)
    assert whole.endswith(b"\xff\xd9") and jpeg_extent(whole) == len(whole)
    assert not jpeg_fits(whole[:len(whole) // 2]) and not jpeg_fits(whole[:-1])
    # data after the end marker (a motion photo's video, with end-marker bytes of its own): a
    # sequential JPEG is cut at its end marker, a progressive one goes to PIL
    trailer = b"ftypmp42" + b"\xff\xd9" * 3 + bytes(range(256))
    assert jpeg_extent(whole + trailer) == len(whole)
    sos = whole.index(b"\xff\xda")  # a scan of one component of three: more scans may follow
    one_scan = whole[:sos + 4] + b"\x01" + whole[sos + 5:]
    assert jpeg_extent(one_scan) == len(one_scan) and jpeg_extent(one_scan + trailer) is None
    prog = io.BytesIO()
    Image.fromarray(arr).save(prog, format="JPEG", progressive=True)
    prog = prog.getvalue()
    assert jpeg_extent(prog) == len(prog)
    assert jpeg_extent(prog + trailer) is None and jpeg_extent(prog[:len(prog) // 2]) is None


def test_reader_reads_whole_files_and_keeps_only_fitting_jpegs(tmp_path, folder):
    from trex_hub.tensor_decode import MAX_JPEG_BYTES, file_bytes, read_jpeg_file

    jpg = sorted(folder.glob("*.jpg"))[0]
    assert bytes(file_bytes(jpg)) == jpg.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    assert file_bytes(tmp_path / "empty") == bytearray()
    status = Path("/proc/self/status")  # reports size 0 but has content: read to the end
    if status.exists():
        assert b"Name:" in file_bytes(status)
    raw = read_jpeg_file(jpg)
    assert raw.dtype == torch.uint8 and bytes(raw.numpy()) == jpg.read_bytes()
    raw[0] = raw[0]  # a writable buffer of its own (no read-only frombuffer warning)
    # a JPEG with a video after it: the reader hands over the JPEG part, which decodes as the
    # JPEG alone does
    (tmp_path / "motion.jpg").write_bytes(jpg.read_bytes() + b"\x00\x00\x00\x18ftypmp42" * 50)
    part = read_jpeg_file(tmp_path / "motion.jpg")
    assert bytes(part.numpy()) == jpg.read_bytes()
    from torchvision.io import decode_jpeg

    assert torch.equal(decode_jpeg(part), decode_jpeg(read_jpeg_file(jpg)))
    (tmp_path / "rot.jpg").write_bytes(_exif_rotated(photos(1, (40, 30))[0]))
    for other in (folder / "q.png", tmp_path / "rot.jpg", tmp_path / "missing.jpg", tmp_path):
        assert read_jpeg_file(other) is None, other
    # a huge "JPEG" (sparse: no disk used) is not read into memory; the PIL path gets it
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:
        fh.write(jpg.read_bytes())
        fh.truncate(MAX_JPEG_BYTES + 1)
    assert file_bytes(huge, MAX_JPEG_BYTES) is None and read_jpeg_file(huge) is None
    assert bytes(file_bytes(jpg, len(jpg.read_bytes()))) == jpg.read_bytes()
    assert file_bytes(jpg, len(jpg.read_bytes()) - 1) is None


def test_reader_tasks_are_chunks_in_order():
    """A batch is read in a few tasks of consecutive files (not one future per file), in
    order; an error in a chunk reaches whoever collects it."""
    from concurrent.futures import ThreadPoolExecutor

    from trex_hub.tensor_decode import submit_chunks

    with ThreadPoolExecutor(4) as pool:
        for n, workers, sizes in ((256, 16, [32] * 8), (256, 4, [64] * 4), (70, 16, [32, 32, 6]),
                                  (5, 16, [5]), (0, 4, [])):
            futs = submit_chunks(pool, lambda i: i * 10, range(n), workers)
            parts = [f.result() for f in futs]
            assert [len(p) for p in parts] == sizes
            assert [v for p in parts for v in p] == [i * 10 for i in range(n)]

        def boom(i):
            if i == 40:
                raise ValueError("item 40")
            return i
        futs = submit_chunks(pool, boom, range(64), 2)
        assert futs[0].result() == list(range(32))
        with pytest.raises(ValueError, match="item 40"):
            futs[1].result()


def test_tensor_path_on_cpu_is_close_to_pil_and_falls_back(tmp_path, folder):
    arr = photos(1, (330, 250), seed=9)[0]
    (tmp_path / "rot.jpg").write_bytes(_exif_rotated(arr))
    cmyk = Image.fromarray(arr).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", format="JPEG")
    make_bad_files(tmp_path)
    files = sorted(folder.iterdir()) + sorted(tmp_path.iterdir())
    for preset in ("transfer", "imagenet"):
        dec = Decoder(preset, draft=False)
        cfg = trex_hub.preprocess.PRESETS[preset]
        groups = batch_ranges(len(files), 6)
        kw = dict(strict=False, catch_all=True, describe=lambda i: files[i].name)
        ref = _collect(decode_batches(groups, files.__getitem__, dec, **kw))
        got = _collect(tensor_batches(groups, files.__getitem__, dec, cfg, device="cpu", **kw))
        for (rp, rd, rf), (gp, gd, gf) in zip(ref, got):
            assert rp == gp and [p for p, _ in rf] == [p for p, _ in gf]
            assert gd.dtype == torch.uint8 and gd.shape == rd.shape
            diff = (gd.int() - rd.int()).abs()
            assert diff.float().mean() < 2.0 and diff.max() <= 64
            for k, pos in enumerate(rp):  # the files PIL decodes here are the PIL pixels
                if not files[pos].name.endswith(".jpg") or files[pos].name in ("rot.jpg",
                                                                               "cmyk.jpg"):
                    assert torch.equal(gd[k], rd[k]), files[pos].name


@pytest.mark.parametrize("cfg", [trex_hub.preprocess.PRESETS["transfer"],
                                 trex_hub.preprocess.PRESETS["imagenet"],
                                 trex_hub.preprocess.PreprocessConfig(resize=96, crop=128)])
def test_batched_geometry_is_the_per_image_geometry(cfg):
    """One resize per distinct size gives the pixels of one resize per image, in input order
    (sizes interleaved, a lone size, a crop larger than the resize that pads)."""
    from trex_hub.tensor_decode import TensorGeometry

    geometry = TensorGeometry(cfg)
    sizes = [(300, 220), (180, 260), (300, 220), (97, 61), (180, 260), (300, 220)]
    imgs = [torch.from_numpy(photos(1, size, seed=k)[0]).permute(2, 0, 1).contiguous()
            for k, size in enumerate(sizes)]
    got = geometry.batch(imgs, grouped=True)  # the CUDA default
    want = torch.stack([geometry(img).permute(1, 2, 0) for img in imgs])
    assert got.shape == (len(imgs), cfg.crop, cfg.crop, 3) and got.is_contiguous()
    assert torch.equal(got, want) and torch.equal(geometry.batch(imgs), want)
    same = geometry.batch(imgs[:1] * 3, grouped=True)  # one size: a single call
    assert torch.equal(same, want[:1].expand(3, -1, -1, -1)) and same.is_contiguous()


def test_tensor_path_strict_raises_at_the_bad_files_batch(tmp_path, folder):
    """The decoding thread hands its error to the caller where the batch would have been: the
    batches before it arrive, then the error names the file; the thread is gone after."""
    import threading

    files = sorted(p for p in folder.iterdir() if p.suffix == ".jpg")[:4]
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(files[0].read_bytes()[:200])
    files = files + [bad]
    dec = Decoder("transfer")
    got = []
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        for b in tensor_batches(batch_ranges(len(files), 2), files.__getitem__, dec,
                                trex_hub.preprocess.PRESETS["transfer"],
                                describe=lambda i: files[i].name):
            got.append(b.positions)
    assert got == [[0, 1], [2, 3]]
    assert not [t for t in threading.enumerate() if t.name.startswith("trex-")]


def test_extract_decode_gpu_on_cpu_within_1e2_of_pil(r18_path, folder):  # noqa: F811
    model = trex_hub.load(r18_path)
    files = sorted(folder.iterdir())
    ref = model.extract(files, decode="cpu", draft=False)
    got = model.extract(files, decode="gpu", batch_size=5)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-2


def test_cli_runs_with_processes_and_tensor_decoding(r18_path, folder, tmp_path):  # noqa: F811
    from trex_hub.cli.extract import main

    outs = {}
    for mode in (["--workers-mode", "threads"], ["--workers-mode", "processes", "-j", "2"],
                 ["--decode", "gpu"]):
        out = tmp_path / f"{mode[1]}.npy"
        assert main([str(r18_path), str(folder), "-o", str(out), "-q", "-b", "4"] + mode) == 0
        outs[mode[1]] = np.load(out)
    assert np.array_equal(outs["threads"], outs["processes"])
    assert rel_err(outs["gpu"], outs["threads"]) < 1e-2


def test_the_pixel_limit_holds_whichever_decoder_runs(r18_path, tmp_path):  # noqa: F811
    """--max-pixels (and the ceiling no setting lifts) used to be checked by the PIL path alone:
    the same JPEG was refused by --decode cpu and decoded by --decode gpu (auto's choice on
    CUDA). The tensor path now reads the frame size and leaves such a file to PIL."""
    from trex_hub.cli.extract import main
    from trex_hub.featurefile import read_features

    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("RGB", (1600, 1200), (90, 120, 200)).save(folder / "big.jpg", quality=90)
    Image.fromarray(photos(1, (120, 90))[0]).save(folder / "small.jpg", quality=90)
    data = (folder / "big.jpg").read_bytes()
    assert jpeg_extent(data) == len(data) and jpeg_extent(data, 1_920_000) == len(data)
    assert jpeg_extent(data, 1_919_999) is None
    assert jpeg_extent(data, 1_920_000, resize=224) == len(data)  # 299 x 224 after the resize
    thin = io.BytesIO()
    Image.new("RGB", (4000, 8)).save(thin, format="JPEG")
    assert jpeg_extent(thin.getvalue(), 1_000_000) is not None  # 32,000 pixels...
    assert jpeg_extent(thin.getvalue(), 1_000_000, resize=224) is None  # ...112,000 x 224 after
    # a small limit bounds the source; the resize every image needs keeps an aspect floor of 64
    assert jpeg_extent(data, 2_000_000, resize=224) == len(data)
    small = jpeg_bytes(photos(1, (64, 48))[0])
    assert jpeg_extent(small, 10_000, resize=224) == len(small)
    for decode in ("cpu", "gpu"):
        out = tmp_path / f"{decode}.npy"
        assert main([str(r18_path), str(folder), "-o", str(out), "-q", "--decode", decode,
                     "--max-pixels", "1000000"]) == 0
        feats, rows = read_features(out)
        by_name = {r["path"]: r for r in rows}
        assert feats.shape[0] == 1 and by_name["small.jpg"]["status"] == "ok", decode
        assert by_name["big.jpg"]["status"] == "failed", decode
        assert "1600x1200 = 1920000 pixels, over the limit of 1000000" in by_name["big.jpg"][
            "error"], by_name["big.jpg"]


# ------------------------------------------------------------------------------ CUDA ------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
def test_cuda_fp32_is_full_fp32_and_tf32_is_opt_in(r18_path):  # noqa: F811
    model = trex_hub.load(r18_path)
    imgs = photos(8, (120, 90))
    ref = model.extract(imgs)
    before = flag_values()
    assert rel_err(model.extract(imgs, device="cuda"), ref) < 1e-5
    assert rel_err(model.extract(imgs, device="cuda", precision="tf32"), ref) < 1e-2
    assert flag_values() == before


@pytest.mark.cuda
@needs_cuda
def test_cuda_tensor_decoding_matches_cpu_path(r18_path, folder, tmp_path):  # noqa: F811
    """nvJPEG within 1e-2 of PIL on photo-like JPEGs (the folder's sizes). Not on ``folder``'s
    own images: their independent per-pixel colour noise of +-20 levels is the worst case for
    4:2:0 chroma upsampling, where nvJPEG and libjpeg-turbo differ most (1.5e-2 there on an
    H100; 4.6e-3 on photo-like images: benchmarks/gpu_decode_check.py, docs/benchmarks.md)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    from extract_bench import make_photos

    model = trex_hub.load(r18_path)
    for k, size in enumerate([(300, 220), (180, 260), (500, 375), (230, 230), (400, 250),
                              (260, 400)] * 2):
        make_photos(tmp_path / "photos", 1, size=size, classes=1, seed=k, start=k)
    good = sorted((tmp_path / "photos").rglob("*.jpg"))
    ref = model.extract(good, decode="cpu", draft=False)
    gpu = model.extract(good, device="cuda", decode="gpu", batch_size=5)
    assert rel_err(gpu, ref) < 1e-2
    on_cpu = model.extract(good, decode="gpu", batch_size=5)
    assert rel_err(gpu, on_cpu) < 1e-2
    (tmp_path / "bad").mkdir()
    make_bad_files(tmp_path / "bad")
    files = sorted(folder.iterdir()) + sorted((tmp_path / "bad").iterdir())
    dec = Decoder("transfer")
    batches = list(tensor_batches(batch_ranges(len(files), 6), files.__getitem__, dec,
                                  trex_hub.preprocess.PRESETS["transfer"], device="cuda",
                                  strict=False, catch_all=True))
    assert sum(len(b.failures) for b in batches) == 5
    assert all(b.data.is_cuda for b in batches if b.data is not None)


@pytest.mark.cuda
@needs_cuda
def test_cuda_async_pipeline_keeps_order(r18_path, folder):  # noqa: F811
    model = trex_hub.load(r18_path)
    files = sorted(folder.iterdir())
    ref = model.extract(files, decode="cpu")
    for precision, tol in (("fp32", 1e-5), ("fp16", 1e-2), ("bf16", 1e-2)):
        got = model.extract(files, device="cuda", decode="cpu", batch_size=3,
                            precision=precision)
        assert rel_err(got, ref) < tol, precision


def test_compiled_runner_pads_a_short_last_batch(r18_path):  # noqa: F811
    """With torch.compile a smaller last batch would recompile; it is padded and sliced (the
    padding logic is checked on the eager module, compile itself takes a minute here)."""
    model = trex_hub.load(r18_path)
    runner = prepare(model, "cpu")
    x = torch.from_numpy(np.stack(photos(5, (64, 64))))
    ref = runner(x[:3])
    runner.compiled = True
    try:
        runner(x)
        seen = []
        handle = runner.module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        out = runner(x[:3])
        handle.remove()
    finally:
        runner.compiled = False
    assert seen == [5] and out.shape == ref.shape and rel_err(out, ref) < 1e-5


def test_compiled_runner_pads_to_the_announced_batch_size(r18_path):  # noqa: F811
    """Hybrid decoding can deliver the short last batch first: padded to the batch size the run
    announced, it compiles no shape of its own (checked on the eager module, as above)."""
    runner = prepare(trex_hub.load(r18_path), "cpu")
    x = torch.from_numpy(np.stack(photos(5, (64, 64))))
    runner.compiled = True
    seen = []
    handle = runner.module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        runner.expect_batch(5)
        out = runner(x[:3])
        runner(x)
    finally:
        handle.remove()
        runner.compiled = False
    assert seen == [5, 5] and out.shape[0] == 3


def test_extract_runs_announce_their_batch_size(r18_path, tmp_path, monkeypatch):  # noqa: F811
    from trex_hub import inference

    announced = []
    real = inference.InferenceModel.expect_batch
    monkeypatch.setattr(inference.InferenceModel, "expect_batch",
                        lambda self, n: (announced.append(n), real(self, n))[1])
    model = trex_hub.load(r18_path)
    files = []
    for i, arr in enumerate(photos(5, (64, 64))):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(files[-1])
    model.extract(files, batch_size=4)
    model.extract(files[:2], batch_size=4)
    from trex_hub.extract_run import extract_to_file
    from trex_hub.imagefiles import collect_inputs

    extract_to_file(model, collect_inputs([tmp_path]), tmp_path / "f.npy", batch_size=4)
    assert announced == [4, 2, 4]


def test_gpu_bench_refuses_in_one_line_without_cuda(capsys, monkeypatch):
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    import extract_gpu_bench

    assert extract_gpu_bench.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a GPU" in err
    import gpu_decode_check

    assert gpu_decode_check.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs CUDA" in err


def test_run_options_refuse_a_bad_decode_before_writing(r18_path, folder, tmp_path):  # noqa: F811
    from trex_hub.extract_run import extract_to_file
    from trex_hub.imagefiles import collect_inputs

    model = trex_hub.load(r18_path)
    with pytest.raises(ValueError, match="decode='gpu' resizes to a preset"):
        extract_to_file(model, collect_inputs([folder]), tmp_path / "f.npy", decode="gpu",
                        preprocess=None)
    assert not (tmp_path / "f.npy.parts").exists()
