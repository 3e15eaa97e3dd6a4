#!/usr/bin/env bash
# The algorithm comparison of issue 14 item 8, one device command at a time: preset gsm8k-h200 (today's preset,
# Qwen2.5-Coder-0.5B-Instruct, full GSM8K) with one SETTING, 10 minutes of training (trainer.max_train_time_s=600:
# the steps' timing/step without eval, log and checkpoint, summed across resumed calls), eval on the full test
# split every 10 steps. Each call trains until trainer.max_wall_time_s=WALL, then checkpoints: call again with the
# same arguments, on the same warm machine (the checkpoint lives in /tmp/rlctl/ckpts there), until the run says
# "(max_train_time_s)"; a call after that trains nothing. Runs through scripts/gpu_real_run.sh (same setup: devkit
# with qwen05, carry ["gpu_data"]); this call's metrics.jsonl / config.yaml / train.log / run_dir.tgz land in
# $OUT/cmp-SETTING-seedSEED/.
# Usage (repo root):  bash scripts/gpu_algo_compare.sh [--check] SETTING SEED WALL
#   SETTING: baseline | filter | gspo | tis | rollout-lp | best     SEED: trainer.seed     WALL: seconds for this call
#   --check: only validate the command line with `rlctl check-config` (CPU; tests/unit/test_algo_compare.py)
# docs/results/README.md ("How to run the algorithm comparison") lists the calls; benchmarks/algo_compare.py plots.
set -uo pipefail
cd "$(dirname "$0")/.."

# The settings: key=value overrides on preset gsm8k-h200, SkyRL key names. Written only here.
declare -A SETTINGS=(
  [baseline]=""
  [filter]="trainer.algorithm.dynamic_sampling.type=filter"
  # what presets/gsm8k-gspo.yaml sets (the test checks they agree)
  [gspo]="trainer.algorithm.policy_loss_type=gspo trainer.algorithm.eps_clip_low=3.0e-4 trainer.algorithm.eps_clip_high=4.0e-4 trainer.algorithm.loss_reduction=sequence_mean"
  # token-level truncated importance sampling with the default cap (token_tis_ratio_clip_high=2.0)
  [tis]="trainer.algorithm.off_policy_correction.tis_ratio_type=token"
  # not in the issue's list: the engine's log-probs as pi_old (slime's --use-rollout-logprobs), no old-log-prob
  # forward, so more steps in the same minutes; cannot be combined with tis (check-config refuses it)
  [rollout-lp]="trainer.algorithm.use_rollout_logprobs=true"
)
# The winner: the settings to combine, space-separated (e.g. "filter tis"). Fill after the first runs.
BEST="${ALGO_BEST:-}"
COMMON="trainer.max_train_time_s=600 trainer.eval_interval=10"

CHECK=""
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
if [ $# -ne 3 ]; then
  echo "usage: bash scripts/gpu_algo_compare.sh [--check] SETTING SEED WALL (SETTING: baseline filter gspo tis rollout-lp best)" >&2
  exit 2
fi
SETTING=$1 SEED=$2 WALL=$3
if [ "$SETTING" = best ]; then
  if [ -z "$BEST" ]; then
    echo "gpu_algo_compare: BEST is empty: set BEST in scripts/gpu_algo_compare.sh (or ALGO_BEST) to the winning settings, e.g. \"filter tis\"" >&2
    exit 2
  fi
  KEYS=""
  for s in $BEST; do
    if [ -z "${SETTINGS[$s]+x}" ] || [ "$s" = baseline ]; then
      echo "gpu_algo_compare: BEST names '$s'; use filter gspo tis rollout-lp" >&2; exit 2
    fi
    KEYS="$KEYS ${SETTINGS[$s]}"
  done
elif [ -n "${SETTINGS[$SETTING]+x}" ]; then
  KEYS="${SETTINGS[$SETTING]}"
else
  echo "gpu_algo_compare: unknown SETTING '$SETTING'; use baseline filter gspo tis rollout-lp best" >&2
  exit 2
fi
RUN_NAME="cmp-$SETTING-seed$SEED"
# shellcheck disable=SC2086  # COMMON and KEYS are lists of key=value words
if [ -n "$CHECK" ]; then
  RLCTL_CHECK=1 bash scripts/gpu_real_run.sh "$WALL" $COMMON $KEYS trainer.seed="$SEED" trainer.run_name="$RUN_NAME"
  exit $?
fi
OUT="${OUT:-$PWD/gpu_out}/$RUN_NAME"; mkdir -p "$OUT"
echo "== gpu_algo_compare $RUN_NAME wall=${WALL}s $(date -u +%FT%TZ) keys:$KEYS" | tee -a "$OUT/train.log"
# shellcheck disable=SC2086
OUT="$OUT" bash scripts/gpu_real_run.sh "$WALL" $COMMON $KEYS trainer.seed="$SEED" trainer.run_name="$RUN_NAME"
