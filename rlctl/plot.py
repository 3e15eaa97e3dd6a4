"""``rlctl plot RUN_DIR``: PNG curves of a run from its ``metrics.jsonl`` (matplotlib, Agg backend).

Writes ``<RUN_DIR>/plots/{reward,eval_accuracy,response_length,kl,step_time}.png``; a curve whose
metrics never appear in the file is skipped. Every panel has a y-axis label; quantities of different
scale (KL vs entropy, reward vs rates) get separate panels; curves of a panel differ in line style and
marker; legends sit right of the axes.

Test: ``pytest tests/unit/test_plot.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

# figure name -> (title, panels); a panel is (y-axis label, metric keys). Quantities of different scale
# (KL ~1e-3, entropy ~2; reward vs rates) get panels of their own; a panel without data is left out.
FIGURES = {
    "reward": ("reward", [
        ("reward (mean over rollouts)", ["reward/mean"]),
        ("fraction of rollouts", ["reward/accuracy_strict", "reward/accuracy_flexible", "reward/format_rate"]),
    ]),
    "eval_accuracy": ("eval accuracy (greedy pass@1)", [
        ("fraction of problems", ["eval/accuracy_strict", "eval/accuracy_flexible"]),
    ]),
    "response_length": ("response length", [("tokens", ["response_length/mean", "response_length/max"])]),
    "kl": ("KL / entropy", [
        ("KL to the reference model", ["policy/kl"]),
        ("entropy (nats / token)", ["policy/entropy"]),
    ]),
    "step_time": ("seconds per phase", [
        ("seconds", ["timing/generate", "timing/logprobs", "timing/train", "timing/weight_sync", "timing/eval",
                     "timing/checkpoint", "timing/step"]),
    ]),
}
# one (line style, marker) per curve of a panel, so equal curves (acc_strict = format_rate = 0) stay visible
# (7 is the most curves of a panel)
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "x"),
          ((0, (3, 1, 1, 1, 1, 1)), "P")]


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


def build_figures(rows: list[dict]) -> dict:
    """The matplotlib figures of :data:`FIGURES` for metric rows (``{"step": N, "<metric>": value}``).

    Each panel has its own y axis label; every curve of a panel has its own line style and marker; the
    legend sits to the right of the axes (it never covers a curve). Panels and figures without any
    value are left out. Returns ``{name: Figure}`` (the caller saves and closes them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures = {}
    for name, (title, panels) in FIGURES.items():
        drawn = []
        for ylabel, keys in panels:
            series = {k: [(r["step"], r[k]) for r in rows
                          if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)] for k in keys}
            series = {k: v for k, v in series.items() if v}
            if series:
                drawn.append((ylabel, series))
        if not drawn:
            continue
        fig, axes = plt.subplots(len(drawn), 1, figsize=(7.5, 3.0 * len(drawn)), dpi=110, squeeze=False,
                                 sharex=True, layout="constrained")
        for ax, (ylabel, series) in zip(axes[:, 0], drawn):
            for i, ((k, pts), (ls, marker)) in enumerate(zip(series.items(), STYLES)):
                xs, ys = zip(*pts)
                # hollow markers, each curve's smaller than the one before: coinciding points stay visible
                ax.plot(xs, ys, linestyle=ls, marker=marker if len(xs) < 30 else None, ms=8 - i, mfc="none",
                        label=k)
            ax.set_ylabel(ylabel)
            steps = sorted({x for pts in series.values() for x, _ in pts})
            if len(steps) <= 12:  # steps are whole numbers: tick each one (a single step would get 0.95 ... 1.05)
                ax.set_xticks(steps)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        axes[0, 0].set_title(title)
        axes[-1, 0].set_xlabel("step")
        figures[name] = fig
    return figures


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNG curves of a run (``<run_dir>/plots/<figure>.png``); returns the written files.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_metrics`; ValueError also when no row has a step.
    """
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not any(isinstance(r.get("step"), (int, float)) for r in rows):
        raise ValueError(f"{Path(run_dir).expanduser() / 'metrics.jsonl'} has no rows to plot yet")
    out_dir = Path(run_dir).expanduser() / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in build_figures([r for r in rows if isinstance(r.get("step"), (int, float))]).items():
        path = out_dir / f"{name}.png"
        tmp = path.with_suffix(".tmp.png")
        try:
            fig.savefig(tmp)
        finally:
            plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
