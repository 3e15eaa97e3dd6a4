#!/usr/bin/env bash
# The multi-GPU measurements of issue 15 item 4, one stage per device call on a multi-GPU kind (nvidia-h100-x2 /
# -x4 or nvidia-h200-x2 / -x4; name the kind and cards in the results). Each stage is a step_breakdown.py run
# (benchmarks/, same JSON as the 1-GPU trainer numbers) at the pinned global batch of 128 prompts x 8 samples,
# Qwen2.5-Coder-0.5B-Instruct (devkit with qwen05; carry ["gpu_data"] for the full GSM8K, else the bundled sample).
# Not run yet: no multi-GPU kind was lent when this was written.
# Usage (repo root):  bash scripts/gpu_scaleout.sh [--check] STAGE...
#   seed4      the seed's layout: 4 engines of TP 1 colocated with 4 trainer ranks on 4 GPUs (preset gsm8k)
#   scale1 / scale2 / scale4   samples/s on 1 -> 2 -> 4 GPUs, colocated (goal >= 1.8x at 2, >= 3.2x at 4)
#   split-sync / split-offstep  2 GPUs: 1 trainer GPU + 1 engine GPU, synchronous vs one-step-off (goal >= 1.3x)
#   tp2        one engine of TP 2 colocated with 2 trainer ranks (the model's heads must split in 2: Qwen 14/2)
#   --check: validate each stage's overrides with `rlctl check-config` on this machine (tests/unit/test_scaleout_script.py)
# Results: $OUT/<stage>.json (+ .log); copy them to docs/benchmarks/<kind>-<date>/ and the table to docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
QWEN="${RLCTL_MODEL:-/tmp/models/qwen2.5-coder-0.5b-instruct}"

# Each stage: "PRESET|GPUS|key=value ..." (the extra rlctl overrides of step_breakdown.py --set). Written only here.
declare -A STAGES=(
  [seed4]="gsm8k|4|trainer.placement.policy_num_gpus_per_node=4 generator.num_inference_engines=4"
  [scale1]="gsm8k-h200|1|trainer.placement.policy_num_gpus_per_node=1 generator.num_inference_engines=1"
  [scale2]="gsm8k-h200|2|trainer.placement.policy_num_gpus_per_node=2 generator.num_inference_engines=2"
  [scale4]="gsm8k-h200|4|trainer.placement.policy_num_gpus_per_node=4 generator.num_inference_engines=4"
  [split-sync]="gsm8k-h200|2|trainer.placement.colocate_all=false trainer.placement.policy_num_gpus_per_node=1 generator.num_inference_engines=1"
  [split-offstep]="gsm8k-h200|2|trainer.placement.colocate_all=false trainer.placement.policy_num_gpus_per_node=1 generator.num_inference_engines=1 trainer.algorithm.async_rollouts.one_step_off=true trainer.algorithm.off_policy_correction.tis_ratio_type=token"
  [tp2]="gsm8k-h200|2|trainer.placement.policy_num_gpus_per_node=2 generator.num_inference_engines=1 generator.inference_engine_tensor_parallel_size=2"
)
BATCH="trainer.train_batch_size=128 generator.n_samples_per_prompt=8"

CHECK=""
if [ "${1:-}" = "--check" ]; then CHECK=1; shift; fi
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_scaleout.sh [--check] STAGE... (${!STAGES[*]})" >&2; exit 2; }
rc=0
for stage in "$@"; do
  spec="${STAGES[$stage]:-}"
  [ -n "$spec" ] || { echo "gpu_scaleout: unknown stage '$stage' (${!STAGES[*]})" >&2; exit 2; }
  IFS='|' read -r preset gpus keys <<< "$spec"
  if [ -n "$CHECK" ]; then
    # shellcheck disable=SC2086  # keys and BATCH are lists of key=value words
    echo "== $stage"; python3 -m rlctl check-config --backend sglang --preset "$preset" trainer.policy.model.path="$QWEN" $BATCH $keys > /dev/null || rc=$?
    continue
  fi
  have=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  if [ "$have" -lt "$gpus" ]; then echo "gpu_scaleout: $stage needs $gpus GPUs, $have visible; skipped" | tee -a "$OUT/scaleout.log"; continue; fi
  sets=()
  for kv in $keys; do sets+=(--set "$kv"); done
  data=()
  [ -f /tmp/rlctl/data/gsm8k/train.parquet ] && data=(--data /tmp/rlctl/data/gsm8k)
  python3 benchmarks/step_breakdown.py --model "$QWEN" --preset "$preset" --prompts 128 --samples 8 --steps 4 \
    --skip-steps 1 --name "$stage" "${data[@]}" "${sets[@]}" --out "$OUT/$stage.json" > "$OUT/$stage.log" 2>&1 || rc=$?
  tail -5 "$OUT/$stage.log"
done
exit $rc
