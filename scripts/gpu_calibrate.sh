#!/usr/bin/env bash
# Memory-plan calibration grid (issue 13): scripts/gpu_trainer_probe.py on random models of two shapes x two
# micro-batch settings (the fit), then one held-out setting (the seed's: 1.5B shape, micro 8 / 16, 1,024 response
# tokens, gradient checkpointing). No devkit needed: the machine's own torch / transformers, pydantic from .whl/.
#   carry [".whl"]:  bash scripts/gpu_calibrate.sh [NAME...]   -> $OUT/cal_<NAME>.json (one probe JSON line each)
# then here:        python3 benchmarks/memory_calibration.py --probe cal_*.json --json calibration.json
# Each probe runs under its own timeout (PROBE_TIMEOUT, default 240 s); NAMEs: q05_m16 q05_m8 q15_m16 q15_m8 held_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
bare_env "$OUT"
declare -A GRID=(
  [q05_m16]="--like qwen2.5-0.5b --seqs 32 --len 512 --micro-train 16 --micro-forward 32"
  [q05_m8]="--like qwen2.5-0.5b --seqs 16 --len 512 --micro-train 8 --micro-forward 16"
  [q15_m16]="--like qwen2.5-1.5b --seqs 32 --len 512 --micro-train 16 --micro-forward 32"
  [q15_m8]="--like qwen2.5-1.5b --seqs 16 --len 512 --micro-train 8 --micro-forward 16"
  [held_out]="--like qwen2.5-1.5b --seqs 16 --len 1024 --micro-train 8 --micro-forward 16 --grad-ckpt"
)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(q05_m16 q05_m8 q15_m16 q15_m8 held_out)
for n in "${names[@]}"; do
  [ -n "${GRID[$n]:-}" ] || { echo "gpu_calibrate: unknown setting $n (known: ${!GRID[*]})"; exit 2; }
  t0=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${PROBE_TIMEOUT:-240}" python3 scripts/gpu_trainer_probe.py ${GRID[$n]} --cycles 2 --packed 0 \
    > "$OUT/cal_$n.json" 2> "$OUT/cal_$n.err"
  echo "$n rc=$? $(( $(date +%s) - t0 )) s: $(cut -c1-300 "$OUT/cal_$n.json")"
  tail -2 "$OUT/cal_$n.err"
done
