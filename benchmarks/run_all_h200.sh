#!/usr/bin/env bash
# The benchmarks of docs/benchmarks.md on the lent H200, one stage per device call (each well under the
# 10-minute limit of a call). Results accumulate in /tmp/bench on the device (kept while the machine
# stays warm between calls); every call ends by packing ALL of /tmp/bench into $OUT/bench_results.tgz,
# plus this stage's JSON and log, so the latest call's 3 files always hold everything measured so far.
#
# Before: the devkit with qwen05 (calls 1-13 of ../shared/devkit/README.md, back to back); GSM8K jsonl in
# the ignored gpu_data/gsm8k (cp ../shared/data/gsm8k/*.jsonl gpu_data/gsm8k/); for the trl stage the
# wheels from `bash benchmarks/fetch_trl_wheels.sh` in the ignored .whl/. Then, back to back, one call each,
# every call with carry ["gpu_data", ".whl"]:
#   bash benchmarks/run_all_h200.sh rollout     # rollout_overhead.py, Qwen2.5-Coder-0.5B          (~5 min)
#   bash benchmarks/run_all_h200.sh step-qwen   # step_breakdown.py, Qwen2.5-Coder-0.5B, 6 steps   (~4 min)
#   bash benchmarks/run_all_h200.sh trl         # trl_side_by_side.py vs step-qwen's JSON           (~4-6 min)
#   bash benchmarks/run_all_h200.sh step-smol   # step_breakdown.py, SmolLM2-135M, 6 steps          (~3 min)
#   bash benchmarks/run_all_h200.sh scaling     # scaling.py, 2 GPUs vs step-qwen's JSON (nvidia-h200-x2 only)
#   bash benchmarks/run_all_h200.sh profile     # trainer_profile.py, the train phase profiled, PROFILE_VARIANTS (default baseline, ~3 min each)
#   bash benchmarks/run_all_h200.sh micro       # trainer_profile.py, baseline vs 32 / 64 per micro-batch, timed only (~4 min)
# Several stages in one call run in order (mind the 10 minutes): bash benchmarks/run_all_h200.sh step-qwen trl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
RES="${BENCH_DIR:-/tmp/bench}"; mkdir -p "$RES/logs"
DK_ENV="${DK_ENV:-/tmp/dk/env.sh}"
ONE_GPU="${BENCH_GPU:-0}"   # the single-GPU stages use this GPU (also on a 2-GPU machine), all on the same one
QWEN=/tmp/models/qwen2.5-coder-0.5b-instruct
SMOL=/tmp/models/smollm2-135m-instruct
DATA="${BENCH_DATA:-/tmp/rlctl/data/gsm8k}"   # prepared once per machine, shared with scripts/gpu_real_run.sh
[ $# -ge 1 ] || { echo "usage: $0 STAGE... (rollout step-qwen trl step-smol scaling profile micro)" >&2; exit 2; }

if [ ! -f "$DK_ENV" ]; then
  echo "run_all_h200: /tmp/dk/env.sh missing: install the devkit first (calls 1-13, bash /tmp/dk/c1/install.sh /tmp/dk)" | tee "$OUT/stage.log"
  exit 2
fi
# shellcheck disable=SC1091
source "$DK_ENV"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1

pack() {  # everything so far -> $OUT (3 files: the archive, this call's log, the last stage's JSON)
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv >> "$RES/logs/nvidia_smi.txt" 2>&1
  cp "$RES/logs/call_$CALL.log" "$OUT/stage.log" 2>/dev/null
  [ -n "${LAST_JSON:-}" ] && [ -f "$LAST_JSON" ] && cp "$LAST_JSON" "$OUT/"
  # (checkpoints and TensorBoard files under $RES/work are left out: a killed run can leave GBs there)
  tar czf "$OUT/bench_results.tgz" --exclude=ckpts --exclude=tensorboard -C "$(dirname "$RES")" "$(basename "$RES")" 2>/dev/null
}

main() {
echo "run_all_h200: stages $* at $(date -u +%FT%TZ); python $(command -v python3)"
nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv

# data: the full GSM8K once per machine (falls back to the bundled 64-row sample with a warning)
if [ ! -f "$DATA/train.parquet" ]; then
  if [ -f gpu_data/gsm8k/train.jsonl ]; then
    python3 -m rlctl prepare-data gsm8k --source-dir gpu_data/gsm8k --output-dir "$DATA" || exit 3
  else
    echo "run_all_h200: WARNING gpu_data/gsm8k missing (carry it): the scripts use the 64-row sample"
    DATA="$PWD/rlctl/data/gsm8k_sample"   # --data is passed explicitly, so point it at the sample
  fi
fi

trl_env() {  # TRL 1.16.0 + datasets into /tmp/site_trl, ahead of the devkit's /tmp/site (transformers 5.12.1)
  if [ ! -d /tmp/site_trl/trl ]; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "run_all_h200: .whl/ missing: run benchmarks/fetch_trl_wheels.sh here, carry .whl"; return 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_trl .whl/*.whl || return 1
  fi
  export PYTHONPATH="/tmp/site_trl:$PYTHONPATH"
  python3 -c "import trl, datasets, transformers, accelerate, pyarrow, fsspec; print('trl', trl.__version__, 'datasets', datasets.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__)"
}

rc=0; LAST_JSON=
for stage in "$@"; do
  t0=$(date +%s)
  echo "==== stage $stage"
  case "$stage" in
    rollout)
      LAST_JSON=$RES/rollout_qwen05.json
      CUDA_VISIBLE_DEVICES=$ONE_GPU timeout 570 python3 benchmarks/rollout_overhead.py --model "$QWEN" --data "$DATA" --repeats 3 --out "$LAST_JSON"; r=$? ;;
    step-qwen)
      LAST_JSON=$RES/step_qwen05.json
      CUDA_VISIBLE_DEVICES=$ONE_GPU timeout 570 python3 benchmarks/step_breakdown.py --model "$QWEN" --data "$DATA" --steps 6 --timeout 480 \
        --workdir "$RES/work" --name step_qwen05 --out "$LAST_JSON"; r=$? ;;
    step-smol)
      LAST_JSON=$RES/step_smollm2.json
      CUDA_VISIBLE_DEVICES=$ONE_GPU timeout 570 python3 benchmarks/step_breakdown.py --model "$SMOL" --data "$DATA" --steps 6 --timeout 480 \
        --workdir "$RES/work" --name step_smollm2 --out "$LAST_JSON"; r=$? ;;
    trl)
      LAST_JSON=$RES/trl_qwen05.json
      [ -f "$RES/step_qwen05.json" ] || echo "run_all_h200: WARNING no step_qwen05.json yet: run step-qwen first (back to back)"
      ( trl_env && CUDA_VISIBLE_DEVICES=$ONE_GPU timeout 570 python3 benchmarks/trl_side_by_side.py --model "$QWEN" --data "$DATA" --generations 3 --max-wall-s 420 \
          --rlctl-json "$RES/step_qwen05.json" --out "$LAST_JSON" ); r=$? ;;
    profile)
      LAST_JSON=$RES/trainer_profile_qwen05.json
      # ~3 min per profiled variant: one or two per call (PROFILE_VARIANTS, default baseline)
      CUDA_VISIBLE_DEVICES=$ONE_GPU timeout 570 python3 benchmarks/trainer_profile.py --model "$QWEN" \
        --variants "${PROFILE_VARIANTS:-baseline}" --out "$LAST_JSON"; r=$? ;;
    micro)
      LAST_JSON=$RES/trainer_micro_qwen05.json
      CUDA_VISIBLE_DEVICES=$ONE_GPU timeout 570 python3 benchmarks/trainer_profile.py --model "$QWEN" --no-profile \
        --variants baseline,micro32,micro64 --out "$LAST_JSON"; r=$? ;;
    scaling)
      LAST_JSON=$RES/scaling_qwen05.json
      # without the step-qwen JSON (e.g. a fresh 2-GPU machine) scaling.py makes the 1-GPU run too: two runs
      # must fit in the 570 s, so each gets 270 s (trainer.max_wall_time_s = 120 s) instead of 480 s
      if [ -f "$RES/step_qwen05.json" ]; then base=(--baseline-json "$RES/step_qwen05.json" --timeout 480); else base=(--timeout 270); fi
      timeout 570 python3 benchmarks/scaling.py --model "$QWEN" --data "$DATA" --steps 5 --workdir "$RES/work" "${base[@]}" --out "$LAST_JSON"; r=$? ;;
    *) echo "run_all_h200: unknown stage $stage"; r=2 ;;
  esac
  echo "==== stage $stage: rc=$r in $(( $(date +%s) - t0 )) s"
  [ "$r" -ne 0 ] && rc=$r
  # a stage killed by timeout leaves Ray (and SGLang) processes holding GPU memory: stop this job's Ray
  python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
  echo "${LAST_JSON:-}" > "$RES/logs/last_json"
done
return $rc
}

CALL=$(date +%H%M%S)
main "$@" 2>&1 | tee -a "$RES/logs/call_$CALL.log"
rc=${PIPESTATUS[0]}
LAST_JSON=$(cat "$RES/logs/last_json" 2>/dev/null)
pack
exit "$rc"
