"""The ``train`` and ``evaluate`` entry points of the Ray job (``rlctl train`` / ``rlctl eval``): load the
tokenizer and prompts, start the cluster and the actors (:mod:`rlctl.job.cluster`), run :func:`rlctl.loop.run`,
and turn an actor failure into one readable line.

Test: ``pytest tests/unit/test_train_e2e.py`` and ``tests/unit/test_faults.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlctl.job.cluster import build_groups, check_device_rules, init_ray, resolve_device, shutdown_ray
from rlctl.job.groups import ACTOR_LABELS


def _load_tokenizer_and_stops(cfg):
    """The policy's tokenizer and stop token ids; a hub name is resolved first (fails fast offline or
    when there is no such model: :class:`rlctl.models.ModelSourceError`)."""
    from transformers import AutoTokenizer

    from rlctl.models import local_model_files, stop_token_ids

    path = cfg.trainer.policy.model.path
    files = local_model_files(path)  # for a hub name: its JSON files, so the stop ids come from the model
    tok = AutoTokenizer.from_pretrained(path)
    return tok, stop_token_ids(files)


def _load_prompts(paths, tokenizer, max_prompt_length):
    from rlctl.gsm8k import read_prompts
    from rlctl.loop import tokenize_prompts

    return tokenize_prompts(read_prompts([str(p) for p in paths]), tokenizer, max_prompt_length)


def _actor_label(e: BaseException) -> str | None:
    if getattr(e, "rlctl_actor", None):
        return e.rlctl_actor
    aid = getattr(e, "actor_id", None) or getattr(e, "_actor_id", None)
    aid = aid.hex() if hasattr(aid, "hex") and not isinstance(aid, str) else aid
    if aid and aid in ACTOR_LABELS:
        return ACTOR_LABELS[aid]
    rep = getattr(e, "actor_repr", None)  # the worker's __repr__: "trainer-0" / "generator-1"
    return rep if rep and rep.split("-")[0] in ("trainer", "generator") else None


def _describe_ray_error(e: BaseException) -> str:
    """One readable paragraph for a Ray failure: which actor (``trainer-<rank>`` / ``generator-<i>``),
    what happened (died, or raised in which method) and its last error -- not Ray's traceback dump.

    A ``RayTaskError`` is unwrapped down to its cause (an actor that called a dead actor -- the trainer
    pushing weights to a dead generator -- names the dead one); a ``RayActorError`` (the process died:
    killed, OOM, segfault) gives the last lines of Ray's death report.
    """
    import ray

    chain, cur = [], e
    while cur is not None and cur not in chain and len(chain) < 10:
        chain.append(cur)
        cur = getattr(cur, "cause", None) if isinstance(cur, ray.exceptions.RayTaskError) else None
    dead = next((c for c in reversed(chain) if isinstance(c, ray.exceptions.RayActorError)), None)
    if dead is not None:
        label = _actor_label(dead) or "a Ray actor"
        text = " ".join(str(dead).split())
        text = text.split(" Some common causes")[0]  # Ray's generic advice follows; keep the facts
        return f"{label} died ({type(dead).__name__}); last error: {text or '(no details from Ray)'}"
    task = next((c for c in chain if isinstance(c, ray.exceptions.RayTaskError)), None)
    if task is not None:
        cause = chain[-1] if not isinstance(chain[-1], ray.exceptions.RayTaskError) else None
        label = _actor_label(task) or "a Ray task"
        fn = getattr(task, "function_name", None) or str(getattr(task, "proctitle", "") or "").removeprefix("ray::")
        where = f" in {fn}" if fn and not fn.startswith("IDLE") else ""
        if cause is not None:
            msg = str(cause).strip() or type(cause).__name__
            return f"{label} failed{where}; last error: {type(cause).__name__}: {msg}"
        lines = [ln for ln in str(task).splitlines() if ln.strip()]
        return f"{label} failed{where}; last error: " + (lines[-1].strip() if lines else type(task).__name__)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: " + (" | ".join(lines[-3:]) if lines else "(no message)")


def _restore_ctrl_c() -> None:
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt even when the shell started us with SIGINT ignored
    (a background job of a non-interactive shell inherits SIG_IGN, and Python then keeps it): the run
    must always be stoppable cleanly. Main thread only (signal handlers cannot be set elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the driver (a scheduler's time limit, ``kill``, ``timeout``): the run stops as on Ctrl-C
    (actors killed, partial checkpoint removed, Ray stopped), with exit code 143 (128 + SIGTERM)."""


_SIGTERM_SEEN = [False]  # set by the handler: Ray's ray.get may re-raise the interrupt as a plain KeyboardInterrupt


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _SIGTERM_SEEN[0] = True
    raise Terminated()


def stopped_by_sigterm(exc: BaseException) -> bool:
    """Whether the KeyboardInterrupt ``exc`` came from SIGTERM (:class:`Terminated`, or re-raised by Ray after
    the handler ran) rather than Ctrl-C."""
    return isinstance(exc, Terminated) or _SIGTERM_SEEN[0]


def _stop_cleanly_on_sigterm() -> Any:
    """Turn SIGTERM into :class:`Terminated` in the main thread. Called again after ``ray.init``, whose failure
    signal handler would otherwise print a raw stack dump and kill the driver before the cleanup runs.
    Returns the handler it replaced (None off the main thread), for :func:`_cleanup_shielded` to put back."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        _SIGTERM_SEEN[0] = False
        return signal.signal(signal.SIGTERM, _raise_terminated)
    return None


@contextmanager
def _cleanup_shielded(shield: bool, caller_term: Any) -> Iterator[None]:
    """Run a job's cleanup (the ``with`` body) so that it finishes: with ``shield`` a second Ctrl-C or SIGTERM
    during it is ignored; afterwards SIGINT's handler is back and SIGTERM gets ``caller_term`` (what
    :func:`_stop_cleanly_on_sigterm` replaced; the default when that was not a Python handler). Main thread only;
    elsewhere the body just runs."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if shield and main else None
    if shield and main:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)
        if main:  # the caller's SIGTERM handler (train() / evaluate() may run inside a host program)
            signal.signal(signal.SIGTERM, caller_term if caller_term is not None else signal.SIG_DFL)


def train(loaded) -> dict[str, Any]:
    """Run the training job of a validated config (``rlctl train``). Returns the loop's summary.

    Raises:
        rlctl.config.ConfigError: a device-dependent config rule (:func:`check_device_rules`), before Ray starts.
        SystemExit: with a message naming the actor and its last error if an actor dies (code 1), on
            Ctrl-C (code 130) or SIGTERM (code 143); Ray is shut down in every case.
    """
    import ray

    from rlctl import loop
    from rlctl.checkpoint import Checkpointer, latest_checkpoint
    from rlctl.colocation import Colocation
    from rlctl.config import redact, to_dict
    from rlctl.metrics import RunLogger, log_console

    cfg = loaded.cfg
    console = log_console()
    _restore_ctrl_c()
    device = resolve_device(cfg)
    check_device_rules(cfg, device)
    import yaml

    redacted = redact(to_dict(cfg))
    run_dir = Path(cfg.run_dir)
    logger = None  # the run folder is written once the Ray job is up: a failed start leaves nothing behind
    notes: list[str] = []
    generators = None
    ckpt = None
    started_ray = False
    clean = False
    caller_term = _stop_cleanly_on_sigterm()
    try:
        tokenizer, stops = _load_tokenizer_and_stops(cfg)
        train_data = _load_prompts(cfg.data.train_data, tokenizer, cfg.trainer.max_prompt_length)
        val_data = _load_prompts(cfg.data.val_data, tokenizer, cfg.trainer.max_prompt_length) if cfg.data.val_data else None
        if train_data.dropped_too_long:
            console.log(f"note: dropped {train_data.dropped_too_long} training prompts longer than "
                        f"trainer.max_prompt_length={cfg.trainer.max_prompt_length} tokens")
        t0 = time.perf_counter()
        started_ray = init_ray(cfg, device)
        _stop_cleanly_on_sigterm()
        trainers, generators = build_groups(cfg, device)
        logger = RunLogger(run_dir, yaml.safe_dump(redacted, sort_keys=False), _loggers(cfg),
                           project=cfg.trainer.project_name, run_name=cfg.trainer.run_name, redacted_config=redacted,
                           console=console)
        console.log(f"Ray job up in {time.perf_counter() - t0:.1f} s: {trainers.world_size} trainer worker(s), "
                    f"{len(generators.workers)} {cfg.generator.backend} generator(s) on {device}; run folder {redact(str(run_dir))}")
        _record_placement(cfg, generators.actor_nodes, run_dir, console)
        ckpt = Checkpointer(Path(cfg.ckpt_dir), cfg.trainer.policy.model.path, cfg.trainer.max_ckpts_to_keep,
                            cfg.trainer.resume_mode, cfg.trainer.resume_path, notes)
        colo = Colocation(trainers, generators, shared_gpu=cfg.trainer.placement.colocate_all and device == "cuda",
                          engine_sleeps=cfg.trainer.placement.colocate_all, engine_state=generators.initial_state())
        summary = loop.run(cfg, colo, tokenizer, train_data, val_data, logger, ckpt, stops)
        last = summary["last_step"]
        latest = latest_checkpoint(Path(cfg.ckpt_dir))
        console.log(redact(f"done: {last} step{'s' if last != 1 else ''} ({summary['stopped_because']}); metrics in "
                           f"{run_dir / 'metrics.jsonl'}" + (f"; checkpoint {latest}" if latest else "")))
        clean = True
        return summary
    except ray.exceptions.RayError as e:
        latest = latest_checkpoint(Path(cfg.ckpt_dir))
        kept = (f"completed checkpoints in {redact(str(cfg.ckpt_dir))} are kept (latest: {latest.name}; resume with "
                "trainer.resume_mode=latest)" if latest else "no checkpoint was completed")
        console.print("[red]error:[/red] " + _escape(_describe_ray_error(e)) + "\n  " + _escape(kept))
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:
        latest = latest_checkpoint(Path(cfg.ckpt_dir))
        terminated = stopped_by_sigterm(e)
        why = "terminated (SIGTERM)" if terminated else "interrupted"
        console.print(f"[yellow]{why}:[/yellow] stopping the Ray job; "
                      + (_escape(f"completed checkpoints are kept (latest: {latest.name})") if latest else "no checkpoint was completed"))
        raise SystemExit(143 if terminated else 130) from None
    finally:
        # Order matters: kill the actors first (one may still be writing a checkpoint), then delete this
        # process's partial checkpoint folder, then stop the local cluster. A second Ctrl-C or SIGTERM
        # while cleaning up is ignored so that the cleanup finishes.
        with _cleanup_shielded(not clean, caller_term):
            if logger is not None:
                logger.close()
            if generators is not None:
                generators.shutdown(timeout=60 if clean else 10)
            if ckpt is not None:
                ckpt.discard_partial()
            shutdown_ray(started_ray)


def evaluate(loaded) -> dict[str, float]:
    """Greedy pass@1 (strict and flexible) of ``trainer.policy.model.path`` on ``data.val_data``
    without training (``rlctl eval``). Returns the ``eval/*`` metrics.

    Raises:
        KeyboardInterrupt: Ctrl-C; :class:`Terminated` (a KeyboardInterrupt) on SIGTERM; Ray is shut down first.
    """
    from rlctl import loop

    cfg = loaded.cfg
    device = resolve_device(cfg)
    tokenizer, stops = _load_tokenizer_and_stops(cfg)
    val = _load_prompts(cfg.data.val_data, tokenizer, cfg.trainer.max_prompt_length)
    _restore_ctrl_c()
    caller_term = _stop_cleanly_on_sigterm()
    started_ray = False
    generators = None
    try:
        started_ray = init_ray(cfg, device)
        _stop_cleanly_on_sigterm()
        _, generators = build_groups(cfg, device, with_trainer=False)
        sampling = loop.eval_sampling_from(cfg, stops)
        return loop.evaluate(generators.generate, val, tokenizer, sampling, cfg.trainer.eval_batch_size,
                             cfg.generator.eval_n_samples_per_prompt)
    finally:
        with _cleanup_shielded(True, caller_term):
            if generators is not None:
                generators.shutdown()
            shutdown_ray(started_ray)


def _record_placement(cfg, actor_nodes: dict[str, dict[str, str]], run_dir: Path, console) -> None:
    """Write ``placement.json`` (actor label -> ``{"node_id", "ip"}``, as each actor reported it) into the run
    folder; on more than one Ray node also print which actors share which node, and warn when trainer-0 (the
    checkpoint writer) is not on the driver's node (the driver completes and renames the checkpoint folder)."""
    import json

    from rlctl.job.placement import describe_nodes
    from rlctl.metrics import write_text_atomic

    write_text_atomic(run_dir / "placement.json", json.dumps(actor_nodes, indent=1) + "\n")
    nodes = {w["node_id"] for w in actor_nodes.values()}
    if len(nodes) > 1 or cfg.trainer.placement.policy_num_nodes > 1:
        console.log(f"placement on {len(nodes)} Ray nodes: " + _escape(describe_nodes(actor_nodes)))
        import ray

        rank0 = actor_nodes.get("trainer-0")
        if rank0 and rank0["node_id"] != ray.get_runtime_context().get_node_id():
            console.log(f"[yellow]warning:[/yellow] trainer-0 (which writes the checkpoints) runs on node "
                        f"{rank0['node_id'][:8]} ({rank0['ip']}), not on this driver's node: trainer.ckpt_path must be "
                        "on a filesystem both nodes share, or checkpoints are incomplete (README, \"Several nodes\")")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _loggers(cfg) -> list[str]:
    lg = cfg.trainer.logger
    return [lg] if isinstance(lg, str) else list(lg)

