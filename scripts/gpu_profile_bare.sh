#!/usr/bin/env bash
# The trainer profile on a bare GPU machine (no devkit: its own torch / transformers, pydantic from .whl/): a
# random-weight model of Qwen2.5-0.5B's shape (benchmarks/random_model.py; speed does not depend on the weights),
# benchmarks/trainer_profile.py at the real run's 32 x 8 (mini-batch 16 prompts, micro 16), then the bare bf16
# rates of the same model (benchmarks/_common.py bare_model_rates) for the ratios. One device call, carry [".whl"]:
#   bash scripts/gpu_profile_bare.sh   # PROFILE_VARIANTS=... (default baseline,offload,offload+expandable,micro32); PROFILE_ARGS=--no-profile: timed only
# Writes $OUT/trainer_profile.json, profile.log, bare.json, nvidia_smi.txt, commit.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
bare_env "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
M=/tmp/models/qwen2.5-0.5b-random
[ -f $M/model.safetensors ] || python3 benchmarks/random_model.py --like qwen2.5-0.5b --out $M > "$OUT/model.log" 2>&1
timeout "${PROFILE_TIMEOUT:-420}" python3 benchmarks/trainer_profile.py --model $M --prompts 32 --mini-prompts 16 \
  --variants "${PROFILE_VARIANTS:-baseline,offload,offload+expandable,micro32}" ${PROFILE_ARGS:-} --out "$OUT/trainer_profile.json" \
  > "$OUT/profile.log" 2>&1
tail -45 "$OUT/profile.log"
timeout "${BARE_TIMEOUT:-90}" python3 -c "import json, sys; sys.path.insert(0, 'benchmarks'); import _common as C; \
print(json.dumps(C.bare_model_rates('$M', 420, 16, 32)))" > "$OUT/bare.json" 2>> "$OUT/profile.log"
cat "$OUT/bare.json"
