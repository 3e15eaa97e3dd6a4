"""Run outputs: metrics.jsonl, TensorBoard, Weights & Biases, rollout samples, run metadata, progress bar.

``RunLogger`` owns the run folder ``<trainer.log_path>/<project_name>/<run_name>``:

- ``config.yaml``: the resolved config, secrets redacted; ``versions.json``: the run's UTC start (``time_utc``),
  the GPUs, package versions and git commit (:func:`run_versions`)
- ``metrics.jsonl``: one JSON object per step (``{"step": N, "<metric>": value, ...}``)
- ``rollouts/step_<N>.jsonl``: prompt, response, reward of every rollout of sampled steps
- ``tensorboard/``: event files (``trainer.logger`` includes ``tensorboard``)
- wandb: when ``trainer.logger`` includes ``wandb`` (the ``rlctl[wandb]`` extra; the API key comes from
  the environment and is never printed or saved)

Test: ``pytest tests/unit/test_metrics.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# (metric, label, unit) shown on the console line of each step
KEY_METRICS = (("reward/mean", "reward", ""), ("reward/accuracy_strict", "acc_strict", ""),
               ("reward/accuracy_flexible", "acc_flex", ""), ("response_length/mean", "resp_len", " tok"),
               ("policy/grad_norm", "grad_norm", ""), ("groups/zero_variance_fraction", "flat_groups", ""),
               ("timing/step", "step_time", " s"))
PACKAGES = ("rlctl", "torch", "transformers", "ray", "sglang", "pydantic", "datasets", "pyarrow")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Build a folder atomically: yields an empty temporary folder beside ``out`` (permissions from the
    umask); when the block ends without error it replaces ``out`` with one rename, otherwise it is
    deleted. ``out`` is therefore either its old self or complete, never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter for reproducing a run (None if absent)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """The git commit of the rlctl source tree, or None outside a checkout."""
    try:
        root = Path(__file__).resolve().parents[1]
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_versions(now: datetime | None = None) -> dict[str, Any]:
    """What ``versions.json`` of a run folder holds: ``time_utc`` (this command's start, ``now`` or the current time,
    ISO 8601 UTC to the second), ``gpus`` (this machine's GPUs as ``nvidia-smi`` lists them, e.g. ``["NVIDIA H100
    80GB HBM3 (81559 MiB)"]``; ``[]`` without a GPU or ``nvidia-smi``; with ``--ray-address`` the workers' GPUs may
    differ), ``python``, ``packages`` (:func:`package_versions`) and ``git_commit``. A resumed run's file then goes
    through :func:`keep_first_start`."""
    import platform

    from rlctl import gpus as gpu_list

    listed = gpu_list.query() or []
    return {
        "time_utc": (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpus": [f"{g.name or 'unnamed GPU'} ({g.memory_bytes // gpu_list.MiB} MiB)" for g in listed],
        "python": platform.python_version(),
        "packages": package_versions(),
        "git_commit": git_commit(),
    }


def keep_first_start(current: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``current`` (:func:`run_versions` of a command that resumed the run) with the run's first ``time_utc`` from
    ``previous`` (the run's earlier ``versions.json``) and this command's start appended to ``resumed_utc``;
    ``current`` unchanged when ``previous`` holds no start."""
    if not previous or not isinstance(previous.get("time_utc"), str):
        return current
    resumed = [t for t in previous.get("resumed_utc", []) if isinstance(t, str)]
    return {**current, "time_utc": previous["time_utc"], "resumed_utc": [*resumed, current["time_utc"]]}


def _read_json_dict(path: Path) -> dict[str, Any] | None:
    """A JSON object file's content; None when absent, unreadable or not an object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class LogConsole(Console):
    """A rich Console whose :meth:`log` writes ``[HH:MM:SS] message`` as one soft-wrapped line.

    rich's own ``log`` lays out a full-width table (time, message, ``file.py:line``): padded with
    spaces to the console width in a file or pipe, and in a terminal the source-location column
    squeezes the message so step lines wrap. Here the message is never padded, hard-wrapped or
    followed by a source location; a terminal folds a long line at its own width. Log messages are
    plain text (``markup`` defaults to False: paths or notes with ``[...]`` are printed as written).
    """

    def log(self, *objects: Any, sep: str = " ", end: str = "\n", style: Any = None, justify: Any = None,
            emoji: bool | None = None, markup: bool | None = None, highlight: bool | None = None,
            log_locals: bool = False, _stack_offset: int = 1) -> None:
        """Print ``objects`` after the time of day (``[HH:MM:SS]``); arguments as ``Console.print``."""
        stamp = Text(datetime.now().strftime("[%X]"), style="log.time")
        self.print(stamp, *objects, sep=sep, end=end, style=style, justify=justify, emoji=emoji,
                   markup=False if markup is None else markup,
                   highlight=highlight, soft_wrap=True)


def log_console() -> Console:
    """The run's console on stderr (:class:`LogConsole`): one unpadded line per message in a log file or
    pipe (no 80-column cuts, no padding); a terminal keeps its own width."""
    import sys

    tty = sys.stderr.isatty()
    return LogConsole(stderr=True, soft_wrap=True, width=None if tty else 4096, log_path=False)


class RunLogger:
    """Writes the run folder and the live display. ``loggers``: names from ``trainer.logger``."""

    def __init__(self, run_dir: Path, config_yaml: str, loggers: list[str], *, project: str, run_name: str,
                 redacted_config: dict, console: Console | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = console or log_console()
        write_text_atomic(self.run_dir / "config.yaml", config_yaml)
        # a run folder reused by a resume keeps its first start (mark_resumed, once the checkpoint is restored); any
        # other reuse (resume_mode=none, no checkpoint yet) is a new run: this command's start
        self._previous_versions = _read_json_dict(self.run_dir / "versions.json")
        self.versions = run_versions()
        write_text_atomic(self.run_dir / "versions.json", json.dumps(self.versions, indent=2))
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self.wandb = None
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("trainer.logger=wandb needs the wandb package: pip install 'rlctl[wandb]' "
                                   "(or set trainer.logger=tensorboard)") from None
            self.wandb = wandb.init(project=project, name=run_name, config=redacted_config, dir=str(self.run_dir),
                                    resume="allow")
        self.progress: Progress | None = None
        self.task = None

    def mark_resumed(self) -> None:
        """This command resumed the run from a checkpoint: ``versions.json`` takes the run's first ``time_utc`` from
        the file found at start-up and lists this command's start under ``resumed_utc`` (:func:`keep_first_start`)."""
        self.versions = keep_first_start(self.versions, self._previous_versions)
        write_text_atomic(self.run_dir / "versions.json", json.dumps(self.versions, indent=2))

    def truncate_after(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (a resumed run re-does them)."""
        if not self.metrics_path.exists():
            return
        kept = [ln for ln in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_text_atomic(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one metrics line and forward to TensorBoard / wandb / the progress bar."""
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = "  ".join(f"{label}={metrics[k]:.4g}{unit}" for k, label, unit in KEY_METRICS if k in metrics)
        evals = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("eval/accuracy"))
        self.console.log(f"step {step}: {shown}  {evals}".rstrip())
        if self.progress is not None and step > 0:
            self.progress.update(self.task, completed=step, description=f"step {step}")

    def dump_rollouts(self, step: int, rows: list[dict], texts: list[str], scored: list[dict],
                      finish_reasons: list[str]) -> None:
        """Write ``rollouts/step_<N>.jsonl``: prompt, response, gold answer, reward, finish reason."""
        lines = []
        for row, text, s, fin in zip(rows, texts, scored, finish_reasons):
            prompt = row["prompt"][-1]["content"] if row.get("prompt") else ""
            lines.append(json.dumps({"step": step, "prompt": prompt, "response": text, "answer": row.get("answer"),
                                     "reward": s["reward"], "finish_reason": fin}))
        write_text_atomic(self.run_dir / "rollouts" / f"step_{step}.jsonl", "\n".join(lines) + "\n")

    def start_progress(self, total: int, done: int) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("training", total=total, completed=done)
        self.progress.start()

    def finish_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self.finish_progress()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
