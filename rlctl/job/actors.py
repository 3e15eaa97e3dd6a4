"""The code that runs inside the Ray actors: one trainer rank (:class:`TrainerWorker`) and one generator engine
(:class:`GeneratorWorker`). Plain classes: ``ray.remote`` is applied where the job is built
(:func:`rlctl.job.cluster.build_groups`).

Test: ``pytest tests/unit/test_train_e2e.py`` (a real 2-worker run on CPU through Ray).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from rlctl.generator import GenerationOutput, Sampling


def _quiet_local_loading(model_path: str) -> None:
    """In an actor: no transformers progress bars for a local model (its "Loading weights" / "Writing model
    shards" bars interleave with the step lines); a hub model keeps them, its download shows progress."""
    if model_path and os.path.isdir(os.path.expanduser(model_path)):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _where() -> dict[str, str]:
    """The Ray node this actor process runs on: ``{"node_id": <hex>, "ip": <node IP>}``."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


class TrainerWorker:
    """Hosts one :class:`rlctl.trainer.PolicyTrainer` rank."""

    def __init__(self, cfg, rank: int, world_size: int, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        _quiet_local_loading(cfg.trainer.policy.model.path)
        # imported here, while colocated engines are still building (rlctl.job.cluster.start_in_order): importing
        # it (transformers, FSDP2) allocates no GPU memory; setup() then only loads
        import rlctl.trainer  # noqa: F401

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

    def where(self) -> dict[str, str]:
        """This rank's Ray node (id and IP), as the process itself sees it."""
        return _where()

    def setup(self, master_addr: str, master_port: int) -> None:
        from rlctl.trainer import PolicyTrainer

        PolicyTrainer.init_process_group(self.rank, self.world_size, master_addr, master_port, self.device)
        cfg = self.cfg
        self.trainer = PolicyTrainer(
            cfg.trainer.policy.model.path, cfg.trainer, rank=self.rank, world_size=self.world_size,
            device=self.device, max_response_len=cfg.generator.sampling_params.max_new_tokens,
            compute_dtype=cfg.generator.model_dtype, colocated=cfg.trainer.placement.colocate_all)
        self.trainer.diagnosis_dir = Path(cfg.run_dir) / "nonfinite"

    def compute_logprobs(self, batch, temperature: float, which: str):
        return self.trainer.compute_logprobs(batch, temperature, which)

    def train_step(self, batch, temperature: float, mini_batch_size: int) -> dict[str, float]:
        return self.trainer.train_step(batch, temperature, mini_batch_size)

    def offload(self) -> None:
        self.trainer.offload()

    def memory_reserved(self) -> int:
        """Bytes the CUDA caching allocator of this process holds (``torch.cuda.memory_reserved``); 0 on CPU."""
        import torch

        return int(torch.cuda.memory_reserved()) if self.device == "cuda" else 0

    def onload(self) -> None:
        self.trainer.onload()

    def init_weight_group(self, master_address: str, master_port: int, world_size: int, group_name: str,
                          backend: str, timeout_s: float) -> None:
        """Rank 0 only: join the split-placement weight-update group as its rank 0 (the broadcaster)."""
        from rlctl.weight_sync import init_trainer_weight_group

        self.weight_group = init_trainer_weight_group(master_address, master_port, world_size, group_name,
                                                      timeout_s=timeout_s, backend=backend)

    def push_weights(self, generators: list, transport) -> dict[str, float]:
        """Send the full policy weights to ``generators`` (actor handles, possibly none) in buckets of
        ``generator.weight_sync_bucket_mb`` through ``transport`` (a :class:`rlctl.job.transport.WeightTransport`).

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
            if generators or transport.gathers:
                # ``bucket`` stays alive until every engine has loaded it (CUDA IPC handles point into it)
                transport.send(bucket, generators, self)
            elif self.device == "cuda":
                # a rank with no engine of its own would otherwise queue every bucket's all-gather at once
                # while the sending rank waits on its engines bucket by bucket: keep the ranks in step
                torch.cuda.current_stream().synchronize()
            buckets += 1
            del bucket
        dt = time.perf_counter() - t0
        return {"weight_sync_bytes": float(nbytes), "weight_sync_buckets": float(buckets), "weight_sync_s": dt}

    def all_gather_object(self, obj) -> list:
        """``obj`` of every trainer rank, in rank order (``torch.distributed.all_gather_object`` over the
        trainer's process group; a collective: every rank calls it). Tensor-parallel weight sync gathers
        the ranks' CUDA IPC handles with it."""
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every trainer rank (``torch.distributed.barrier``; a collective)."""
        import torch.distributed as dist

        dist.barrier()

    def save_checkpoint(self, policy_dir, state_path, model_path, extra) -> None:
        self.trainer.save_checkpoint(Path(policy_dir), Path(state_path), model_path, extra)

    def load_checkpoint(self, policy_dir, state_path) -> dict:
        return self.trainer.load_checkpoint(Path(policy_dir), Path(state_path))


class GeneratorWorker:
    """Hosts one generator backend (``rlctl.generator.load_generator``).

    ``visible_devices`` (a tensor-parallel SGLang engine): the physical GPU ids of the engine's bundles in
    TP-rank order (:func:`rlctl.job.placement.bundle_gpu_ids`); they become this process's
    ``CUDA_VISIBLE_DEVICES`` before anything touches CUDA, so SGLang's schedulers (spawned with this
    environment) run TP rank k on GPU ``visible_devices[k]``. Ray alone would show the actor only its own GPU.
    """

    def __init__(self, backend: str, kwargs: dict, threads: int, label: str = "generator",
                 visible_devices: list[str] | None = None) -> None:
        # Nothing here can fail: Ray prints an error raised in an actor's constructor (its "creation task") as a
        # worker traceback on the driver's terminal, before rlctl's one-line message. The engine is built in
        # start(), whose error travels back to the caller like any method's.
        if visible_devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in visible_devices)
        self.backend, self.kwargs, self.threads, self.label = backend, kwargs, threads, label
        self.gen = None

    def start(self) -> None:
        """Build the generator backend (load the model, start the engine). Idempotent.

        Raises:
            Whatever the backend raises (ImportError for a missing SGLang, OSError for a bad model path, ...):
            the caller's ``ray.get`` gets it as a ``RayTaskError`` naming ``start``.
        """
        if self.gen is not None:
            return
        import torch

        torch.set_num_threads(max(1, self.threads))
        _quiet_local_loading(self.kwargs.get("model_path", ""))
        from rlctl.generator import load_generator

        self.gen = load_generator(self.backend, **self.kwargs)

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

    def where(self) -> dict[str, str]:
        """This engine's Ray node (id and IP), as the process itself sees it."""
        return _where()

    def stats(self) -> dict[str, float]:
        return dict(getattr(self.gen, "last_stats", {}) or {})

    def shutdown(self) -> None:
        self.gen.shutdown()

