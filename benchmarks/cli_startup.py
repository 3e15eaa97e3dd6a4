"""Wall time of the CLI's light paths next to `import torch` (median of 5 subprocess runs each).

    python benchmarks/cli_startup.py [--runs 5]

`rlctl --help` and `rlctl check-config` must not import torch/ray/sglang, so they should take a
fraction of the torch import (tests/unit/test_cli_imports.py checks the imports themselves).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = [
    ("python -c pass (interpreter start)", [sys.executable, "-c", "pass"]),
    ("rlctl --help", [sys.executable, "-m", "rlctl", "--help"]),
    ("rlctl check-config --backend sglang --preset gsm8k",
     [sys.executable, "-m", "rlctl", "check-config", "--backend", "sglang", "--preset", "gsm8k"]),
    ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
]


def median_wall(cmd: list[str], runs: int) -> tuple[float, int]:
    times, rc = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"median wall time of {args.runs} runs (python {sys.version.split()[0]})")
    for name, cmd in CASES:
        t, rc = median_wall(cmd, args.runs)
        print(f"  {t * 1000:8.0f} ms  {name}" + (f"  (exit {rc})" if rc else ""))


if __name__ == "__main__":
    main()
