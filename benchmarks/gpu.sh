#!/usr/bin/env bash
# Every GPU measurement in one command (budget: under 8 minutes on one H200).
#   benchmarks/gpu.sh OUT_DIR [--dry-run]
# Writes OUT_DIR/gpu_speed.md, OUT_DIR/gpu_packing.md, OUT_DIR/gpu.json and OUT_DIR/gpu.log.
# --dry-run runs the same script on the CPU with tiny shapes (used by the tests).
set -euo pipefail
out="${1:?usage: benchmarks/gpu.sh OUT_DIR [--dry-run]}"
shift
mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"
export WANDB_MODE=disabled
if [ "${1:-}" != "--dry-run" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
fi
# python3 where `python` is not there (the lent GPU machines have python3 only); PYTHON=... overrides
py="${PYTHON:-$(command -v python || command -v python3)}"
# gpu_bench.py writes its tables after every row: a run the limit cuts short keeps what it measured
timeout 480 "$py" "$here/gpu_bench.py" "$out" "$@" 2>&1 | tee "$out/gpu.log"
