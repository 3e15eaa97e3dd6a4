#!/usr/bin/env bash
# Run the GPU tests on the H200 machine, after the devkit install (calls 1-4 of ../shared/devkit/README.md).
# From the repository root:  bash scripts/gpu_check.sh [extra pytest args]
# Writes into $OUT (or ./gpu_out): gpu_check.log, gpu_junit.xml, gpu_metrics.json, nvidia_smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
if [ ! -f /tmp/dk/env.sh ]; then
  echo "gpu_check: /tmp/dk/env.sh missing: install the devkit first (bash /tmp/dk/c1/install.sh /tmp/dk)" | tee "$OUT/gpu_check.log"
  exit 2
fi
# shellcheck disable=SC1091
source /tmp/dk/env.sh
export PYTHONPATH="$PWD:${PYTHONPATH:-}"   # rlctl from this checkout, no install needed
export RLCTL_TEST_MODEL="${RLCTL_TEST_MODEL:-/tmp/models/smollm2-135m-instruct}"
export RLCTL_METRICS_OUT="$OUT/gpu_metrics.json"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1 || true
echo "gpu_check: model=$RLCTL_TEST_MODEL python=$(command -v python3)" | tee "$OUT/gpu_check.log"
start=$(date +%s)
python3 -m pytest -m gpu tests/gpu -x -q -p no:cacheprovider -o addopts=-ra --timeout=480 \
  --junitxml="$OUT/gpu_junit.xml" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check: pytest rc=$rc in $(( $(date +%s) - start ))s" | tee -a "$OUT/gpu_check.log"
[ -f "$RLCTL_METRICS_OUT" ] && cat "$RLCTL_METRICS_OUT"
exit "$rc"
