"""Algorithm comparison (issue 14 item 8): eval accuracy against minutes of training, several runs in one plot.

    python benchmarks/algo_compare.py docs/results/algo-compare/cmp-*-seed* --out docs/results/algo-compare

Reads each RUN_DIR's ``metrics.jsonl`` (the run folder, or the folder scripts/gpu_algo_compare.sh fills in $OUT)
and writes into ``--out``:

* ``compare.png``: two panels, eval strict and flexible accuracy (``eval/accuracy_strict``,
  ``eval/accuracy_flexible``: greedy pass@1 on the validation split) against minutes of training, one line per run
  labelled by its run name (runs of one setting, ``<name>-seed<N>``, share a colour and differ in line style).
* ``compare.md``: a Markdown table (also printed): run, steps, minutes of training, best and final strict /
  flexible accuracy, evals, skipped optimizer steps (``policy/skipped_steps``, non-finite loss or gradient).

Minutes of training = ``timing/train_time_total_s`` / 60 (the trainer.max_train_time_s total: the steps'
``timing/step`` without eval, log and checkpoint); runs written before that metric existed get the cumulative sum
of ``timing/step - timing/eval - timing/log - timing/checkpoint`` (the same sum, rlctl.loop.train_seconds). The
eval before training (step 0) sits at 0 minutes.

Test: ``pytest tests/unit/test_algo_compare.py``. Imports no torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO  # noqa: E402,F401  (puts this checkout's rlctl on sys.path)

from rlctl.plot import read_metrics  # noqa: E402

STRICT, FLEXIBLE = "eval/accuracy_strict", "eval/accuracy_flexible"
NOT_TRAINING = ("eval", "log", "checkpoint")  # = rlctl.loop.NOT_TRAINING (the test checks they agree)
HEADER = ["run", "steps", "minutes", "best strict", "final strict", "best flexible", "final flexible", "evals",
          "skipped steps"]


@dataclass
class Run:
    """One run's curve: ``points`` are (minutes of training, strict, flexible) at each eval, in step order."""

    name: str
    steps: int = 0
    minutes: float = 0.0
    points: list[tuple[float, float, float]] = field(default_factory=list)
    skipped_steps: int = 0


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_name(run_dir: Path) -> str:
    """``trainer.run_name`` from the run's ``config.yaml``, else the folder name."""
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        m = re.search(r"^\s+run_name:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", cfg.read_text(encoding="utf-8"), re.M)
        if m and m.group(1) not in ("null", "~"):
            return m.group(1)
    return run_dir.name


def load_run(run_dir: str | Path) -> Run:
    """Read one run folder into a :class:`Run`.

    Raises:
        FileNotFoundError / ValueError: as :func:`rlctl.plot.read_metrics`; ValueError when no row has
        ``eval/accuracy_strict`` (message names the run folder).
    """
    run_dir = Path(run_dir).expanduser()
    by_step: dict[int, dict] = {}
    for r in read_metrics(run_dir):
        if _num(r.get("step")):
            by_step[int(r["step"])] = r  # a re-done step (resume) replaces the earlier row
    run = Run(run_name(run_dir))
    total_s = 0.0
    for step in sorted(by_step):
        r = by_step[step]
        if step > 0:
            if _num(r.get("timing/train_time_total_s")):
                total_s = float(r["timing/train_time_total_s"])
            elif _num(r.get("timing/step")):
                total_s += r["timing/step"] - sum(r.get(f"timing/{p}", 0.0) for p in NOT_TRAINING)
            run.steps = step
            run.skipped_steps += int(r.get("policy/skipped_steps", 0) or 0)
        if _num(r.get(STRICT)):
            run.points.append((total_s / 60.0, float(r[STRICT]), float(r.get(FLEXIBLE, float("nan")))))
    run.minutes = total_s / 60.0
    if not run.points:
        raise ValueError(f"{run_dir}: no row has {STRICT}: nothing to compare (did the run reach an eval?)")
    return run


def table_rows(runs: list[Run]) -> list[list[str]]:
    """The table's cells per run (accuracies with 3 decimals, minutes with 2)."""
    rows = []
    for r in runs:
        strict = [p[1] for p in r.points]
        flexible = [p[2] for p in r.points]
        rows.append([r.name, str(r.steps), f"{r.minutes:.2f}", f"{max(strict):.3f}", f"{strict[-1]:.3f}",
                     f"{max(flexible):.3f}", f"{flexible[-1]:.3f}", str(len(r.points)), str(r.skipped_steps)])
    return rows


def markdown(runs: list[Run]) -> str:
    """The comparison table in Markdown."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    return "\n".join(lines) + "\n"


def build_figure(runs: list[Run]):
    """Two panels (strict, flexible accuracy) against minutes of training, one line per run; returns the Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110, sharey=True, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    settings: dict[str, int] = {}
    seen: dict[str, int] = {}
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, r in enumerate(runs):
        setting = re.sub(r"-seed\d+$", "", r.name)
        c = colours[settings.setdefault(setting, len(settings)) % len(colours)]
        k = seen.get(setting, 0)
        seen[setting] = k + 1
        xs = [p[0] for p in r.points]
        for ax, col in zip(axes, (1, 2)):
            ax.plot(xs, [p[col] for p in r.points], color=c, linestyle=styles[k % len(styles)],
                    marker=markers[i % len(markers)], ms=5, mfc="none", label=r.name)
    for ax, title in zip(axes, ("strict accuracy (#### N)", "flexible accuracy (last number)")):
        ax.set_title(title)
        ax.set_xlabel("minutes of training (no eval, no checkpoint)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("eval accuracy (greedy pass@1, test split)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    ap.add_argument("--out", required=True, help="folder for compare.png and compare.md")
    args = ap.parse_args(argv)
    runs = [load_run(d) for d in args.run_dirs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(runs)
    (out / "compare.md").write_text(text, encoding="utf-8")
    print(text, end="")
    import matplotlib.pyplot as plt

    fig = build_figure(runs)
    try:
        fig.savefig(out / "compare.png")
    finally:
        plt.close(fig)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
