#!/usr/bin/env bash
# Issue 11's GPU checks in one call, for a machine with a CUDA GPU and no internet:
#   bash benchmarks/gpu_check.sh            (from the repository root; logs go to $OUT if set)
# 1. the CUDA tests (pytest -m cuda), 2. make bench-gpu at a size that fits about 8 minutes.
# Runs with PYTHONPATH=$PWD and whatever python has torch (no install). GPU_BENCH_IMAGES and
# GPU_BENCH_ARGS adjust the benchmark.
set -u
cd "$(dirname "$0")/.."
LOGS="${OUT:-$PWD/gpu_check_logs}"
mkdir -p "$LOGS"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  echo "cores: $(nproc)"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOGS/env.txt"

echo "== pytest -m cuda" | tee "$LOGS/pytest_cuda.txt"
timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider -o addopts="" tests/ 2>&1 \
  | tail -40 | tee -a "$LOGS/pytest_cuda.txt"
test_rc=${PIPESTATUS[0]}

echo "== bench-gpu" | tee "$LOGS/bench_gpu.txt"
timeout 330 "$PY" benchmarks/extract_gpu_bench.py --images "${GPU_BENCH_IMAGES:-10000}" \
  --work-dir /tmp/trex-gpu-bench --md "$LOGS/benchmarks_gpu.md" --json "$LOGS/bench_gpu.json" \
  ${GPU_BENCH_ARGS:---compile} 2>&1 | tee -a "$LOGS/bench_gpu.txt"
bench_rc=${PIPESTATUS[0]}
echo "pytest -m cuda rc=$test_rc, bench-gpu rc=$bench_rc" | tee "$LOGS/summary.txt"
[ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
