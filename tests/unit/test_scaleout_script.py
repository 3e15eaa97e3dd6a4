"""scripts/gpu_scaleout.sh (issue 15 item 4, runs on a multi-GPU kind): every stage's overrides validate with
``rlctl check-config`` here, before a multi-GPU machine is spent on them; an unknown stage is refused.

Test: ``pytest -q tests/unit/test_scaleout_script.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["seed4", "scale1", "scale2", "scale4", "split-sync", "split-offstep", "tp2"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_scaleout.sh"), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def test_every_stage_validates_with_check_config(tmp_path):
    p = _run("--check", *STAGES)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("== ")] == [f"== {s}" for s in STAGES]
    assert "invalid configuration" not in p.stderr
    # the TP stage reaches the tensor-parallel rules (and their not-run-on-GPUs note)
    assert "tensor-parallel SGLang engines are coded and tested on CPU with fakes" in p.stderr


def test_unknown_stage_is_refused():
    p = _run("--check", "scale3")
    assert p.returncode == 2
    assert "gpu_scaleout: unknown stage 'scale3'" in p.stderr
