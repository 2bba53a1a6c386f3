#!/usr/bin/env bash
# Small-scale test of the t-ReX claim on real data (docs/training.md, "Reproduction experiment"):
# resnet18 trained on Fashion-MNIST classes 0-4 with (a) a plain supervised baseline, (b) the
# t-ReX* preset, (c) the t-ReX preset, same epochs and seeds; then a linear probe on classes 5-9,
# which none of them saw. Sized for a 2-core CPU (about 30-40 minutes in all).
#
#   benchmarks/repro_fmnist.sh            # train + probe + table
#   benchmarks/repro_fmnist.sh train      # only the trainings (resumable: rerun to continue)
#   benchmarks/repro_fmnist.sh probe      # only the probes and the table
#
# Environment: PYTHON (default .venv/bin/python), OUT (default runs/repro_fmnist),
# FMNIST (idx folder, default /usr/share/datasets/fashion-mnist), SEEDS ("0 1"), EPOCHS (3),
# TRAIN_LIMIT (1000), PROBE_TRAIN / PROBE_TEST (1000 / 1000), THREADS (torch threads, 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/repro_fmnist}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
SEEDS=${SEEDS:-"0 1"}
EPOCHS=${EPOCHS:-3}
TRAIN_LIMIT=${TRAIN_LIMIT:-1000}
PROBE_TRAIN=${PROBE_TRAIN:-1000}
PROBE_TEST=${PROBE_TEST:-1000}
THREADS=${THREADS:-2}
PRESETS=${PRESETS:-"baseline trex_star trex"}
PHASE=${1:-all}
mkdir -p "$OUT"
export OMP_NUM_THREADS=$THREADS

# Scaled-down recipe (docs/training.md says why each value differs from ImageNet): 1000
# training images (200 per class), 3 epochs of 31 iterations, batch 32, --lr 0.8 (peak 0.1,
# the ImageNet peak, because the schedule is ~5000x shorter), half an epoch of warm-up;
# 24 px global / 12 px local crops (ImageNet 224 / 96) and 4 local crops (ImageNet 8), blur
# radius scaled by 24/224; OCM memory 1024 (32 iterations, as 8192 at batch 256) and EMA
# momentum 0.95 so that the prototypes follow the network within ~20 iterations (0.999 does
# that over ~1000 of ImageNet's 500k).
COMMON=(--arch resnet18 --dataset fashion-mnist --data "$FMNIST" --classes 0-4
        --train-limit "$TRAIN_LIMIT" --val-limit 1000 --global-size 24 --local-size 12
        --blur-radius 0.01 0.2 --epochs "$EPOCHS" --warmup-epochs 0.5 --batch-size 32
        --lr 0.8 --workers 0 --print-freq 10 --eval-every "$EPOCHS")

train_one() {  # preset seed
  local dir="$OUT/$1-s$2"
  local extra=()
  if [ "$1" != baseline ]; then extra=(--memory-size 1024 --ema-momentum 0.95 --local-crops 4); fi
  echo "== $(date -u +%H:%M:%S) train $1 seed $2 -> $dir"
  "$PYTHON" -m trex_hub.cli.train --preset "$1" --seed "$2" "${COMMON[@]}" "${extra[@]}" \
      --output-dir "$dir" --resume 2>&1 | grep -v "^\[trex-train\] epoch .*\] loss" || true
  test -f "$dir/checkpoint.pth"
}

if [ "$PHASE" = all ] || [ "$PHASE" = train ]; then
  for seed in $SEEDS; do
    for preset in $PRESETS; do
      train_one "$preset" "$seed"
    done
  done
fi

if [ "$PHASE" = all ] || [ "$PHASE" = probe ]; then
  echo "== $(date -u +%H:%M:%S) probes"
  "$PYTHON" - "$OUT" "$FMNIST" "$PROBE_TRAIN" "$PROBE_TEST" "$SEEDS" "$PRESETS" <<'PY'
import json, sys, time
from pathlib import Path
out, fmnist = Path(sys.argv[1]), sys.argv[2]
probe_train, probe_test = int(sys.argv[3]), int(sys.argv[4])
seeds, presets = sys.argv[5].split(), sys.argv[6].split()
sys.path.insert(0, "benchmarks")
from repro_fmnist_probe import probe_run  # noqa: E402
rows = []
for preset in presets:
    for seed in seeds:
        d = out / f"{preset}-s{seed}"
        log = [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines() if l.strip()]
        t0 = time.time()
        res = probe_run(d / "checkpoint.pth", fmnist, probe_train, probe_test)
        row = {"preset": preset, "seed": int(seed), "epochs": log[-1]["epoch"],
               "train_task_top1": log[-1]["val_top1"], **res,
               "probe_time_s": round(time.time() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
(out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
  "$PYTHON" - "$OUT" <<'PY'
import json, sys, statistics as st
from pathlib import Path
rows = [json.loads(l) for l in (Path(sys.argv[1]) / "results.jsonl").read_text().splitlines()]
print("| model | seeds | classes 0-4 top-1 (trained task) | classes 5-9 linear probe top-1 (transfer) |")
print("|---|---|---|---|")
for preset in dict.fromkeys(r["preset"] for r in rows):
    rs = [r for r in rows if r["preset"] == preset]
    def fmt(key):
        v = [r[key] for r in rs]
        sd = st.stdev(v) if len(v) > 1 else 0.0
        return f"{st.mean(v):.2f} ± {sd:.2f} ({', '.join(f'{x:.2f}' for x in v)})"
    print(f"| {preset} | {len(rs)} | {fmt('train_task_top1')} | {fmt('probe_top1')} |")
PY
fi
