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
  timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
fi
# the first of python3, python that imports torch (on the lent GPU machines python3 is the one with
# PyTorch, and a `python` there may be another interpreter); PYTHON=... overrides
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then py="$c"; break; fi
  done
fi
: "${py:?no python3 or python that imports torch here; set PYTHON=/path/to/python}"
# gpu_bench.py writes its tables after every row: a run the limit cuts short keeps what it measured
# (440 s + 5 s to die + nvidia-smi's 10 s at most + the probe's seconds: inside the 8 minutes)
timeout -k 5 440 "$py" "$here/gpu_bench.py" "$out" "$@" 2>&1 | tee "$out/gpu.log"
