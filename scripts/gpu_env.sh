# Sourced by scripts/gpu_check.sh and scripts/gpu_real_run.sh (from the repository root): the Python
# environment for SGLang on the GPU machine (gpu_env), and by the trainer probes (gpu_probe_pair.sh,
# gpu_calibrate.sh) for a bare GPU machine without the devkit (bare_env). With the offline kit installed (../shared/devkit, calls 1-4
# or 1-13), its /tmp/dk/env.sh (or $DK_ENV); else the current python3, which must import sglang
# (pip install -e ".[sglang,dev]"). Usage: gpu_env SCRIPT_NAME LOG_FILE -- exits 2 naming the fix.
gpu_env() {
  local dk="${DK_ENV:-/tmp/dk/env.sh}"
  if [ -f "$dk" ]; then
    # shellcheck disable=SC1090
    source "$dk"
  elif ! python3 -c "import sglang" 2>/dev/null; then
    echo "$1: no SGLang here: install the devkit (bash /tmp/dk/c1/install.sh /tmp/dk) or pip install -e \".[sglang,dev]\"" | tee -a "$2"
    exit 2
  fi
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # rlctl from this checkout, no install needed
  export PYTHONPATH="$repo:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
}

# A bare GPU machine (its own torch / transformers, no devkit): pydantic from .whl/ (the kit's wheels, carried) when
# it is not installed; records the card and the commit. Usage: bare_env OUT_DIR (OUT_DIR exists).
bare_env() {
  if ! python3 -c "import pydantic" 2>/dev/null; then
    pip install -q --no-index --no-deps --target /tmp/site_probe .whl/*.whl > "$1/pip.log" 2>&1
    export PYTHONPATH="/tmp/site_probe${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export TQDM_DISABLE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$1/nvidia_smi.txt"
  git log --oneline -1 2>/dev/null | tee "$1/commit.txt"
}
