#!/usr/bin/env bash
# Run the GPU tests (pytest -m gpu) in one command, e.g. on the H200 machine after the devkit install
# (calls 1-4 of ../shared/devkit/README.md), or on any CUDA machine with pip install -e ".[sglang,dev]".
# From the repository root:  bash scripts/gpu_check.sh [extra pytest args, e.g. -k split]
# Test model: $RLCTL_TEST_MODEL (default /tmp/models/smollm2-135m-instruct, the kit's SmolLM2 folder).
# Writes into $OUT (or ./gpu_out): gpu_check.log, gpu_junit.xml, gpu_metrics.json, nvidia_smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
gpu_env gpu_check "$OUT/gpu_check.log"   # rlctl from this checkout (PYTHONPATH), no install needed
export RLCTL_TEST_MODEL="${RLCTL_TEST_MODEL:-/tmp/models/smollm2-135m-instruct}"
export RLCTL_METRICS_OUT="$OUT/gpu_metrics.json"
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1 || true
echo "gpu_check: model=$RLCTL_TEST_MODEL python=$(command -v python3)" | tee "$OUT/gpu_check.log"
start=$(date +%s)
python3 -m pytest -m gpu tests/gpu -x -q -p no:cacheprovider -o addopts=-ra --timeout=480 \
  --junitxml="$OUT/gpu_junit.xml" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: pytest rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/gpu_check.log"
[ -f "$RLCTL_METRICS_OUT" ] && cat "$RLCTL_METRICS_OUT"
exit "$rc"
