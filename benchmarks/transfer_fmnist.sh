#!/usr/bin/env bash
# Fashion-MNIST transfer benchmark: the paper's linear-probe protocol on a fixed subset of the real
# Fashion-MNIST (Debian package dataset-fashion-mnist, MIT licence), end to end, with a report.
#
#   benchmarks/transfer_fmnist.sh MODEL [MODEL ...]
#
# MODEL: a registry name (trex, trex_star, ...), a checkpoint path, or random:NAME (random init).
# Fixed subset: class-balanced draws (seed 0) of TRAIN_LIMIT images from the 60,000 training
# images as trainval and TEST_LIMIT from the 10,000 test images (by default 200 and 100 per
# class), all 10 classes; 28x28 grey images upscaled (bicubic) to IMAGE_SIZE and repeated
# to RGB, ImageNet mean/std; 2048-d pooled backbone features; logistic-regression probe, C searched
# over TRIALS trials on a seeded 20 % per-class validation split, refit, test top-1, per seed.
#
# Settings (environment):
#   OUT=results/fmnist_transfer  DATA=/usr/share/datasets/fashion-mnist  IMAGE_SIZE=224
#   TRAIN_LIMIT=2000  TEST_LIMIT=1000  SEEDS="0 1 2"  TRIALS=30  MAX_ITER=2000  DEVICE=cpu
#   BATCH_SIZE=64  THREADS=(unset: libraries' default; 1 is fastest on a busy machine)
#   CACHE=$OUT/features (computed features, reused by a rerun with more seeds)
#   PYTHON=(.venv/bin/python if present, else python3)
#   NAMES="a b ..." (one display name per MODEL; default: the models' names, with their parent
#   folder where two are alike, e.g. runs/a/checkpoint.pth -> a-checkpoint)
# Writes $OUT/results/*.json, $OUT/report.md, $OUT/report.csv, $OUT/report.png.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT="${OUT:-results/fmnist_transfer}"
DATA="${DATA:-/usr/share/datasets/fashion-mnist}"
IMAGE_SIZE="${IMAGE_SIZE:-224}"
TRAIN_LIMIT="${TRAIN_LIMIT:-2000}"
TEST_LIMIT="${TEST_LIMIT:-1000}"
SEEDS="${SEEDS:-0 1 2}"
TRIALS="${TRIALS:-30}"
DEVICE="${DEVICE:-cpu}"
BATCH_SIZE="${BATCH_SIZE:-64}"
MAX_ITER="${MAX_ITER:-2000}"
CACHE="${CACHE:-$OUT/features}"
THREADS="${THREADS:-}"
NAMES="${NAMES:-}"
extra=()
[[ -n "$THREADS" ]] && extra+=(--threads "$THREADS")
# shellcheck disable=SC2206
[[ -n "$NAMES" ]] && extra+=(--names $NAMES)

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ $# -lt 1 ]] && exit 2 || exit 0
fi
if ! ls "$DATA"/train-images*idx3-ubyte* >/dev/null 2>&1; then
    echo "Fashion-MNIST not found in $DATA: apt-get install dataset-fashion-mnist (or set DATA)" >&2
    exit 1
fi


start=$(date +%s)
"$PYTHON" -m trex_hub.cli.eval run --models "$@" --format fashion-mnist --data "$DATA" \
    --train-limit "$TRAIN_LIMIT" --test-limit "$TEST_LIMIT" --subset-seed 0 \
    --image-size "$IMAGE_SIZE" --seeds $SEEDS --trials "$TRIALS" --device "$DEVICE" \
    --batch-size "$BATCH_SIZE" --max-iter "$MAX_ITER" --cache "$CACHE" "${extra[@]}" \
    --dataset-name "fmnist-${TRAIN_LIMIT}-${TEST_LIMIT}-${IMAGE_SIZE}px" \
    --out "$OUT/results"
"$PYTHON" -m trex_hub.cli.eval report "$OUT/results" --markdown "$OUT/report.md" \
    --csv "$OUT/report.csv" --plot "$OUT/report.png"
echo "wall time: $(( $(date +%s) - start )) s; report in $OUT/report.md" >&2
