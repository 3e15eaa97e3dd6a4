"""The Ray job: cluster connection, placement group, colocated actors, and the ``train`` / ``evaluate`` entry points.

This is the only module that applies ``ray.remote``. Layout: one placement-group bundle per policy rank;
when ``trainer.placement.colocate_all`` the bundle holds that rank's trainer worker *and* one generator,
each taking half of the bundle's GPU and CPU (the fractional resources express the sharing; sleep/wake
makes it real). Trainer workers form one data-parallel FSDP2 group (gloo on CPU, NCCL on CUDA).

``TrainerGroup`` and ``GeneratorGroup`` give the loop (``rlctl/loop.py``) plain method calls.

Test: ``pytest tests/unit/test_train_e2e.py`` (a real 2-worker run on CPU through Ray).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rlctl.generator import GenerationOutput, Sampling

# ---------------------------------------------------------------------------------------------- actors
# Plain classes; ray.remote is applied in _build_actors.


def _quiet_local_loading(model_path: str) -> None:
    """In an actor: no transformers progress bars for a local model (its "Loading weights" / "Writing model
    shards" bars interleave with the step lines); a hub model keeps them, its download shows progress."""
    if model_path and os.path.isdir(os.path.expanduser(model_path)):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class TrainerWorker:
    """Hosts one :class:`rlctl.trainer.PolicyTrainer` rank."""

    def __init__(self, cfg, rank: int, world_size: int, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        _quiet_local_loading(cfg.trainer.policy.model.path)
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.trainer = None

    def __repr__(self) -> str:  # Ray uses it in log prefixes and error reports
        return f"trainer-{self.rank}"

    def address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port (rank 0 hosts the process-group rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> None:
        from rlctl.trainer import PolicyTrainer

        PolicyTrainer.init_process_group(self.rank, self.world_size, master_addr, master_port, self.device)
        cfg = self.cfg
        self.trainer = PolicyTrainer(
            cfg.trainer.policy.model.path, cfg.trainer, rank=self.rank, world_size=self.world_size,
            device=self.device, max_response_len=cfg.generator.sampling_params.max_new_tokens,
            compute_dtype=cfg.generator.model_dtype, colocated=cfg.trainer.placement.colocate_all)

    def compute_logprobs(self, batch, temperature: float, which: str):
        return self.trainer.compute_logprobs(batch, temperature, which)

    def train_step(self, batch, temperature: float, mini_batch_size: int) -> dict[str, float]:
        return self.trainer.train_step(batch, temperature, mini_batch_size)

    def offload(self) -> None:
        self.trainer.offload()

    def onload(self) -> None:
        self.trainer.onload()

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, group_name: str,
                          backend: str, timeout_s: float) -> None:
        """Rank 0 only: join the split-placement weight-update group as its rank 0 (the broadcaster)."""
        from rlctl.weight_sync import init_trainer_weight_group

        self.weight_group = init_trainer_weight_group(master_address, master_port, world_size, group_name,
                                                      timeout_s=timeout_s, backend=backend)

    def push_weights(self, generators: list, transport: str) -> dict[str, float]:
        """Send the full policy weights to ``generators`` (actor handles, possibly none) in buckets.

        ``transport``: ``"ipc"`` (CUDA IPC handles, colocated SGLang), ``"object"`` (CPU tensors through
        Ray's object store, colocated hf) or ``"broadcast"`` (split placement: this rank broadcasts each
        bucket over the weight-update group while every generator receives it).

        Every rank walks all buckets even without a generator of its own: materializing FSDP2
        ``DTensor`` parameters (``full_tensor``) is a collective. Returns bytes / buckets / seconds.
        """
        import torch

        from rlctl.trainer import DTYPES

        dtype = DTYPES[self.cfg.generator.model_dtype] if self.device == "cuda" else torch.float32
        bucket_bytes = int(self.cfg.generator.weight_sync_bucket_mb * 2**20)
        t0, nbytes, buckets = time.perf_counter(), 0, 0
        for bucket in self.trainer.iter_weight_buckets(bucket_bytes, dtype):
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if generators:
                self._send_bucket(bucket, generators, transport)
            elif self.device == "cuda":
                # a rank with no engine of its own would otherwise queue every bucket's all-gather at once
                # while the sending rank waits on its engines bucket by bucket: keep the ranks in step
                torch.cuda.current_stream().synchronize()
            buckets += 1
            del bucket
        dt = time.perf_counter() - t0
        return {"weight_sync_bytes": float(nbytes), "weight_sync_buckets": float(buckets), "weight_sync_s": dt}

    def _send_bucket(self, bucket: list, generators: list, transport: str) -> None:
        import ray

        if transport == "broadcast":
            from rlctl.weight_sync import FLATTENED, WeightSyncError, broadcast_bucket, bucket_metadata

            timeout = self.cfg.generator.weight_sync_timeout_s
            refs = [g.update_weights_from_distributed.remote(*bucket_metadata(bucket), WEIGHT_GROUP, FLATTENED, timeout)
                    for g in generators]

            def engine_failed() -> None:  # raises the error of an engine whose call already failed
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                ray.get(done)

            try:
                broadcast_bucket(bucket, self.weight_group, load_format=FLATTENED, timeout_s=timeout, check=engine_failed)
            except WeightSyncError:
                # an engine that failed first explains the hang better: raise its error if it has one
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
                ray.get(done)
                raise
            ray.get(refs)
            return
        if transport == "ipc":
            from rlctl.weight_sync import serialize_for_ipc

            payload = serialize_for_ipc(bucket)
        elif transport == "object":
            payload = [(name, t.detach().to("cpu")) for name, t in bucket]
        else:
            raise ValueError(f"unknown weight transport {transport!r}")
        # keep ``bucket`` alive until every engine has loaded it (CUDA IPC handles point into it)
        ray.get([g.update_weights.remote(payload) for g in generators])
        del payload

    def save_checkpoint(self, policy_dir, state_path, model_path, extra) -> None:
        self.trainer.save_checkpoint(Path(policy_dir), Path(state_path), model_path, extra)

    def load_checkpoint(self, policy_dir, state_path) -> dict:
        return self.trainer.load_checkpoint(Path(policy_dir), Path(state_path))


class GeneratorWorker:
    """Hosts one generator backend (``rlctl.generator.load_generator``)."""

    def __init__(self, backend: str, kwargs: dict, threads: int, label: str = "generator") -> None:
        import torch

        self.label = label
        torch.set_num_threads(max(1, threads))
        _quiet_local_loading(kwargs.get("model_path", ""))
        from rlctl.generator import load_generator

        self.gen = load_generator(backend, **kwargs)

    def __repr__(self) -> str:  # Ray uses it in log prefixes and error reports
        return self.label

    def generate(self, prompt_ids, sampling: Sampling) -> GenerationOutput:
        return self.gen.generate(prompt_ids, sampling)

    def sleep(self) -> None:
        self.gen.sleep()

    def wake_up(self, tags=None) -> None:
        self.gen.wake_up(tags)

    def update_weights(self, payload) -> None:
        self.gen.update_weights(payload)

    def init_weights_update_group(self, *args) -> None:
        self.gen.init_weights_update_group(*args)

    def update_weights_from_distributed(self, *args) -> None:
        self.gen.update_weights_from_distributed(*args)

    def stats(self) -> dict[str, float]:
        return dict(getattr(self.gen, "last_stats", {}) or {})

    def shutdown(self) -> None:
        self.gen.shutdown()


# ---------------------------------------------------------------------------------------------- groups
WEIGHT_GROUP = "rlctl_weights"  # the split-placement weight-update process group

# Actor id (hex) -> "trainer-<rank>" / "generator-<i>", filled by build_groups; error messages use it.
ACTOR_LABELS: dict[str, str] = {}


def get_all(refs: list) -> list:
    """``ray.get(refs)`` that fails as soon as ANY of them fails.

    A plain ``ray.get`` of a list waits on the refs in order, so when one trainer rank dies while the
    others block in a collective (gloo/NCCL, default timeouts of many minutes), the error would only
    surface after that timeout. Here the first failed ref raises at once; the caller's shutdown then
    kills the blocked actors.
    """
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(ready)  # raises the actor's error
        except ray.exceptions.RayError as e:
            # a task error that crossed the process boundary has lost its actor's repr: tag it with
            # the label of the actor that ran the task (the ref's task id carries the actor id)
            try:
                label = ACTOR_LABELS.get(ready[0].task_id().actor_id().hex())
                if label and not getattr(e, "rlctl_actor", None):
                    e.rlctl_actor = label
            except Exception:  # noqa: BLE001 - labelling is best effort
                pass
            raise
    return ray.get(list(refs))


class TrainerGroup:
    """The data-parallel trainer workers, called like one trainer (batches are split by rank)."""

    def __init__(self, workers: list, colocated: bool) -> None:
        self.workers = workers
        self.world_size = len(workers)
        self.colocated = colocated
        self.on_gpu = True

    def _shards(self, batch: dict) -> list[dict]:
        n = batch["input_ids"].shape[0]
        per = n // self.world_size
        return [{k: v[r * per:(r + 1) * per] for k, v in batch.items()} for r in range(self.world_size)]

    def compute_logprobs(self, batch: dict, temperature: float, which: str):
        import torch

        outs = get_all([w.compute_logprobs.remote(s, temperature, which)
                          for w, s in zip(self.workers, self._shards(batch))])
        return torch.cat(outs, 0)

    def train_step(self, batch: dict, temperature: float, mini_batch_size: int) -> dict[str, float]:
        results = get_all([w.train_step.remote(s, temperature, mini_batch_size)
                             for w, s in zip(self.workers, self._shards(batch))])
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def onload(self) -> None:
        if not self.on_gpu:
            get_all([w.onload.remote() for w in self.workers])
            self.on_gpu = True

    def offload(self) -> None:
        if self.on_gpu and self.colocated:
            get_all([w.offload.remote() for w in self.workers])
            self.on_gpu = False

    def push_weights(self, generators: list, transport: str) -> dict[str, float]:
        """Colocated (``ipc`` / ``object``): generator j gets the weights from rank ``j % world_size``
        (its bundle's rank). ``broadcast``: rank 0 broadcasts to all generators at once. Every rank
        takes part in gathering the full tensors."""
        if transport == "broadcast":
            targets = [list(generators)] + [[] for _ in range(self.world_size - 1)]
        else:
            targets = [[g for j, g in enumerate(generators) if j % self.world_size == r] for r in range(self.world_size)]
        stats = get_all([w.push_weights.remote(t, transport) for w, t in zip(self.workers, targets)])
        return stats[0]

    def save_checkpoint(self, policy_dir, state_path, model_path, extra) -> None:
        self.onload()
        get_all([w.save_checkpoint.remote(str(policy_dir), str(state_path), model_path, extra)
                   for w in self.workers])

    def load_checkpoint(self, policy_dir, state_path) -> dict:
        self.onload()
        return get_all([w.load_checkpoint.remote(str(policy_dir), str(state_path)) for w in self.workers])[0]


class GeneratorGroup:
    """The generator engines, called like one generator (prompts are split across engines).

    Tracks whether the engines hold the current policy weights: ``generate`` releases all memory when
    colocated (SGLang discards released weights), so the next ``ensure_weights`` pushes them again.
    """

    def __init__(self, workers: list, backend: str, colocated: bool) -> None:
        self.workers, self.backend, self.colocated = workers, backend, colocated
        # how weights travel (TrainerWorker.push_weights); split placement switches to "broadcast" in
        # init_weight_sync
        self.transport = "ipc" if backend == "sglang" else "object"
        self.has_weights = False
        self._stats: dict[str, float] = {}

    def init_weight_sync(self, trainers: TrainerGroup, backend: str, timeout_s: float, tp_size: int = 1) -> None:
        """Split placement: form the weight-update process group -- trainer rank 0 as rank 0, engine i's
        ranks from ``1 + i * tp_size`` -- all members joining at once, each with ``timeout_s``. Afterwards
        every weight push is a broadcast over it (``backend``: nccl on GPUs, gloo on CPU).

        Raises (through Ray): ``WeightSyncError`` naming the side (trainer or engine) that failed.
        """
        addr, port = get_all([trainers.workers[0].address.remote()])[0]
        world = 1 + len(self.workers) * tp_size
        refs = [w.init_weights_update_group.remote(addr, port, 1 + i * tp_size, world, WEIGHT_GROUP, backend, timeout_s)
                for i, w in enumerate(self.workers)]
        refs.append(trainers.workers[0].init_weight_group.remote(addr, port, world, WEIGHT_GROUP, backend, timeout_s))
        get_all(refs)
        self.transport = "broadcast"

    def mark_stale(self) -> None:
        self.has_weights = False

    def ensure_weights(self, trainers: TrainerGroup) -> None:
        """If stale: wake the engines' weights, push the trainer's weights, offload the trainer."""
        if self.has_weights:
            return
        trainers.onload()
        if self.colocated:
            get_all([w.wake_up.remote(["weights"]) for w in self.workers])
        s = trainers.push_weights(self.workers, self.transport)
        self._stats.update(s)
        self.has_weights = True
        trainers.offload()

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling) -> GenerationOutput:
        """Split prompts across engines (contiguous, balanced), generate, merge in order."""
        k = len(self.workers)
        n = len(prompt_ids)
        bounds = [round(i * n / k) for i in range(k + 1)]
        if self.colocated:
            get_all([w.wake_up.remote(["kv_cache", "cuda_graph"]) for w in self.workers])
        refs = []
        for i, w in enumerate(self.workers):
            chunk = [list(p) for p in prompt_ids[bounds[i]:bounds[i + 1]]]
            s = sampling if sampling.seed is None else Sampling(**{**sampling.__dict__, "seed": sampling.seed + 7919 * i})
            refs.append(w.generate.remote(chunk, s) if chunk else None)
        outs = get_all([r for r in refs if r is not None])
        if self.colocated:
            get_all([w.sleep.remote() for w in self.workers])
            self.has_weights = False
        merged = GenerationOutput([], [], [])
        for o in outs:
            self._stats.update({f"engine_{k}": v for k, v in (o.stats or {}).items()})
            merged.output_ids += o.output_ids
            merged.logprobs += o.logprobs
            merged.finish_reasons += o.finish_reasons
        self._stats.update(get_all([self.workers[0].stats.remote()])[0])  # engine 0 stands for all
        return merged

    def last_stats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._stats.items() if isinstance(v, (int, float))}

    def shutdown(self, timeout: float = 60) -> None:
        """Shut the engines down (waiting at most ``timeout`` s), kill every actor of the job and free
        its placement group. After a failure or Ctrl-C ``train`` passes a short timeout: an engine
        still busy with a request (its actors run one call at a time) is killed instead."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=timeout)
        except Exception:  # noqa: BLE001 - best effort at exit; the actors are killed next
            pass
        for a in list(self.workers) + list(getattr(self, "trainer_actors", [])):
            ray.kill(a, no_restart=True)
        pg = getattr(self, "placement_group", None)
        if pg is not None:
            remove_placement_group(pg)


# ---------------------------------------------------------------------------------------------- build
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


def init_ray(cfg, device: str) -> bool:
    """Join ``ray.address`` / ``RAY_ADDRESS`` if given, else start a local cluster with explicit
    CPU/GPU counts (so it works on 2 cores). The dashboard is off unless ``ray.include_dashboard``.

    Returns True when this call started a local cluster (the caller shuts it down at the end).
    """
    import ray

    if ray.is_initialized():
        return False
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
            "enable_memory_saver": s.enable_memory_saver, "log_level": s.log_level, "seed": cfg.trainer.seed,
            "tp_size": g.inference_engine_tensor_parallel_size, "colocated": cfg.trainer.placement.colocate_all,
            **({} if s.disable_cuda_graph or s.prefill_cuda_graph else {"cuda_graph_backend_prefill": "disabled"})}


def build_groups(cfg, device: str, with_trainer: bool = True) -> tuple[TrainerGroup | None, GeneratorGroup]:
    """Create the placement group and the actors; wait for the placement group with a timeout.

    Without a trainer (``rlctl eval``) the generators keep the weights they loaded (no sleep/wake).
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if with_trainer:
        check_device_rules(cfg, device)  # train() checks it before Ray starts; this guards direct callers
    colocated = cfg.trainer.placement.colocate_all and with_trainer
    # without a trainer (rlctl eval) no trainer bundles are reserved: the engines get the GPUs
    workers = cfg.num_policy_workers if with_trainer else 0
    engines = cfg.generator.num_inference_engines
    gpu = 1 if device == "cuda" else 0
    if colocated:
        bundles = [{"CPU": 1, **({"GPU": 1} if gpu else {})} for _ in range(workers)]
    else:
        tp = cfg.generator.inference_engine_tensor_parallel_size
        bundles = ([{"CPU": 1, **({"GPU": 1} if gpu else {})} for _ in range(workers)]
                   + [{"CPU": 1, **({"GPU": tp} if gpu else {})} for _ in range(engines)])
    pg = placement_group(bundles, strategy="PACK")
    timeout = cfg.ray.placement_group_timeout_s
    try:
        ray.get(pg.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)  # a pending group would grab the resources once they free up
        raise RuntimeError(
            f"Ray could not reserve {len(bundles)} bundles {bundles[0]} within {timeout} s "
            f"(cluster has {ray.cluster_resources()}). Lower trainer.placement.policy_num_gpus_per_node / "
            "trainer.placement.policy_num_nodes / generator.num_inference_engines, set ray.num_cpus / "
            "ray.num_gpus, or raise ray.placement_group_timeout_s") from None
    threads = max(1, (os.cpu_count() or 1) // max(1, workers or engines))
    share = 0.5 if colocated else 1.0

    def strategy(i):
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

    # Actors are named "<prefix>generator-<i>" / "<prefix>trainer-<rank>" (prefix unique per job, so runs
    # sharing a cluster or a Ray namespace never collide); errors name them by their short label.
    prefix = f"rlctl-{cfg.trainer.run_name}-{os.getpid()}-{time.time_ns() % 10**9}-"

    created: list = []  # every actor of this job, killed if building the groups fails part-way

    def named(label: str, handle):
        ACTOR_LABELS[handle._actor_id.hex()] = label
        created.append(handle)
        return handle

    try:
        gen_cls = ray.remote(GeneratorWorker)
        gens = []
        for i in range(engines):
            b = i if colocated else workers + i
            gpus = (share if colocated else cfg.generator.inference_engine_tensor_parallel_size) if gpu else 0
            gens.append(named(f"generator-{i}", gen_cls.options(
                name=f"{prefix}generator-{i}", num_cpus=share, num_gpus=gpus, scheduling_strategy=strategy(b),
                max_concurrency=1).remote(cfg.generator.backend, {
                    **generator_kwargs(cfg, device),
                    **({} if cfg.generator.backend == "hf" else {"colocated": colocated})}, threads, f"generator-{i}")))
        trainers = None
        if with_trainer:
            tr_cls = ray.remote(TrainerWorker)
            actors = [named(f"trainer-{r}", tr_cls.options(
                name=f"{prefix}trainer-{r}", num_cpus=share, num_gpus=share * gpu, scheduling_strategy=strategy(r),
            ).remote(cfg, r, workers, device, threads)) for r in range(workers)]
            addr, port = ray.get(actors[0].address.remote())
            get_all([a.setup.remote(addr, port) for a in actors])
            trainers = TrainerGroup(actors, colocated=colocated and device == "cuda")
        gen_group = GeneratorGroup(gens, cfg.generator.backend, colocated=colocated)
        gen_group.placement_group = pg
        gen_group.trainer_actors = trainers.workers if trainers else []
        get_all([g.stats.remote() for g in gens])  # surface engine start-up errors here
        if trainers is not None and not colocated:
            # an SGLang engine joins with one rank per tensor-parallel worker; an hf generator is one rank
            tp = cfg.generator.inference_engine_tensor_parallel_size if cfg.generator.backend == "sglang" else 1
            gen_group.init_weight_sync(trainers, cfg.generator.weight_sync_backend, cfg.generator.weight_sync_timeout_s, tp)
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
        remove_placement_group(pg)
        raise


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


def train(loaded) -> dict[str, Any]:
    """Run the training job of a validated config (``rlctl train``). Returns the loop's summary.

    Raises:
        rlctl.config.ConfigError: a device-dependent config rule (:func:`check_device_rules`), before Ray starts.
        SystemExit: with a message naming the actor and its last error if an actor dies (code 1), or
            on Ctrl-C (code 130); Ray is shut down in both cases.
    """
    import ray

    from rlctl import loop
    from rlctl.checkpoint import Checkpointer, latest_checkpoint
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
    logger = RunLogger(run_dir, yaml.safe_dump(redacted, sort_keys=False), _loggers(cfg),
                       project=cfg.trainer.project_name, run_name=cfg.trainer.run_name, redacted_config=redacted,
                       console=console)
    notes: list[str] = []
    generators = None
    ckpt = None
    started_ray = False
    clean = False
    try:
        tokenizer, stops = _load_tokenizer_and_stops(cfg)
        train_data = _load_prompts(cfg.data.train_data, tokenizer, cfg.trainer.max_prompt_length)
        val_data = _load_prompts(cfg.data.val_data, tokenizer, cfg.trainer.max_prompt_length) if cfg.data.val_data else None
        if train_data.dropped_too_long:
            console.log(f"note: dropped {train_data.dropped_too_long} training prompts longer than "
                        f"trainer.max_prompt_length={cfg.trainer.max_prompt_length} tokens")
        t0 = time.perf_counter()
        started_ray = init_ray(cfg, device)
        trainers, generators = build_groups(cfg, device)
        console.log(f"Ray job up in {time.perf_counter() - t0:.1f} s: {trainers.world_size} trainer worker(s), "
                    f"{len(generators.workers)} {cfg.generator.backend} generator(s) on {device}; run folder {redact(str(run_dir))}")
        ckpt = Checkpointer(Path(cfg.ckpt_dir), cfg.trainer.policy.model.path, cfg.trainer.max_ckpts_to_keep,
                            cfg.trainer.resume_mode, cfg.trainer.resume_path, notes)
        summary = loop.run(cfg, trainers, generators, tokenizer, train_data, val_data, logger, ckpt, stops)
        last = summary["last_step"]
        latest = latest_checkpoint(Path(cfg.ckpt_dir))
        console.log(redact(f"done: {last} step{'s' if last != 1 else ''} ({summary['stopped_because']}); metrics in "
                           f"{run_dir / 'metrics.jsonl'}" + (f"; checkpoint {latest}" if latest else "")))
        clean = True
        return summary
    except ray.exceptions.RayError as e:
        console.print("[red]error:[/red] " + _escape(_describe_ray_error(e)) + "\n  completed checkpoints in "
                      + _escape(redact(str(cfg.ckpt_dir))) + " are kept (resume with trainer.resume_mode=latest)")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/yellow] stopping the Ray job; completed checkpoints are kept")
        raise SystemExit(130) from None
    finally:
        # Order matters: kill the actors first (one may still be writing a checkpoint), then delete this
        # process's partial checkpoint folder, then stop the local cluster. A second Ctrl-C while
        # cleaning up is ignored so that the cleanup finishes.
        import signal
        import threading

        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if not clean and main else None
        try:
            logger.close()
            if generators is not None:
                generators.shutdown(timeout=60 if clean else 10)
            if ckpt is not None:
                ckpt.discard_partial()
            shutdown_ray(started_ray)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)


def evaluate(loaded) -> dict[str, float]:
    """Greedy pass@1 (strict and flexible) of ``trainer.policy.model.path`` on ``data.val_data``
    without training (``rlctl eval``). Returns the ``eval/*`` metrics."""
    from rlctl import loop

    cfg = loaded.cfg
    device = resolve_device(cfg)
    tokenizer, stops = _load_tokenizer_and_stops(cfg)
    val = _load_prompts(cfg.data.val_data, tokenizer, cfg.trainer.max_prompt_length)
    started_ray = init_ray(cfg, device)
    generators = None
    try:
        _, generators = build_groups(cfg, device, with_trainer=False)
        sampling = loop.eval_sampling_from(cfg, stops)
        return loop.evaluate(generators, val, tokenizer, sampling, cfg.trainer.eval_batch_size, lambda: None)
    finally:
        if generators is not None:
            generators.shutdown()
        shutdown_ray(started_ray)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _loggers(cfg) -> list[str]:
    lg = cfg.trainer.logger
    return [lg] if isinstance(lg, str) else list(lg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `rlctl train`")
