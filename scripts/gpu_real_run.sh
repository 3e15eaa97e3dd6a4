#!/usr/bin/env bash
# The real GRPO run on one H200 (issue 4): SGLang rollouts + FSDP2 policy colocated, Qwen2.5-Coder-0.5B-Instruct,
# full GSM8K. Resumable: each call trains until trainer.max_wall_time_s, then checkpoints; call again to go on.
# Needs the devkit installed with qwen05 (calls 1-13 of ../shared/devkit/README.md; or SGLang installed and
# RLCTL_MODEL=<Qwen2.5-Coder-0.5B-Instruct folder>) and the GSM8K jsonl in gpu_data/gsm8k: that folder is
# git-ignored, so name it in the device call's carry (["gpu_data"]).
# Usage (repo root, on the device):  bash scripts/gpu_real_run.sh WALL_SECONDS [extra key=value ...]
# RLCTL_CHECK=1: only validate this exact command line with `rlctl check-config -f yaml` (CPU, no SGLang, no data;
# tests/unit/test_algo_compare.py) and exit with its status.
set -uo pipefail
cd "$(dirname "$0")/.."
WALL="${1:-420}"; shift || true
MODEL="${RLCTL_MODEL:-/tmp/models/qwen2.5-coder-0.5b-instruct}"
ROOT=/tmp/rlctl
ARGS=(--backend sglang --preset gsm8k-h200 trainer.policy.model.path="$MODEL"
  data.train_data="['$ROOT/data/gsm8k/train.parquet']" data.val_data="['$ROOT/data/gsm8k/validation.parquet']"
  trainer.log_path=$ROOT/runs trainer.ckpt_path=$ROOT/ckpts trainer.max_wall_time_s="$WALL" "$@")
if [ -n "${RLCTL_CHECK:-}" ]; then
  python3 -m rlctl check-config -f yaml "${ARGS[@]}"; exit $?
fi
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
gpu_env gpu_real_run "$OUT/train.log"
export TQDM_DISABLE=1
if [ ! -f $ROOT/data/gsm8k/validation.parquet ]; then
  [ -f gpu_data/gsm8k/train.jsonl ] && [ -f gpu_data/gsm8k/test.jsonl ] || { echo "gpu_real_run: gpu_data/gsm8k/{train,test}.jsonl missing: carry gpu_data" | tee -a "$OUT/train.log"; exit 3; }
  python3 -m rlctl prepare-data gsm8k --source-dir gpu_data/gsm8k --output-dir $ROOT/data/gsm8k || exit 3
fi
python3 -m rlctl train "${ARGS[@]}" 2>&1 | tee -a "$OUT/train.log"
rc=${PIPESTATUS[0]}
RUN=$(ls -td $ROOT/runs/*/* | head -1)   # this call's run folder: the one written last
cp "$RUN/metrics.jsonl" "$RUN/config.yaml" "$OUT/" 2>/dev/null
tar czf "$OUT/run_dir.tgz" -C "$RUN" --exclude=tensorboard . 2>/dev/null
nvidia-smi --query-gpu=memory.used,memory.total --format=csv >> "$OUT/train.log" 2>&1
exit $rc
