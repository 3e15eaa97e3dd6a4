"""``rlctl plot RUN_DIR``: PNG curves of a run from its ``metrics.jsonl`` (matplotlib, Agg backend).

Writes ``<RUN_DIR>/plots/{reward,eval_accuracy,response_length,kl,step_time}.png``; a curve whose
metrics never appear in the file is skipped.

Test: ``pytest tests/unit/test_plot.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

FIGURES = {
    "reward": ("reward", ["reward/mean", "reward/accuracy_strict", "reward/accuracy_flexible", "reward/format_rate"]),
    "eval_accuracy": ("eval accuracy (greedy pass@1)", ["eval/accuracy_strict", "eval/accuracy_flexible"]),
    "response_length": ("response length (tokens)", ["response_length/mean", "response_length/max"]),
    "kl": ("KL / entropy", ["policy/kl", "policy/entropy"]),
    "step_time": ("seconds per phase", ["timing/generate", "timing/logprobs", "timing/train", "timing/weight_sync",
                                       "timing/eval", "timing/checkpoint", "timing/step"]),
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of ``metrics.jsonl``.

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir`` (message names the path).
        ValueError: a line is not JSON (message names ``file:line``).
    """
    path = Path(run_dir).expanduser() / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the run folder <trainer.log_path>/<project>/<run_name>")
    rows = []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) and not text.endswith("\n"):  # a run killed (or still) writing its last row
                    warnings.warn(f"{path}:{i}: incomplete last line skipped (a run killed while writing it?)",
                                  stacklevel=2)
                    break
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    return rows


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNG curves of a run; returns the written files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(run_dir)
    if not any(isinstance(r.get("step"), (int, float)) for r in rows):
        raise ValueError(f"{Path(run_dir).expanduser() / 'metrics.jsonl'} has no rows to plot yet")
    out_dir = Path(run_dir).expanduser() / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in FIGURES.items():
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        steps = sorted({x for pts in series.values() for x, _ in pts})
        if len(steps) <= 12:  # steps are whole numbers: tick each one (a single step would get 0.95 ... 1.05)
            ax.set_xticks(steps)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
