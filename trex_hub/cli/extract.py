"""``trex-extract``: features of a folder (or list) of images, streamed to one file.

    trex-extract MODEL INPUT... -o OUT.{npy,safetensors,pt} [options]

MODEL is a registry name (``trex_star``), a checkpoint path or ``hf-hub:org/repo``. INPUTs are
image files, folders (searched recursively) or text files listing one image per line
(``path`` or ``path<TAB>label``; a relative path is resolved against the list file's folder, not
the working folder). Rows follow the sorted relative paths of a folder and the
order of a list; with several folder INPUTs, paths are relative to their common parent. Next to
OUT go ``OUT.manifest.jsonl`` (one row per input: index, path, label, status, error) and
``OUT.meta.json``; see :mod:`trex_hub.featurefile`.

Runs are resumable (``--resume`` after Ctrl-C, SIGKILL or a power cut recomputes nothing that was
committed) and scale out with torchrun::

    torchrun --nproc_per_node=4 -m trex_hub.cli.extract trex_star /data/images -o feats.npy

Exit codes: 0 done (bad files skipped are listed in the manifest), 1 failure, 2 usage error,
130 interrupted (see :mod:`trex_hub.cli.common`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import threading
from typing import List, Optional

from .common import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, HelpFormatter, UsageError, add_debug_flag,
                     debug_wanted, exit_now, failing_on, nonempty, process_age, run_cli,
                     torchrun_ranks)

PROG = "trex-extract"


def build_parser() -> argparse.ArgumentParser:
    from ..choices import MAX_PIXELS_CEILING, PRECISIONS
    from ..imagefiles import IMAGE_EXTENSIONS

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Extract t-ReX features of images into a .npy / .safetensors / .pt file "
                    "plus a manifest mapping rows back to files.",
        formatter_class=HelpFormatter)
    p.add_argument("model", help="registry name (e.g. trex_star), checkpoint path or "
                                 "hf-hub:org/repo")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive) or text files listing images, one "
                        "per line (relative paths in a list are resolved against the list "
                        "file's folder)")
    p.add_argument("-o", "--output", required=True,
                   help="features file: .npy, .safetensors or .pt")
    p.add_argument("--head", choices=("backbone", "projector"), default="backbone",
                   help="2048-d backbone features or 256-d projector embeddings")
    p.add_argument("--preprocess", choices=("transfer", "imagenet", "model"), default="transfer",
                   help="transfer: Resize 224 bicubic + CenterCrop 224 (the paper's protocol); "
                        "imagenet: Resize 256 + CenterCrop 224; model: the weights' own "
                        "preprocessing config (the transfer preset for every released model)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise every feature")
    p.add_argument("--labels", choices=("none", "folder"), default="none",
                   help="folder: label each image by its parent folder's name")
    p.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS),
                   help="comma-separated file extensions picked up in folders")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="images per forward pass (default: 32 on a GPU, 8 on a CPU, where "
                        "larger batches are not faster and smaller ones commit more often)")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="decoding workers (default: one per core this process may use; "
                        "under torchrun, this process's share of the machine's cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32: full fp32 (no TF32); tf32: TF32 on Ampere+ GPUs; bf16/fp16 "
                        "autocast is meant for CUDA")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch",
                   help="torch: the PyTorch fast path; onnxruntime: export the model to ONNX "
                        "and run ONNX Runtime on the CPU (fp32; needs trex_hub[interop])")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (slow start; for long runs)")
    p.add_argument("--no-draft", dest="draft", action="store_false",
                   help="decode JPEGs at full size even when the preset shrinks them a lot "
                        "(exact pixels, slower on large photos)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels (decompression bombs; default: "
                        "PIL's limit, about 89M; 0 = up to the hard ceiling of "
                        f"{MAX_PIXELS_CEILING:,}, about 3 GB of RGB)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="images per chunk, the unit shared out to torchrun ranks (rounded up "
                        "to a multiple of the batch)")
    p.add_argument("--commit-every", type=float, default=5.0, metavar="SECONDS",
                   help="also commit the work done so far every SECONDS, so a kill loses "
                        "little (the output is the same wherever the commits fall)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same OUT (refused, saying what "
                        "differs, unless model, options and inputs are the same)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT or unfinished run")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first bad image instead of skipping it")
    p.add_argument("--keep-parts", action="store_true",
                   help="keep the committed chunks folder after merging")
    p.add_argument("--ema", action="store_true",
                   help="use the EMA network of a full training checkpoint")
    p.add_argument("--cache-dir", default=None, type=nonempty, help="download cache")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    _add_scale_options(p)
    add_debug_flag(p, also="; after a run, where its time went, phase by phase (start-up, "
                           "imports, inputs, model, waiting for CUDA, extract, batch loop)")
    return p


def _add_scale_options(p: argparse.ArgumentParser) -> None:
    """Decoding at scale (issue 11): where JPEGs are decoded and by what kind of workers."""
    from ..choices import DECODES, WORKER_MODES

    p.add_argument("--decode", choices=DECODES, default="auto",
                   help="gpu: JPEGs decoded in batches on the device (nvJPEG on CUDA), other "
                        "files by PIL; cpu: PIL, the exact reference with --no-draft "
                        "(otherwise JPEGs at least twice the resize target are decoded at a "
                        "reduced DCT scale, within about 1e-2 of exact); hybrid: both at once, "
                        "each batch to whichever is free (CPU workers at a lower priority); "
                        "auto on CUDA with fewer than 32 decode workers: hybrid for 512 files "
                        "and 4 workers or more (fastest on an H200; runs may then differ in "
                        "the last digits: pick gpu or cpu to repeat bit for bit), else gpu; "
                        "else cpu")
    p.add_argument("--workers-mode", choices=WORKER_MODES, default="auto",
                   help="CPU decoding in threads or in worker processes writing shared memory; "
                        "auto: processes for many files on >= 4 workers")


def device_problem(device: str) -> Optional[str]:
    """What is wrong with the form of ``--device`` (``None``: nothing), checked with the other
    options: torch refuses an unknown name only once the model is loaded, and a device that
    cannot run the model (``meta``) fails at the first batch. Whether this machine has that
    CUDA device is :func:`cuda_problem`'s, later: asking starts the CUDA driver, which a
    CUDA run does in a thread of its own, beside its imports (:func:`_start_cuda`)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return f"--device {device}: use auto, cpu, cuda or cuda:N"
    return None


def cuda_problem(option: str, device: str) -> Optional[str]:
    """What keeps ``device`` (``cuda`` or ``cuda:N``, from ``--device option``) from running
    here (``None``: nothing)."""
    import torch

    if not torch.cuda.is_available():
        return f"--device {option}: CUDA is not available here; use --device cpu (or auto)"
    count = torch.cuda.device_count()
    if int(device.partition(":")[2] or 0) < count:
        return None
    have = "1 CUDA device (cuda:0)" if count == 1 else \
        f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"
    return f"--device {option}: this machine has {have}"


def silence_handled_warnings() -> None:
    """PIL warns about what the run handles itself: images over PIL's pixel limit (refused by
    the run's own --max-pixels check, with a line in the manifest) and corrupt EXIF data (the
    image is read without it). Nothing else is silenced."""
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)


def collect(args: argparse.Namespace) -> list:
    """The input entries of a parsed command line, in output order."""
    from ..imagefiles import collect_inputs

    return collect_inputs(args.inputs, extensions=args.extensions.split(","), labels=args.labels)


def run_options(args: argparse.Namespace, device: str, engine=None):
    """The :class:`~trex_hub.extract_run.RunOptions` of a parsed command line."""
    from ..extract_run import RunOptions

    batch_size = args.batch_size or (32 if str(device).startswith("cuda") else 8)
    return RunOptions(batch_size=batch_size, num_workers=args.workers,
                      preprocess=args.preprocess, normalize=args.normalize,
                      precision=args.precision, device=device, compile=args.compile,
                      draft=args.draft, max_pixels=args.max_pixels, chunk_size=args.chunk_size,
                      commit_seconds=args.commit_every,
                      resume=args.resume, overwrite=args.overwrite, strict=args.strict,
                      keep_parts=args.keep_parts, progress=args.progress and not args.quiet,
                      decode=args.decode, workers_mode=args.workers_mode, engine=engine)


def main(argv: Optional[List[str]] = None) -> int:
    from ..choices import MAX_PIXELS_CEILING

    parser = build_parser()
    rank, world, local_rank = torchrun_ranks()

    def parse() -> argparse.Namespace:
        args = parser.parse_args(argv)
        if (args.batch_size is not None and args.batch_size < 1) or args.chunk_size < 1:
            parser.error("--batch-size and --chunk-size must be >= 1")
        if args.workers is not None and args.workers < 0:
            parser.error("--workers must be >= 0")
        if args.engine == "onnxruntime" and (args.precision != "fp32" or args.compile
                                             or args.device not in ("auto", "cpu")):
            parser.error("--engine onnxruntime runs fp32 on the CPU: drop --precision, "
                         "--compile and --device (or use --engine torch)")
        if not args.commit_every > 0:
            parser.error("--commit-every must be > 0 seconds")
        if args.max_pixels is not None and not 0 <= args.max_pixels <= MAX_PIXELS_CEILING:
            parser.error(f"--max-pixels must be between 0 and {MAX_PIXELS_CEILING} (0: the "
                         "ceiling itself)")
        if args.threads is not None and args.threads < 1:
            parser.error("--threads must be >= 1 (leave it out for torch's choice)")
        from ..featurefile import output_problem

        bad_output = output_problem(args.output)
        problem = device_problem(args.device) or (f"-o {bad_output}" if bad_output else None)
        if problem:
            parser.error(problem)
        return args

    return run_cli(PROG, parse, lambda args: _main(args, rank, world, local_rank),
                   interrupted="interrupted; committed chunks are kept: rerun with --resume to "
                               "continue",
                   suffix=f" [rank {rank}]" if world > 1 else "")


def all_inputs_failed(summary) -> bool:
    """Whether the output rank 0 wrote (or found complete, on ``--resume``) holds no features
    although there were inputs: every one of them failed."""
    if summary.out is None or summary.total == 0:
        return False
    if summary.ok >= 0:
        return summary.ok == 0
    from ..featurefile import recorded_counts

    counts = recorded_counts(summary.out)  # already complete: what the run that made it found
    return counts is not None and counts[0] == 0 and counts[1] > 0


def _device(args: argparse.Namespace, world: int, local_rank: int) -> str:
    import torch

    if args.device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = "cpu" if args.engine == "onnxruntime" else device
    else:
        device = args.device
        if world > 1 and device == "cuda":
            device = f"cuda:{local_rank}"
    problem = cuda_problem(args.device, device) if device.startswith("cuda") else None
    if problem:
        raise UsageError(problem)
    return device


def _start_cuda(args: argparse.Namespace, world: int, local_rank: int
                ) -> Optional[threading.Thread]:
    """Start CUDA in a thread, if the run may use it: the driver, the context and the cuDNN and
    cuBLAS libraries take a second or more, which the main thread spends meanwhile importing
    torchvision and the engine, listing the inputs and loading the weights. Call after
    ``import torch``: the thread then imports nothing new, so it cannot deadlock with the main
    thread's imports. Join it before anything forks (decoding processes). Any failure is left to
    the main path, which meets it again and reports it."""
    if args.engine != "torch" or args.device == "cpu":
        return None

    def start() -> None:
        import torch

        try:
            device = _device(args, world, local_rank)
            if not device.startswith("cuda"):
                return
            x = torch.ones(2, 3, 8, 8, device=device)
            torch.nn.functional.conv2d(x, torch.ones(4, 3, 3, 3, device=device))  # cuDNN
            torch.mm(x.flatten(1), x.flatten(1).t())  # cuBLAS
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - reported by the main path
            pass

    thread = threading.Thread(target=start, name="trex-extract-cuda-start", daemon=True)
    thread.start()
    return thread


def _main(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> int:
    import time

    import torch

    started, t0 = process_age(), time.perf_counter()
    cuda_start = _start_cuda(args, world, local_rank)

    from ..api import ModelLoadError, load
    from ..checkpoint import CheckpointError, CheckpointReadError
    from ..extract_run import ExtractError, extract_to_file
    from ..featurefile import output_paths
    from ..hub.http import DownloadError
    from ..registry import UnknownModelError

    t_imports = time.perf_counter()

    quiet = args.quiet or rank != 0

    def say(msg: str) -> None:
        if not quiet:
            print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    with failing_on(ValueError, code=EXIT_USAGE):
        output_paths(args.output)
    silence_handled_warnings()
    device = _device(args, world, local_rank)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.max_pixels is not None:
        from PIL import Image

        # our own check enforces --max-pixels; lift PIL's so it does not refuse first
        if args.max_pixels <= 0:
            Image.MAX_IMAGE_PIXELS = None
        elif Image.MAX_IMAGE_PIXELS is not None and args.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = args.max_pixels

    barrier = None
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            from ..rendezvous import RendezvousError, init_group

            def note(msg: str) -> None:  # every waiting process says so, not rank 0 alone
                if not args.quiet:
                    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

            # gloo is only used to wait for each other; features never cross processes. The
            # collectives wait for days (rank 0's merge); meeting the others, minutes
            with failing_on(RendezvousError):
                init_group("gloo", datetime.timedelta(days=3), rank, world, note)
        barrier = dist.barrier

    try:
        with failing_on(FileNotFoundError, ValueError, code=EXIT_USAGE):
            entries = collect(args)
        t_inputs = time.perf_counter()
        if not entries:
            say("warning: no images found in the inputs")
        with failing_on(ModelLoadError, UnknownModelError, CheckpointError, CheckpointReadError,
                        DownloadError):
            model = load(args.model, projector=args.head == "projector", ema=args.ema,
                         cache_dir=args.cache_dir, progress=not quiet)
        t_model = time.perf_counter()
        say(f"{len(entries)} images, model {args.model} ({args.head}, {model.out_dim}-d), "
            f"device {device}, {args.precision}" + (f", {world} processes" if world > 1 else ""))
        info = {"model": args.model, "head": args.head, "arch": getattr(model, "arch", None),
                "inputs": [os.fspath(i) for i in args.inputs], "labels": args.labels}
        engine = None
        if args.engine != "torch":
            from ..onnx_export import engine_for
            from ..transforms import resolve_preprocess

            info["engine"] = args.engine
            say("exporting the model to ONNX for ONNX Runtime")
            # ImportError: --engine onnxruntime without its packages; ValueError: --preprocess
            # model for weights without a preprocessing config
            with failing_on(ImportError, ValueError):
                crop = resolve_preprocess(args.preprocess, model).crop  # the graph's one size
                engine = engine_for(args.engine, model, threads=args.threads, image_size=crop)
        if cuda_start is not None:
            cuda_start.join()
        if args.engine == "torch" and device.startswith("cuda:"):
            # this process's GPU for whatever names none (pinned memory, streams): under
            # torchrun, rank N would otherwise open a second context on cuda:0
            torch.cuda.set_device(device)
        t_cuda = time.perf_counter()
        with failing_on(ExtractError, ImportError):
            summary = extract_to_file(model, entries, args.output,
                                      run_options(args, device, engine),
                                      rank=rank, world_size=world, barrier=barrier, info=info,
                                      log=say)
        if rank == 0 and summary.out is not None and summary.ok >= 0:
            rate, loop = summary.images_per_second, summary.loop_images_per_second
            say(f"{summary.total} images -> {summary.out} [{summary.ok} x {summary.dim}], "
                f"{summary.failed} failed, {summary.seconds:.1f} s"
                + (f", {rate:.1f} img/s ({loop:.1f} img/s in the batch loop)"
                   + (" on rank 0" if world > 1 else "") if summary.computed else ""))
            for rel, why in summary.failures[:5]:
                say(f"  skipped {rel}: {why}")
            if summary.failed > 5:
                say(f"  ... {summary.failed - 5} more in "
                    f"{output_paths(args.output)['manifest']}")
        all_failed = all_inputs_failed(summary)
        if all_failed:  # an empty features file must not pass for a finished job
            shown = summary.failures and not quiet
            print(f"{PROG}: error: none of the {summary.total} inputs could be read, so "
                  f"{summary.out} holds no features; the reasons are "
                  f"{'above and ' if shown else ''}in {output_paths(args.output)['manifest']}",
                  file=sys.stderr, flush=True)
        if debug_wanted(args):  # where a short run's time goes (the benchmarks read this line)
            lanes = summary.decoding.get("lanes")
            if summary.decoding:
                say(f"decoding: {summary.decoding['kind']}" + (
                    "" if lanes is None else ", batches by lane: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(lanes.items()))))
            say("timing: start-up (interpreter, torch) "
                + ("?" if started is None else f"{started:.2f} s")
                + f", imports {t_imports - t0:.2f} s, inputs {t_inputs - t_imports:.2f} s, "
                f"model {t_model - t_inputs:.2f} s, waiting for CUDA {t_cuda - t_model:.2f} s, "
                f"extract {summary.seconds:.2f} s (batch loop {summary.loop_seconds:.2f} s), "
                f"main {time.perf_counter() - t0:.2f} s")
        return EXIT_FAIL if all_failed else EXIT_OK
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    exit_now(main())
