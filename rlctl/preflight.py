"""Environment preflight of ``rlctl train`` / ``rlctl eval``: what this machine lacks for a valid config.

``rlctl check-config`` validates a configuration anywhere; this module checks, before Ray starts or any
folder is written, that THIS machine can run it, and collects every problem into one message:

- ``generator.backend=sglang`` without the ``sglang`` package (``importlib.util.find_spec``, no import);
- ``trainer.device=cuda`` or the sglang backend on a machine without a visible NVIDIA GPU;
- fewer visible GPUs than the layout needs (colocated: ``policy_num_nodes x policy_num_gpus_per_node``;
  split placement: that plus ``num_inference_engines x inference_engine_tensor_parallel_size``; ``rlctl
  eval`` reserves only the engines);
- (``train``) a checkpoint that already completes the run: nothing to train, reported as a note.

GPUs are counted without importing torch (:mod:`rlctl.gpus`: one ``nvidia-smi`` query with a short timeout, else
``/proc/driver/nvidia/gpus``), restricted by ``CUDA_VISIBLE_DEVICES``. The GPU checks step aside when
the job joins a Ray cluster (``ray.address`` / ``--ray-address`` / ``RAY_ADDRESS``): its GPUs are not
local. Imports: stdlib only (plus pyarrow's parquet metadata reader for the step count, only when a
checkpoint exists and ``trainer.max_steps`` does not settle it).

Test: ``pytest tests/unit/test_preflight.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from rlctl import gpus
from rlctl.gpus import NVIDIA_SMI_TIMEOUT_S

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
SGLANG_INSTALL = 'pip install "rlctl[sglang]"'


@dataclass
class Preflight:
    """The outcome of :func:`check`.

    Attributes:
        errors: one line per problem, each naming the key(s) and the fix; empty when this machine can run it.
        finished: a note when the latest complete checkpoint already completes the run (``train`` only).
        gpus: the visible GPU count used (None: unknown, or not checked under a Ray cluster address).
    """

    errors: list[str] = field(default_factory=list)
    finished: str | None = None
    gpus: int | None = None


def sglang_installed() -> bool:
    """Whether the ``sglang`` package can be imported (found on the path; not imported)."""
    return importlib.util.find_spec("sglang") is not None


def physical_gpu_count(timeout_s: float = NVIDIA_SMI_TIMEOUT_S, listed: list | None = None) -> int:
    """NVIDIA GPUs of this machine (container) without importing torch.

    ``listed`` (:func:`rlctl.gpus.query`, run here when not given) first: ``nvidia-smi`` sees a container's GPUs
    only; else the entries of ``/proc/driver/nvidia/gpus``, else 0. ``timeout_s``: seconds ``nvidia-smi`` may take.
    """
    listed = gpus.query(timeout_s) if listed is None else listed
    if listed:
        return len(listed)
    try:
        return sum(1 for _ in PROC_GPUS.iterdir())
    except OSError:
        return 0


def visible_gpu_count(timeout_s: float = NVIDIA_SMI_TIMEOUT_S) -> int:
    """GPUs a CUDA process started here would see: :func:`rlctl.gpus.visible` of ``nvidia-smi``'s list under
    ``CUDA_VISIBLE_DEVICES``; without ``nvidia-smi``, the ``/proc`` count cut to the variable's leading indices
    (empty: none; CUDA stops at the first negative index, e.g. ``-1``)."""
    listed = gpus.query(timeout_s)
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = gpus.visible(listed, cvd) if listed else None
    if seen is not None:
        return len(seen)
    physical = physical_gpu_count(timeout_s, listed=listed or [])
    if cvd is None:
        return physical
    count = 0
    for entry in (e.strip() for e in cvd.split(",")):
        if not entry or re.fullmatch(r"-\d+", entry):
            break
        count += 1
    return min(count, physical)


def _ray_address(cfg) -> str | None:
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def ray_address_problem(address: str, timeout_s: float = 3.0) -> str | None:
    """Whether a Ray cluster address ``host:port`` answers (a TCP connection within ``timeout_s`` seconds); ``auto``,
    ``local`` and ``ray://`` client addresses are left to Ray. Without this check ``ray.init`` retries an address
    that does not answer for minutes, printing only Ray's own GCS timeouts.

    Returns: None when it answers (or is not checked), else one message naming ``ray.address`` and the fix."""
    import socket

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except (OSError, ValueError) as e:
        return (f"ray.address={address}: no Ray cluster answers there ({type(e).__name__}: {e}); start one with "
                "`ray start --head` and pass the address it prints (--ray-address or RAY_ADDRESS), or drop it to "
                "start a local cluster")


def gpus_needed(cfg, command: Literal["train", "eval"]) -> tuple[int, str]:
    """GPUs the layout reserves on a CUDA run, and the keys that make that number (for messages).

    ``train`` colocated: ``policy_num_nodes x policy_num_gpus_per_node`` (the engines share them);
    split: that plus ``num_inference_engines x inference_engine_tensor_parallel_size``. ``eval``
    reserves the engines only.
    """
    p, g = cfg.trainer.placement, cfg.generator
    engines = g.num_inference_engines * g.inference_engine_tensor_parallel_size
    engines_txt = (f"generator.num_inference_engines={g.num_inference_engines} x "
                   f"generator.inference_engine_tensor_parallel_size={g.inference_engine_tensor_parallel_size}")
    policy_txt = (f"trainer.placement.policy_num_nodes={p.policy_num_nodes} x "
                  f"trainer.placement.policy_num_gpus_per_node={p.policy_num_gpus_per_node}")
    if command == "eval":
        return engines, f"{engines_txt} for the engines"
    if p.colocate_all:
        return cfg.num_policy_workers, f"{policy_txt}, colocated with the engines"
    return cfg.num_policy_workers + engines, f"{policy_txt} for the policy + {engines_txt} for the engines (split placement)"


def _gpu_errors(cfg, command: str, gpus: int, device: str | None, backend: str | None, layout: bool = True) -> list[str]:
    """No GPU at all for ``trainer.device=cuda`` / the sglang backend (``None``: that key's value is unknown); with
    ``layout``, fewer GPUs than the layout needs."""
    where = ("CUDA_VISIBLE_DEVICES=" + repr(os.environ["CUDA_VISIBLE_DEVICES"])
             if "CUDA_VISIBLE_DEVICES" in os.environ else "none found by nvidia-smi or in /proc/driver/nvidia")
    errors = []
    if gpus == 0:
        if device == "cuda":
            errors.append(f"trainer.device=cuda: this machine has no visible NVIDIA GPU ({where}); set "
                          "trainer.device=cpu (with --backend hf, e.g. --preset gsm8k-cpu), or run on a GPU machine "
                          "or a Ray cluster (--ray-address)")
        if backend == "sglang":
            errors.append(f"generator.backend=sglang: SGLang engines need a CUDA GPU and this machine has none "
                          f"({where}); use --backend hf with trainer.device=cpu (e.g. --preset gsm8k-cpu), or run on "
                          "a GPU machine or a Ray cluster (--ray-address)")
        return errors
    if not layout:
        return errors
    need, how = gpus_needed(cfg, command)
    have = gpus
    limit = ""
    if cfg.ray.num_gpus is not None and cfg.ray.num_gpus < gpus:
        have, limit = int(cfg.ray.num_gpus), f" (ray.num_gpus={cfg.ray.num_gpus} of {gpus} visible)"
    if need > have:
        fix = ("lower generator.num_inference_engines" if command == "eval" else
               "lower trainer.placement.policy_num_gpus_per_node / policy_num_nodes"
               + (" and generator.num_inference_engines to match" if cfg.trainer.placement.colocate_all
                  else " or generator.num_inference_engines"))
        errors.append(f"the layout needs {need} GPUs ({how}) but this machine has {have}{limit}; {fix}, "
                      "or pass --ray-address of a cluster with enough GPUs")
    return errors


def _checkpoint_step(cfg) -> tuple[int, Path] | None:
    """(step, folder) of the checkpoint ``trainer.resume_mode`` would resume from, or None."""
    from rlctl.checkpoint import checkpoint_step, latest_checkpoint

    t = cfg.trainer
    if t.resume_mode == "latest":
        path = latest_checkpoint(Path(cfg.ckpt_dir))
    elif t.resume_mode == "from_path" and t.resume_path:
        path = Path(os.path.expandvars(os.path.expanduser(str(t.resume_path))))
    else:
        return None
    if path is None:
        return None
    step = checkpoint_step(path)
    return None if step is None else (step, path)


def max_total_steps(cfg) -> int | None:
    """An upper bound of the run's steps without tokenizing: ``min(trainer.max_steps, rows //
    trainer.train_batch_size x trainer.epochs)``, rows from the parquet footers of ``data.train_data``
    (the loop drops prompts longer than ``trainer.max_prompt_length``, so the real count is at most
    this). None when it cannot be known cheaply (a file unreadable)."""
    t = cfg.trainer
    try:
        import pyarrow.parquet as pq

        rows = sum(pq.read_metadata(Path(p).expanduser()).num_rows for p in cfg.data.train_data)
    except Exception:  # noqa: BLE001 - ImportError, ArrowInvalid, OSError: the loop reports it properly
        return t.max_steps
    total = rows // t.train_batch_size * t.epochs
    return total if t.max_steps is None else min(total, t.max_steps)


def _finished(cfg) -> str | None:
    found = _checkpoint_step(cfg)
    if found is None:
        return None
    step, path = found
    t = cfg.trainer
    # cheap bound first: trainer.max_steps alone settles it without reading the data
    bound = t.max_steps if t.max_steps is not None and step >= t.max_steps else max_total_steps(cfg)
    if bound is None or bound <= 0 or step < bound:
        return None
    return (f"the checkpoint {path} (step {step}) already completes this run's {bound} steps: nothing to train "
            "(use a new trainer.run_name, trainer.resume_mode=none, or raise trainer.max_steps / trainer.epochs)")


def check(cfg: Any, command: Literal["train", "eval"], gpu_count: Callable[[], int] | None = None,
          unsure: Any = None) -> Preflight:
    """Check that this machine can run the validated ``cfg`` (an ``rlctl.config.RunConfig``).

    Args:
        cfg: the validated run config.
        command: ``train`` or ``eval`` (eval reserves GPUs for the engines only and has no checkpoint check).
        gpu_count: returns the visible GPU count; default :func:`visible_gpu_count` (tests pass a fake).
        unsure: for a configuration that failed validation (``ConfigError.cfg``, so that its errors and this
            machine's problems are reported in one message): the key paths whose value in ``cfg`` is not the
            user's (``ConfigError.unsure``). Given, only the checks that need no more than ``generator.backend``,
            ``trainer.device`` and ``ray.address`` run (SGLang installed, a GPU at all), each only when the keys
            it reads are not unsure (an unsure ``ray.address`` counts as unset); no layout count, no checkpoint.
    Returns:
        :class:`Preflight`; never raises for a missing GPU or package: the caller prints ``errors`` at once.
    """
    out = Preflight()
    partial = unsure is not None
    unsure = set(unsure or ())
    backend = None if "generator.backend" in unsure else cfg.generator.backend
    device = None if "trainer.device" in unsure else cfg.trainer.device
    if backend == "sglang" and not sglang_installed():
        out.errors.append(f"generator.backend=sglang: SGLang is not installed in this Python environment; "
                          f"install it with {SGLANG_INSTALL} on a GPU machine, or use --backend hf "
                          "(e.g. --preset gsm8k-cpu)")
    # an unsure ray.address (e.g. in a --config file that did not parse) counts as unset; RAY_ADDRESS still counts
    address = (os.environ.get("RAY_ADDRESS") or None) if "ray.address" in unsure else _ray_address(cfg)
    if address is not None:
        problem = ray_address_problem(address)
        if problem:
            out.errors.append(problem)
    # cuda, or auto (cuda when a GPU is visible); sglang is never on cpu (device None: unsure)
    if address is None and (device in ("cuda", "auto") or (device is None and backend == "sglang")):
        out.gpus = (gpu_count or visible_gpu_count)()
        out.errors.extend(_gpu_errors(cfg, command, out.gpus, device, backend, layout=not partial))
    if command == "train" and not out.errors and not partial:
        out.finished = _finished(cfg)
    return out
