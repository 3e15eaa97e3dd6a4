"""The Ray cluster of a job: device resolution, ``ray.init`` (with a watchdog that kills a local cluster when the
driver dies), the placement group, and the actors (the only place ``ray.remote`` is applied).

Layout (:mod:`rlctl.job.placement`): one placement-group bundle per policy rank, ``policy_num_gpus_per_node`` of
them on each of ``policy_num_nodes`` nodes; when ``trainer.placement.colocate_all`` the bundle holds that rank's
trainer worker *and* one generator, each taking half of the bundle's GPU and CPU (the fractional resources
express the sharing; sleep/wake makes it real). Split placement adds one bundle per engine. A tensor-parallel
SGLang engine (``generator.inference_engine_tensor_parallel_size`` = N > 1) has N one-GPU bundles and is told
their physical GPU ids (:func:`rlctl.job.placement.bundle_gpu_ids`). Trainer workers form one data-parallel
FSDP2 group (gloo on CPU, NCCL on CUDA); its rendezvous is rank 0's node IP.

Test: ``pytest tests/unit/test_train_e2e.py``, ``tests/unit/test_multinode.py`` (two Ray nodes) and
``tests/unit/test_faults.py`` (the watchdog).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlctl.job.actors import GeneratorWorker, TrainerWorker
from rlctl.job.groups import ACTOR_LABELS, GeneratorGroup, TrainerGroup, get_all


def resolve_device(cfg) -> str:
    """``trainer.device``: ``auto`` is ``cuda`` when a GPU is visible, else ``cpu``."""
    if cfg.trainer.device != "auto":
        return cfg.trainer.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device_rules(cfg, device: str) -> None:
    """The config rules that depend on the device ``trainer.device=auto`` resolves to, checked before Ray
    starts (``check-config`` cannot know it without importing torch).

    Raises:
        rlctl.config.ConfigError: split placement on the CPU with ``generator.weight_sync_backend=nccl``.
    """
    from rlctl.config import ConfigError

    if device == "cpu" and not cfg.trainer.placement.colocate_all and cfg.generator.weight_sync_backend == "nccl":
        raise ConfigError("generator.weight_sync_backend=nccl: NCCL needs CUDA GPUs, but trainer.device="
                          f"{cfg.trainer.device} found none, so this run is on the CPU; split placement broadcasts "
                          "weights over gloo there: set generator.weight_sync_backend=gloo")


TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenAuthNotice(logging.Filter):
    """Drops Ray's "Token authentication is enabled ..." notice (Ray >= 2.5x prints it at every ``ray.init`` that
    starts a local cluster with token authentication on by default). Token authentication itself stays on; the
    opposite warning (authentication *disabled*, a user's explicit choice) still prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TOKEN_AUTH_NOTICE)


def quiet_token_auth_notice() -> None:
    """Install :class:`_DropTokenAuthNotice` on Ray's token-setup logger of this process (idempotent)."""
    log = logging.getLogger(TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropTokenAuthNotice) for f in log.filters):
        log.addFilter(_DropTokenAuthNotice())


def init_ray(cfg, device: str) -> bool:
    """Join ``ray.address`` / ``RAY_ADDRESS`` if given, else start a local cluster with explicit
    CPU/GPU counts (so it works on 2 cores). The dashboard is off unless ``ray.include_dashboard``.

    Returns True when this call started a local cluster (the caller shuts it down at the end).
    """
    import ray

    if ray.is_initialized():
        return False
    quiet_token_auth_notice()
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return False
    workers = cfg.num_policy_workers
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, workers * (1 if cfg.trainer.placement.colocate_all else 2))
    if cfg.ray.num_gpus is not None:
        num_gpus = cfg.ray.num_gpus
    else:
        import torch

        num_gpus = torch.cuda.device_count() if device == "cuda" else 0
    _start_reaper()  # the local cluster dies with this process, however it dies (see below)
    try:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host=cfg.ray.dashboard_host, runtime_env={"env_vars": env}, log_to_driver=True,
                 configure_logging=True, logging_level="WARNING")
    except BaseException:
        _stop_reaper()
        raise
    _tell_reaper_session()
    return True


def _tell_reaper_session() -> None:
    """Give the watchdog the new cluster's session folder: Ray's agents, which may lack the environment
    marker, rename their command line but keep files in that folder open."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
        if _reaper is not None and session:
            _reaper.stdin.write(os.fsencode(session) + b"\n")
            _reaper.stdin.flush()
    except Exception:  # noqa: BLE001 - best effort: the environment marker still covers the rest
        pass


# ---------------------------------------------------------------------------------------------- reaper
# Ray 2.60 ties the local cluster's GCS, raylet, dashboard and monitor to the driver with
# PR_SET_PDEATHSIG, and workers exit when their raylet goes. But the raylet's agents (DashboardAgent,
# RuntimeEnvAgent) do not: after a SIGKILL of the driver alone (not its process group) they were still
# alive 30 s later (they try to report the raylet's death to the dead GCS). Workers also run in process
# groups of their own, so even ``kill -9 -<pgid>`` relies on that chain. rlctl therefore starts a tiny
# watchdog with a local cluster: it holds the read end of a pipe from the driver; when the pipe closes
# (the driver exited, however it died) it SIGKILLs every process carrying this job's marker
# environment variable, which every Ray process of the cluster inherits from the driver.
# Test: tests/unit/test_faults.py (SIGKILL of the process group, SIGKILL of the driver alone).
REAPER_ENV = "RLCTL_RAY_OWNER"
_REAPER_CODE = r"""
import os, signal, sys, time
marker, driver = sys.argv[1].encode(), int(sys.argv[2])
# returns at EOF: the driver closed the pipe or died; what it wrote before are the cluster's session
# folders: processes naming one on their command line or holding a file in one open are the cluster's
# too (Ray's dashboard and runtime-env agents do not always inherit the marker)
sessions = [s for s in sys.stdin.buffer.read().split(b"\n") if s.strip()]
me = os.getpid()
try:  # state of the driver: alive (it closed the pipe after ray.shutdown()), or dead / a zombie
    with open(f"/proc/{driver}/stat", "rb") as f:
        alive = f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
except OSError:
    alive = False
# alive: one empty sweep will do; dead: sweep until 4 sweeps in a row (2 s) find nothing, since a
# process forked while its parent was being killed appears after that sweep (seen under load)
need = 1 if alive else 4
quiet = 0
for _ in range(40):
    found = False
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in (me, driver):
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                ours = marker in f.read().split(b"\0")
            if not ours and sessions:  # Ray's agents rename their command line but keep session files open
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
                ours = any(s in cmd for s in sessions)
                if not ours:
                    for fd in os.listdir(f"/proc/{d}/fd"):
                        try:
                            link = os.fsencode(os.readlink(f"/proc/{d}/fd/{fd}"))
                        except OSError:
                            continue
                        if any(link.startswith(s + b"/") for s in sessions):
                            ours = True
                            break
            if not ours:
                continue
            os.kill(int(d), signal.SIGKILL)
            found = True
        except OSError:
            pass
    quiet = 0 if found else quiet + 1
    if quiet >= need:
        break
    time.sleep(0.5)
"""
_reaper = None


def _start_reaper() -> None:
    """Start the watchdog (Linux only) and export the marker the cluster's processes inherit."""
    global _reaper
    import subprocess
    import uuid

    if _reaper is not None or not Path("/proc/self/environ").exists():
        return
    marker = f"{os.getpid()}-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != REAPER_ENV}
    try:
        _reaper = subprocess.Popen([sys.executable, "-c", _REAPER_CODE, f"{REAPER_ENV}={marker}", str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=env, start_new_session=True, close_fds=True)
    except OSError:
        return
    os.environ[REAPER_ENV] = marker


def _stop_reaper() -> None:
    """After ``ray.shutdown()``: let the watchdog kill any straggler now and exit; drop the marker so
    processes started later are not taken for the cluster's."""
    global _reaper
    os.environ.pop(REAPER_ENV, None)
    if _reaper is None:
        return
    try:
        _reaper.stdin.close()
        _reaper.wait(timeout=10)
    except Exception:  # noqa: BLE001 - best effort; it exits on its own once the pipe is closed
        pass
    _reaper = None


def shutdown_ray(started: bool) -> None:
    """``ray.shutdown()`` plus the watchdog's last sweep, if this process started the local cluster."""
    if not started:
        return
    import ray

    try:
        ray.shutdown()
    finally:
        _stop_reaper()


def generator_kwargs(cfg, device: str) -> dict[str, Any]:
    """Constructor arguments of the configured generator backend."""
    g = cfg.generator
    path = cfg.trainer.policy.model.path
    if g.backend == "hf":
        dtype = g.hf.dtype or ("float32" if device == "cpu" else g.model_dtype)
        return {"model_path": path, "dtype": dtype, "device": device, "seed": cfg.trainer.seed,
                "max_batch_size": g.hf.max_batch_size}
    s = g.sglang
    return {"model_path": path, "dtype": g.model_dtype, "mem_fraction_static": g.gpu_memory_utilization,
            "attention_backend": s.attention_backend, "sampling_backend": s.sampling_backend,
            "disable_cuda_graph": s.disable_cuda_graph, "cuda_graph_max_bs_decode": s.cuda_graph_max_bs_decode,
            "disable_radix_cache": s.disable_radix_cache, "max_running_requests": s.max_running_requests,
            "enable_memory_saver": s.enable_memory_saver, "sleep_on_idle": s.sleep_on_idle, "log_level": s.log_level,
            "seed": cfg.trainer.seed,
            "tp_size": g.inference_engine_tensor_parallel_size, "colocated": cfg.trainer.placement.colocate_all,
            **({} if s.disable_cuda_graph or s.prefill_cuda_graph else {"cuda_graph_backend_prefill": "disabled"})}


def start_in_order(gens: list, create_trainers: Callable[[], Any] | None,
                   setup_trainers: Callable[[Any], TrainerGroup] | None, colocated: bool,
                   wait: Callable[[list], Any]) -> TrainerGroup | None:
    """Build the engines (``GeneratorWorker.start``) and the trainer ranks in the order colocation needs.

    Colocated: every engine is built (and, being colocated, has released its GPU memory) before any trainer
    rank loads a model. SGLang sizes its KV cache once, at build, from the GPU memory free then
    (``mem_fraction_static`` of the card minus what others hold), so an engine built beside a loaded trainer
    gets a KV cache smaller by the trainer's share for the whole run, and the memory plan (which assumes the
    whole card) is wrong. The trainer processes are created (Ray worker start, torch / transformers imports:
    no GPU memory) while the engines build; only their ``setup`` (process group, model load) waits. Split
    placement: engines and trainer ranks start concurrently (own GPUs).

    Args:
        gens: generator actor handles (``.start.remote()``).
        create_trainers: creates the trainer rank actors (non-blocking), returns what ``setup_trainers`` takes;
            None without a trainer.
        setup_trainers: sets the created ranks up (loads the models), returns their group.
        colocated: trainer and engines share GPUs.
        wait: ``ray.get`` over a list of object refs (a start-up error surfaces here).
    Returns:
        The trainer group, or None.
    """
    starts = [g.start.remote() for g in gens]
    if create_trainers is None or setup_trainers is None:
        wait(starts)
        return None
    created = create_trainers()
    if colocated:
        wait(starts)
        return setup_trainers(created)
    trainers = setup_trainers(created)
    wait(starts)
    return trainers


def build_groups(cfg, device: str, with_trainer: bool = True) -> tuple[TrainerGroup | None, GeneratorGroup]:
    """Reserve the placement groups (:mod:`rlctl.job.placement`: one per policy node when
    ``trainer.placement.policy_num_nodes > 1``), create the actors in their bundles and return the groups.
    The generator group carries ``placement_groups`` (freed by its ``shutdown``) and ``actor_nodes`` (label ->
    ``{"node_id", "ip"}``, reported by each actor).

    Without a trainer (``rlctl eval``) the generators keep the weights they loaded (no sleep/wake).

    Raises:
        rlctl.job.placement.PlacementTimeout: the placement groups are not ready within ``ray.placement_group_timeout_s``.
        rlctl.config.ConfigError: see :func:`check_device_rules`.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rlctl.job.placement import bundle_gpu_ids, plan_placement, reserve

    if with_trainer:
        check_device_rules(cfg, device)  # train() checks it before Ray starts; this guards direct callers
    colocated = cfg.trainer.placement.colocate_all and with_trainer
    # without a trainer (rlctl eval) no trainer bundles are reserved: the engines get the GPUs
    workers = cfg.num_policy_workers if with_trainer else 0
    engines = cfg.generator.num_inference_engines
    gpu = 1 if device == "cuda" else 0
    pl = cfg.trainer.placement
    plan = plan_placement(pl.policy_num_nodes, pl.policy_num_gpus_per_node, engines,
                          cfg.generator.inference_engine_tensor_parallel_size, colocated, bool(gpu), with_trainer)
    pgs = reserve(plan, cfg.ray.placement_group_timeout_s)
    # CPU threads per actor: this machine's cores over the ranks (engines) that share a node with it
    per_node = (pl.policy_num_gpus_per_node if pl.policy_num_nodes > 1 else workers) or engines
    threads = max(1, (os.cpu_count() or 1) // max(1, per_node))
    share = 0.5 if colocated else 1.0

    def strategy(where: tuple[int, int]):
        return PlacementGroupSchedulingStrategy(placement_group=pgs[where[0]], placement_group_bundle_index=where[1])

    # Actors are named "<prefix>generator-<i>" / "<prefix>trainer-<rank>" (prefix unique per job, so runs
    # sharing a cluster or a Ray namespace never collide); errors name them by their short label.
    prefix = f"rlctl-{cfg.trainer.run_name}-{os.getpid()}-{time.time_ns() % 10**9}-"

    created: list = []  # every actor of this job, killed if building the groups fails part-way

    def named(label: str, handle):
        ACTOR_LABELS[handle._actor_id.hex()] = label
        created.append(handle)
        return handle

    tp = cfg.generator.inference_engine_tensor_parallel_size
    try:
        gen_cls = ray.remote(GeneratorWorker)
        gens = []
        for i in range(engines):
            # tp > 1: the actor holds (a share of) its first bundle's GPU and sees all of its engine's GPUs
            # through CUDA_VISIBLE_DEVICES (see rlctl.job.placement); tp = 1: one bundle of its own GPU
            gpus = (share if colocated else (1 if tp > 1 else tp)) if gpu else 0
            visible = bundle_gpu_ids(pgs, plan.engines[i].bundles) if gpu and tp > 1 else None
            gens.append(named(f"generator-{i}", gen_cls.options(
                name=f"{prefix}generator-{i}", num_cpus=share, num_gpus=gpus, scheduling_strategy=strategy(plan.engine_bundles[i]),
                max_concurrency=1).remote(cfg.generator.backend, {
                    **generator_kwargs(cfg, device),
                    **({} if cfg.generator.backend == "hf" else {"colocated": colocated})}, threads, f"generator-{i}",
                    visible)))
        def create_trainers():  # the processes start (imports, no GPU memory) while the engines build
            tr_cls = ray.remote(TrainerWorker)
            return [named(f"trainer-{r}", tr_cls.options(
                name=f"{prefix}trainer-{r}", num_cpus=share, num_gpus=share * gpu, scheduling_strategy=strategy(plan.rank_bundles[r]),
            ).remote(cfg, r, workers, device, threads)) for r in range(workers)]

        def setup_trainers(actors):
            addr, port = ray.get(actors[0].address.remote())
            get_all([a.setup.remote(addr, port) for a in actors])
            return TrainerGroup(actors)

        trainers = start_in_order(gens, create_trainers if with_trainer else None, setup_trainers, colocated, get_all)
        gen_group = GeneratorGroup(gens, cfg.generator.backend, colocated=colocated,
                                   tp_size=tp if cfg.generator.backend == "sglang" else 1)
        gen_group.placement_groups = pgs
        gen_group.trainer_actors = trainers.workers if trainers else []
        # where every actor runs, as each process reports it (trainer ranks first, then the engines)
        everyone = [(f"trainer-{r}", a) for r, a in enumerate(gen_group.trainer_actors)] + [
            (f"generator-{i}", g) for i, g in enumerate(gens)]
        gen_group.actor_nodes = dict(zip([lb for lb, _ in everyone], get_all([a.where.remote() for _, a in everyone])))
        if trainers is not None and not colocated:
            # an SGLang engine joins with one rank per tensor-parallel worker; an hf generator is one rank
            gen_group.init_weight_sync(trainers, cfg.generator.weight_sync_backend, cfg.generator.weight_sync_timeout_s,
                                       gen_group.tp_size)
        return trainers, gen_group
    except BaseException:
        # e.g. an engine that fails to start or a weight-update group that does not form: the caller has no
        # group to shut down yet, and on a shared (external) cluster nothing else would stop these actors
        from ray.util.placement_group import remove_placement_group

        for a in created:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort: the actor may be gone already
                pass
        for pg in pgs:
            remove_placement_group(pg)
        raise

