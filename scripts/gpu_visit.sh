#!/usr/bin/env bash
# One GPU visit of the trainer-speed work, in stages (each stage well under a device call's 10 minutes; several
# stages in one call run in order). After the devkit with qwen05 (calls 1-13 of ../shared/devkit/README.md), every
# call with carry ["gpu_data", "gpu_base"] (gpu_data/gsm8k: the GSM8K jsonl; gpu_base: `git archive` of the baseline
# commit with this checkout's benchmarks/_common.py and step_breakdown.py copied in):
#   bash scripts/gpu_visit.sh check       # (STAGE_TIMEOUT=s per stage, default 540) GPU tests: colocated 2-step, checkpoint every step, trainer offload (~6 min)
#   bash scripts/gpu_visit.sh check-rest  # the other GPU tests (engine API, memory cycles, split placement, TP)
#   bash scripts/gpu_visit.sh step-new    # step_breakdown.py on this checkout, Qwen2.5-Coder-0.5B, 32 x 8 (~4 min)
#   bash scripts/gpu_visit.sh step-base   # the same on gpu_base (the baseline), in the same visit (~4 min)
#   bash scripts/gpu_visit.sh step-pack   # step-new with trainer.remove_microbatch_padding=true (~4 min)
#   bash scripts/gpu_visit.sh step-budget # step-new with trainer.max_tokens_per_microbatch=8192 (bounded activations: the <= 30 GB peak)
#   bash scripts/gpu_visit.sh real 330    # scripts/gpu_real_run.sh 330: the real run (~8 min)
#   bash scripts/gpu_visit.sh real-rates  # after `real` in the same call: step_breakdown.py --from-metrics on it, with the bare rates (~1 min)
#   bash scripts/gpu_visit.sh probe       # scripts/gpu_trainer_probe.py, Qwen2.5-0.5B shape, with the bare rates (~3 min)
#   bash scripts/gpu_visit.sh profile     # benchmarks/trainer_profile.py on $QWEN, the real run's 32 x 8 (no Ray, no engine): where the train step's seconds go
#   bash scripts/gpu_visit.sh attn        # tests/gpu/test_attention_nan.py (the cuDNN attention NaN, no model) and
#                                         # test_trainer_gradient.py (the trainer's gradient vs fp32, $QWEN)
#   bash scripts/gpu_visit.sh attn-grad   # benchmarks/attention_grad_check.py: each attention path's gradient vs fp32 math, $QWEN on GSM8K text (~2 min)
# Each stage writes into /tmp/visit/<stage> and packs it into $OUT/<stage>.tgz (the device returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT="timeout ${STAGE_TIMEOUT:-540}"   # seconds per stage (a device call runs at most 600)
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
DATA=/tmp/rlctl/data/gsm8k
QWEN="${RLCTL_MODEL:-/tmp/models/qwen2.5-coder-0.5b-instruct}"   # RLCTL_MODEL: another model (e.g. the kit's SmolLM2)
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
gpu_env gpu_visit "$OUT/visit.log"
export TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/visit.log"
if [ ! -f $DATA/validation.parquet ] && [ -f gpu_data/gsm8k/train.jsonl ]; then
  python3 -m rlctl prepare-data gsm8k --source-dir gpu_data/gsm8k --output-dir $DATA >> "$OUT/visit.log" 2>&1
fi
step() {  # $1 repo root, $2 name, $3 folder: step_breakdown.py, 32 x 8, preset gsm8k-h200 (the real-run setting)
  ( cd "$1" && PYTHONPATH="$1:$PYTHONPATH" $LIMIT python3 benchmarks/step_breakdown.py --model $QWEN --data $DATA \
      --prompts 32 --samples 8 --steps "${STEPS:-6}" --skip-steps 1 --name "$2" --workdir /tmp/rlctl_bench \
      --out "$3/$2.json" ${EXTRA:-} ) > "$3/$2.log" 2>&1
  tail -32 "$3/$2.log"
  cp "/tmp/rlctl_bench/logs/$2.log" "$3/$2.train.log" 2>/dev/null
  cp /tmp/rlctl_bench/runs/*/"$2"/metrics.jsonl "$3/$2.metrics.jsonl" 2>/dev/null
  cp /tmp/rlctl_bench/runs/*/"$2"/config.yaml "$3/$2.config.yaml" 2>/dev/null
  cp -r /tmp/rlctl_bench/runs/*/"$2"/nonfinite "$3/$2.nonfinite" 2>/dev/null   # a non-finite step's diagnosis
}
while [ $# -gt 0 ]; do
  stage=$1; shift
  echo "== $stage $(date -u +%FT%TZ)" | tee -a "$OUT/visit.log"
  W=/tmp/visit/$stage; mkdir -p "$W"
  # each stage's command under its own limit ($LIMIT), so that a slow stage is still packed below: an outer
  # `timeout` around this script would stop it before the tar and lose the stage's files
  case $stage in
    check) OUT="$W" $LIMIT bash scripts/gpu_check.sh -k "colocated or offload" --maxfail=20 > "$W/check.log" 2>&1
           tail -25 "$W/check.log" ;;
    check-rest) OUT="$W" $LIMIT bash scripts/gpu_check.sh -k "not (colocated or offload)" --maxfail=20 > "$W/check.log" 2>&1
           tail -25 "$W/check.log" ;;
    step-new) step "$PWD" step_new "$W" ;;
    step-base) step "$PWD/gpu_base" step_base "$W" ;;
    step-pack) EXTRA="--set trainer.remove_microbatch_padding=true" step "$PWD" step_pack "$W" ;;
    step-budget) EXTRA="--set trainer.max_tokens_per_microbatch=8192" step "$PWD" step_budget "$W" ;;
    real-rates) $LIMIT python3 benchmarks/step_breakdown.py --from-metrics /tmp/visit/real/metrics.jsonl --bare \
                  --model $QWEN --out "$W/real_rates.json" > "$W/real_rates.log" 2>&1; tail -30 "$W/real_rates.log" ;;
    probe) $LIMIT python3 scripts/gpu_trainer_probe.py --like qwen2.5-0.5b --seqs 64 --len 512 --micro-train 16 \
             --micro-forward 32 --bare > "$W/probe.json" 2> "$W/probe.err"; cut -c1-600 "$W/probe.json" ;;
    profile) $LIMIT python3 benchmarks/trainer_profile.py --model $QWEN --prompts 32 --mini-prompts 16 \
               --variants "${PROFILE_VARIANTS:-baseline,offload,micro32}" --out "$W/trainer_profile.json" > "$W/profile.log" 2>&1
             tail -20 "$W/profile.log" ;;
    attn) RLCTL_METRICS_OUT="$W/attn_metrics.json" RLCTL_TEST_MODEL=$QWEN $LIMIT python3 -m pytest -q -p no:cacheprovider \
            tests/gpu/test_attention_nan.py tests/gpu/test_trainer_gradient.py > "$W/attn.log" 2>&1; tail -5 "$W/attn.log" ;;
    attn-grad) $LIMIT python3 benchmarks/attention_grad_check.py --model $QWEN --data gpu_data/gsm8k/train.jsonl \
                 --out "$W/attention_grad.json" > "$W/attn_grad.log" 2>&1; tail -8 "$W/attn_grad.log" | cut -c1-900 ;;
    real) wall=${1:-330}; shift || true; OUT="$W" $LIMIT bash scripts/gpu_real_run.sh "$wall" > "$W/real.log" 2>&1
          tail -20 "$W/real.log" ;;
    *) echo "gpu_visit: unknown stage $stage" | tee -a "$OUT/visit.log"; exit 2 ;;
  esac
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader >> "$W/nvidia_smi.txt" 2>&1
  tar czf "$OUT/$stage.tgz" -C /tmp/visit "$stage"
done
