"""`rlctl --help` and `rlctl check-config` must not import torch, ray or sglang (checked in a fresh
subprocess through sys.modules), and `python -m rlctl` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "sglang", "transformers", "vllm", "datasets", "pyarrow")

PROBE = """
import json, os, sys
from rlctl.cli import app
sys.argv = ["rlctl", *json.loads(os.environ["PROBE_ARGS"])]
code = 0
try:
    app()
except SystemExit as e:
    code = e.code or 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(os.environ["PROBE_HEAVY"])))
print("HEAVY=" + json.dumps(heavy), file=sys.stderr)
print("CODE=" + str(code), file=sys.stderr)
"""


def probe(args: list[str]) -> tuple[list[str], int, str]:
    env = {**os.environ, "PROBE_ARGS": json.dumps(args), "PROBE_HEAVY": json.dumps(HEAVY)}
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    lines = res.stderr.splitlines()
    assert any(l.startswith("HEAVY=") for l in lines), res.stdout + res.stderr
    heavy = json.loads([l for l in lines if l.startswith("HEAVY=")][-1][6:])
    code = int([l for l in lines if l.startswith("CODE=")][-1][5:])
    return heavy, code, res.stdout + res.stderr


@pytest.mark.parametrize("args", [
    ["--help"],
    ["check-config", "--help"],
    ["check-config", "--backend", "sglang", "--preset", "gsm8k"],
    ["check-config", "--preset", "gsm8k-cpu", "--format", "yaml"],
    ["check-config", "generator.async_engine=true"],  # the error path too
    ["presets"],
], ids=lambda a: " ".join(a))
def test_no_heavy_imports(args):
    heavy, code, out = probe(args)
    assert heavy == [], f"{args} imported {heavy}"
    assert code in (0, 2), out


def test_python_dash_m():
    res = subprocess.run([sys.executable, "-m", "rlctl", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "check-config" in res.stdout and "prepare-data" in res.stdout


def test_console_script_error_exit_code_and_no_traceback():
    res = subprocess.run([sys.executable, "-m", "rlctl", "check-config", "generator.async_engine=true", "trainer.seed=x"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    assert "set generator.async_engine=false" in res.stderr
    assert "trainer.seed=x: expected an integer" in res.stderr
