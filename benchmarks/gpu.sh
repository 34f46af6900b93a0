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
timeout 480 python "$here/gpu_bench.py" "$out" "$@" 2>&1 | tee "$out/gpu.log"
