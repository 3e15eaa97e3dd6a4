#!/usr/bin/env bash
# The trainer probe on this checkout and on gpu_prev/ (`git archive` of an earlier commit), same call, same card,
# on the machine's own torch/transformers; pydantic from .whl/ (the kit's pydantic wheels) when not installed.
#   carry [".whl", "gpu_prev"]:  bash scripts/gpu_probe_pair.sh   -> $OUT/probe_new.json, $OUT/probe_prev.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
bare_env "$OUT"
ARGS="--like qwen2.5-0.5b --seqs 64 --len 512 --micro-train 16 --micro-forward 32"
python3 scripts/gpu_trainer_probe.py $ARGS --bare --cycles 4 --packed 2 > "$OUT/probe_new.json" 2> "$OUT/probe_new.err"
tail -3 "$OUT/probe_new.err"; cut -c1-400 "$OUT/probe_new.json"
if [ -d gpu_prev ]; then
  (cd gpu_prev && python3 scripts/gpu_trainer_probe.py $ARGS --cycles 3 --packed 0 > "$OUT/probe_prev.json" 2> "$OUT/probe_prev.err")
  tail -3 "$OUT/probe_prev.err"; cut -c1-400 "$OUT/probe_prev.json"
fi
