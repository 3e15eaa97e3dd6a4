"""Checkpoints: atomic write, discovery of the latest complete one, pruning, and resume.

Layout under ``<trainer.ckpt_path>/<project_name>/<run_name>/``::

    global_step_<N>/policy/          Hugging Face folder (model.safetensors, config, tokenizer): loadable
                                     by transformers and SGLang
    global_step_<N>/trainer_state.pt optimizer state, step, data position, RNG states
    global_step_<N>/COMPLETE         written last, inside the temporary folder

A checkpoint is written into ``.tmp-global_step_<N>-<pid>`` and renamed when complete, so a run killed
mid-write never leaves a folder that :func:`latest_checkpoint` picks up.

Test: ``pytest tests/unit/test_checkpoint.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

STEP_RE = re.compile(r"^global_step_(\d+)$")
MARKER = "COMPLETE"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder ``global_step_<N>`` (its ``COMPLETE`` marker's
    ``step``, else ``N`` from the name), or None when ``path`` is not a complete checkpoint.
    Reads no tensors (no torch)."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        step = json.loads(marker.read_text(encoding="utf-8")).get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    except (OSError, ValueError, AttributeError):
        pass
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints (``keep <= 0`` keeps all) and stale
    temporary folders. Returns the deleted paths."""
    deleted = []
    for p in ckpt_dir.glob(".tmp-global_step_*"):
        shutil.rmtree(p, ignore_errors=True)
        deleted.append(p)
    if keep > 0:
        for _, p in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    return deleted


class Checkpointer:
    """Saves and restores the run's checkpoints through a trainer group.

    Args:
        ckpt_dir: ``cfg.ckpt_dir``.
        model_path: the original model (its config and tokenizer are copied into each checkpoint).
        keep: ``trainer.max_ckpts_to_keep`` (-1 keeps all).
        resume_mode: ``trainer.resume_mode`` (``none``, ``latest``, ``from_path``).
        resume_path: ``trainer.resume_path`` (a ``global_step_<N>`` folder) for ``from_path``.
        notes: a list to which user-facing notes are appended.
    """

    def __init__(self, ckpt_dir: Path, model_path: str, keep: int, resume_mode: str | None,
                 resume_path: str | None, notes: list[str] | None = None) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.model_path = model_path
        self.keep = keep
        self.resume_mode = resume_mode or "none"
        self.resume_path = resume_path
        self.notes = notes if notes is not None else []

    def resolve_resume(self) -> Path | None:
        """The checkpoint folder to resume from, or None for a fresh start.

        Raises:
            FileNotFoundError: ``resume_mode=from_path`` and ``trainer.resume_path`` is not a complete
                checkpoint.
        """
        if self.resume_mode == "none":
            return None
        if self.resume_mode == "from_path":
            p = Path(os.path.expandvars(os.path.expanduser(str(self.resume_path or ""))))
            if not (p / MARKER).is_file():
                raise FileNotFoundError(
                    f"trainer.resume_path={self.resume_path!r} is not a complete checkpoint folder "
                    f"(expected {p}/{MARKER}); set trainer.resume_path to a global_step_<N> folder "
                    "or trainer.resume_mode=latest")
            return p
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is None:
            self.notes.append(f"trainer.resume_mode=latest: no checkpoint in {self.ckpt_dir}; starting fresh")
        return latest

    def restore(self, trainers) -> dict[str, Any] | None:
        """Load the checkpoint chosen by :meth:`resolve_resume` into the trainers; returns its extra
        state (``{"step": N, ...}``) or None."""
        path = self.resolve_resume()
        if path is None:
            return None
        extra = trainers.load_checkpoint(path / "policy", path / "trainer_state.pt")
        self.notes.append(f"resumed from {path} (step {extra['step']})")
        return extra

    def _tmp_dir(self, step: int | str) -> Path:
        return self.ckpt_dir / f".tmp-global_step_{step}-{os.getpid()}"

    def discard_partial(self) -> list[Path]:
        """Delete this process's unfinished checkpoint folders (``.tmp-global_step_*-<pid>``).

        Called by ``rlctl.job.entry.train`` on the way out, after the actors are gone (a failed or
        interrupted run leaves no partial files). Other processes' temporary folders are left alone
        (a concurrent run may own them); ``prune`` removes stale ones after the next save.
        """
        gone = []
        for p in self.ckpt_dir.glob(f".tmp-global_step_*-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
        return gone

    def save(self, trainers, extra: dict[str, Any]) -> Path:
        """Write ``global_step_<step>`` atomically, then prune old ones. Returns the final folder."""
        step = extra["step"]
        final = self.ckpt_dir / f"global_step_{step}"
        tmp = self._tmp_dir(step)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            trainers.save_checkpoint(tmp / "policy", tmp / "trainer_state.pt", self.model_path, extra)
            (tmp / MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        except BaseException:
            # an actor may still be writing into tmp: the caller kills the actors, then calls
            # discard_partial(); removing it here too covers driver-side failures
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(self.ckpt_dir, self.keep)
        return final
