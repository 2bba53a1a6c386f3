"""``trex-eval``: transfer evaluation with the paper's linear-probe protocol.

    trex-eval run --models trex trex_star path/to/ckpt.pth --format fashion-mnist \\
        --out results/ --seeds 0 1 2
    trex-eval report results/ --markdown table.md --csv table.csv --plot table.png
    trex-eval neighbours feats.npy --images photos/ --out grid.png

Exit codes: 0 success, 1 failure (missing data, unreadable checkpoint...), 2 usage error,
130 interrupted (see :mod:`trex_hub.cli.common`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from .common import (EXIT_OK, EXIT_USAGE, UsageError, add_debug_flag, exit_now, fail, failing_on,
                     float_in, int_at_least, run_cli)

PROG = "trex-eval"

_RUN_EPILOG = """\
formats:
  imagefolder      --data ROOT with ROOT/train/<class>/* + ROOT/test/<class>/* (trainval/ and
                   val/ accepted), or one tree ROOT/<class>/* split per class with
                   --test-fraction / --split-seed
  fashion-mnist    --data DIR holding the idx files (default /usr/share/datasets/fashion-mnist,
                   from `apt-get install dataset-fashion-mnist`); plain or .gz
  features         --data DIR of trex-extract outputs: DIR/train* + DIR/test* for one model, or
                   DIR/<model>/train* + DIR/<model>/test* for each of several --models; a
                   --models whose weights can be told without a download (registry name,
                   local checkpoint, cached release) must match the weights their meta.json
                   records, else --models only labels the result
  aircraft, cars, dtd, eurosat, flowers102, pets, food101, sun397
                   the paper's small sets via torchvision, read from --data ROOT with
                   download=False (never downloads)

models: registry names (trex, trex_star, ...), checkpoint paths (.pth, .safetensors, exported
folders), hf-hub:org/repo, or random:NAME for NAME's architecture with random weights (drawn
with torch seed 0, so the same in every run).

protocol (the paper's linear-probe transfer evaluation; see the README's "Transfer
evaluation" section): trainval is split 80/20 per class (>= 1 val image, seeded by the
seed; --split published draws it as the authors' code does, so a seed picks the same validation
images); the probe's hyper-parameters are searched log-uniformly on that split over --trials
trials (Optuna TPE when installed, else a log grid); the probe is refitted on all of trainval and
scored on test (top-1, top-5, mean per-class accuracy). logreg: raw features, L-BFGS multinomial
logistic regression, C in [1e-5, 1e6], at most --max-iter iterations. sgd: L2-normalised
features, linear layer with bias, SGD momentum 0.9, batch --sgd-batch-size, cosine schedule
stepped per epoch over --epochs epochs, lr in [0.1, 100], weight decay in [1e-12, 1e-4]. One
result JSON per (model, dataset, seed) is written to --out, with the precision, threads and
library versions it ran with.
"""


_positive_int = int_at_least(1)
_fraction = float_in(0.0, 1.0, open_low=True)  # --test-fraction: some images on each side


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Evaluate t-ReX models by linear-probe transfer, as in the paper.")
    sub = parser.add_subparsers(dest="command", metavar="{run,report,neighbours}")

    r = sub.add_parser("run", help="evaluate models on a dataset, write one JSON per seed",
                       description="Extract features once per model, then run the linear-probe "
                       "protocol for every seed.", epilog=_RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = r.add_argument_group("what to evaluate")
    g.add_argument("--models", nargs="+", default=[], metavar="MODEL",
                   help="models to compare side by side (optional with --format features)")
    g.add_argument("--names", nargs="+", metavar="NAME",
                   help="display names for --models, one each (default: the name, or the file "
                   "name of a path); names that would share a result file are refused, e.g. "
                   "two runs/*/checkpoint.pth")
    g.add_argument("--format", required=True, metavar="FORMAT",
                   help="imagefolder | fashion-mnist | features | aircraft | cars | dtd | "
                   "eurosat | flowers102 | pets | food101 | sun397")
    g.add_argument("--data", metavar="ROOT", help="dataset root (see formats below)")
    g.add_argument("--dataset-name", metavar="NAME",
                   help="name of the dataset in results and reports (default from the format "
                   "or folder); give it when another folder's results in --out have that name, "
                   "e.g. /data/a/flowers and /data/b/flowers")
    g.add_argument("--out", required=True, metavar="RESULTS_DIR",
                   help="folder for the result JSON files (created); a result another model "
                   "or dataset folder wrote under the same name is never replaced")

    d = r.add_argument_group("dataset subset")
    d.add_argument("--classes", metavar="SPEC",
                   help="keep these classes, relabelled in this order: '0-4', '5,6,7,8,9' or "
                   "class names; indices follow the dataset's class list (sorted class folders; "
                   "for features, the sorted labels). Applies to every format")
    d.add_argument("--train-limit", type=_positive_int, metavar="N",
                   help="class-balanced seeded subset of N trainval images")
    d.add_argument("--test-limit", type=_positive_int, metavar="N",
                   help="class-balanced seeded subset of N test images")
    d.add_argument("--subset-seed", type=int, default=0, metavar="S",
                   help="seed of the --train-limit/--test-limit subsets (default 0; fixed "
                   "across --seeds)")
    d.add_argument("--test-fraction", type=_fraction, default=0.2, metavar="F",
                   help="test share per class for datasets without a test split (default 0.2)")
    d.add_argument("--split-seed", type=int, default=0, metavar="S",
                   help="seed of that train/test split (default 0)")

    p = r.add_argument_group("protocol")
    p.add_argument("--split", choices=("published", "trex_hub"), default="published",
                   help="validation split rule: published (the authors' code: Python "
                   "random.seed(seed), per-class shuffle, the last int(0.2 n) >= 1 to val; "
                   "default) or trex_hub (numpy default_rng, floor(0.2 n + 0.5); older results)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED",
                   help="one evaluation per seed: validation split, search and SGD init "
                   "(default 0)")
    p.add_argument("--trials", type=_positive_int, default=30, metavar="N",
                   help="hyper-parameter trials per seed (default 30)")
    p.add_argument("--probe", choices=("auto", "logreg", "sgd"), default="auto",
                   help="logreg (small sets), sgd (large sets) or auto: sgd from 200,000 "
                   "trainval images on (default auto)")
    p.add_argument("--search", choices=("auto", "optuna", "grid"), default="auto",
                   help="Optuna TPE (auto when importable) or a log grid (default auto)")
    p.add_argument("--max-iter", type=_positive_int, default=2000, metavar="N",
                   help="L-BFGS iterations for logreg (default 2000)")
    p.add_argument("--probe-dtype", choices=("float32", "float64"), default="float32",
                   help="precision of the probe fits: float32 (scikit-learn's choice for float32 "
                   "features) or float64 (slower; L-BFGS gets further on badly scaled features)")
    p.add_argument("--epochs", type=_positive_int, default=100, metavar="N",
                   help="SGD probe epochs (default 100)")
    p.add_argument("--sgd-batch-size", type=_positive_int, default=1024, metavar="N",
                   help="SGD probe batch size (default 1024)")

    f = r.add_argument_group("feature extraction")
    f.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N, for the model and the SGD probe (default cpu)")
    f.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                   help="images per forward pass (default 64)")
    f.add_argument("--image-size", type=_positive_int, default=224, metavar="PX",
                   help="Resize(PX, bicubic) -> CenterCrop(PX); 224 is the paper's protocol "
                   "(default 224)")
    f.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="image decoding threads (default 0)")
    f.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads for torch and for the probe's BLAS (default: the "
                   "libraries' choice; 1 is often fastest on a busy machine)")
    f.add_argument("--cache", metavar="DIR",
                   help="keep computed features in DIR and reuse them when the weights (by "
                   "content), the images (paths, sizes, modification times), the dataset "
                   "options and the image size are unchanged")
    r.add_argument("-q", "--quiet", action="store_true", help="print only the final table")
    add_debug_flag(r)
    r.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (they are shown only on a terminal anyway)")

    rep = sub.add_parser("report", help="aggregate result folders into tables and a plot",
                         description="Mean and std over seeds per (model, dataset) of top-1, "
                         "top-5 and mean per-class accuracy, and the mean log-odds over "
                         "datasets: mean of log(p / (1 - p)) with p = top-1 / 100 (top-1 "
                         "averaged over seeds first, clipped to half a test image from 0 and "
                         "1), ImageNet-1K left out as in the published aggregation. Warns when "
                         "the results mix different settings (precision, threads, split, "
                         "library versions).")
    rep.add_argument("results", nargs="+", metavar="RESULTS_DIR",
                     help="folders (searched recursively) or result JSON files")
    rep.add_argument("--markdown", metavar="FILE", help="write the Markdown table here "
                     "(it is always printed)")
    rep.add_argument("--csv", metavar="FILE", help="write a CSV table here")
    rep.add_argument("--plot", metavar="FILE", help="write a PNG bar plot here (matplotlib)")
    add_debug_flag(rep)
    rep.add_argument("--include-in1k", action="store_true",
                     help="count ImageNet-1K (a dataset named in1k, IN-1K, imagenet-1k, ...) in "
                     "the mean log-odds; the published aggregation leaves it out")
    _add_neighbours_parser(sub)
    return parser


def _log(quiet: bool, progress: bool = False):
    def say(msg: str) -> None:
        if quiet:
            return
        if progress:  # above the bars, not through them
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
    return say


def _cmd_run(args: argparse.Namespace) -> int:
    from ..datasets import DatasetError
    from ..evaluation import report as rpt
    from ..evaluation.protocol import ProtocolConfig
    from ..evaluation.runner import (DataOptions, EvalError, EvalUsageError, FeatureOptions,
                                     normalise_format, run)

    with failing_on(EvalError, code=EXIT_USAGE):
        fmt = normalise_format(args.format)
    if not args.models and fmt != "features":
        raise UsageError(f"--models is required with --format {fmt}")
    if fmt != "fashion-mnist" and not args.data:
        what = "DIR of trex-extract outputs" if fmt == "features" else "ROOT"
        raise UsageError(f"--format {fmt} needs --data {what}")
    if args.names and len(args.names) != len(args.models):
        raise UsageError(f"{len(args.names)} --names for {len(args.models)} --models")
    data = DataOptions(fmt, args.data, classes=args.classes, train_limit=args.train_limit,
                       test_limit=args.test_limit, subset_seed=args.subset_seed,
                       test_fraction=args.test_fraction, split_seed=args.split_seed,
                       name=args.dataset_name)
    cfg = ProtocolConfig(probe=args.probe, trials=args.trials, search=args.search,
                         max_iter=args.max_iter, epochs=args.epochs,
                         batch_size=args.sgd_batch_size, device=args.device,
                         threads=args.threads, dtype=args.probe_dtype, split=args.split)
    import torch

    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    feats = FeatureOptions(batch_size=args.batch_size, image_size=args.image_size,
                           num_workers=args.num_workers, device=args.device,
                           cache=args.cache)
    from ..evaluation.progress import wants_progress

    progress = wants_progress(args.progress and not args.quiet)
    try:
        with failing_on(DatasetError, EvalError, ValueError, RuntimeError, OSError, ImportError,
                        KeyError), failing_on(EvalUsageError, code=EXIT_USAGE):
            summary = run(args.models, data, args.out, seeds=args.seeds, protocol=cfg,
                          features=feats, names=args.names, log=_log(args.quiet, progress),
                          progress=progress)
    finally:
        torch.set_num_threads(old_threads)
    print(rpt.to_markdown(rpt.aggregate(summary.results)))
    _log(args.quiet)(f"{len(summary.files)} result file(s) in {args.out}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from ..evaluation import report as rpt
    from ..evaluation.results import ResultsError, load_results

    with failing_on(ResultsError):
        results = load_results(args.results)
    if not results:
        fail(f"no trex-eval result files under {', '.join(args.results)}")
    rep = rpt.aggregate(results, include_in1k=args.include_in1k)
    warn = rpt.mixed_warning(rep)
    if warn:
        print(f"{PROG} report: warning: {warn}", file=sys.stderr)
    md = rpt.to_markdown(rep)
    print(md)
    with failing_on(OSError, ImportError):
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(md)
        if args.csv:
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            Path(args.csv).write_text(rpt.to_csv(rep))
        if args.plot:
            rpt.plot(rep, args.plot)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# trex-eval neighbours: a picture of nearest neighbours in a trex-extract output
# --------------------------------------------------------------------------------------------
def _add_neighbours_parser(sub) -> None:
    nb = sub.add_parser(
        "neighbours", help="PNG grid of each image's nearest neighbours in a trex-extract output",
        description="For query images of a trex-extract output, draw the image and its k "
        "nearest neighbours (cosine similarity of the features) with their scores; with "
        "labels in the manifest, same-label neighbours are green and others red.")
    nb.add_argument("features", metavar="FEATS",
                    help="a trex-extract output (.npy / .safetensors / .pt with its manifest)")
    nb.add_argument("--images", metavar="DIR_OR_LIST",
                    help="where the manifest's relative paths live: the folder (or list file) "
                    "given to trex-extract; for several folders, their common parent (default: "
                    "from FEATS' meta.json, its single input or its folders' common parent)")
    nb.add_argument("--out", required=True, metavar="PNG", help="the picture to write")
    nb.add_argument("-k", "--k", type=_positive_int, default=4, metavar="K",
                    help="neighbours per query (default 4)")
    nb.add_argument("--queries", type=_positive_int, default=8, metavar="N",
                    help="query rows, spread evenly over the images (default 8)")
    add_debug_flag(nb)


def _image_root(args: argparse.Namespace, feats_path: Path) -> Optional[Path]:
    """The folder the manifest's relative paths are relative to (None: as given)."""
    from ..featurefile import read_meta

    where = args.images
    if where is None:
        inputs = (read_meta(feats_path) or {}).get("inputs") or []
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            inputs = []  # not a record trex-extract writes: --images decides
        if len(inputs) > 1 and all(Path(i).expanduser().is_dir() for i in inputs):
            # trex-extract wrote the paths relative to the folders' common parent
            return Path(os.path.commonpath([os.path.abspath(Path(i).expanduser())
                                            for i in inputs]))
        if len(inputs) != 1:
            return None
        where = inputs[0]
    root = Path(where).expanduser()
    if root.is_dir():
        return root
    if root.is_file():  # a list file: its relative entries are relative to its folder
        return root.parent
    raise FileNotFoundError(f"--images {where}: no such folder or list file")


def _cmd_neighbours(args: argparse.Namespace) -> int:
    import numpy as np

    from ..featurefile import read_features

    feats_path = Path(args.features)
    with failing_on(OSError, ValueError, ImportError):
        feats, rows = read_features(feats_path)
        root = _image_root(args, feats_path)
        ok = sorted((r for r in rows if r.get("index") is not None), key=lambda r: r["index"])
        paths = [Path(r["path"]) if root is None or Path(r["path"]).is_absolute()
                 else root / r["path"] for r in ok]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of the manifest not found, e.g. {missing[0]}; pass "
                "--images with the folder or list given to trex-extract (for several folders, "
                "their common parent)")
        if len(paths) < 2:
            raise ValueError(f"{feats_path} has {len(paths)} image(s); neighbours need >= 2")
        from ..viz import neighbours_figure

        n = len(paths)
        queries = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(args.queries, n))})
        labels = [r.get("label") for r in ok]
        out = neighbours_figure(paths, feats, args.out, k=min(args.k, n - 1), queries=queries,
                                names=[r["path"] for r in ok],
                                labels=labels if any(x is not None for x in labels) else None,
                                title=f"{feats_path.name}: nearest neighbours (cosine)")
    print(f"wrote {out} ({len(queries)} queries x {min(args.k, n - 1)} neighbours)",
          file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()

    def body(args: argparse.Namespace) -> int:
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        commands = {"run": _cmd_run, "report": _cmd_report, "neighbours": _cmd_neighbours}
        return commands[args.command](args)

    return run_cli(lambda args: f"{PROG} {args.command}", lambda: parser.parse_args(argv), body)


if __name__ == "__main__":  # pragma: no cover
    exit_now(main())
