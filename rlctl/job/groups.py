"""Driver-side handles of the Ray actors: :class:`TrainerGroup` (the data-parallel trainer ranks, called like
one trainer) and :class:`GeneratorGroup` (the engines, called like one generator), plus :func:`get_all`, a
``ray.get`` that fails as soon as any actor fails. Who holds the GPU is not decided here: that is
:class:`rlctl.colocation.Colocation`; these groups only carry out its transitions.

Test: ``pytest tests/unit/test_train_e2e.py`` (through Ray), ``tests/unit/test_colocation.py`` (the loop with fakes).
"""

from __future__ import annotations

from typing import Sequence

from rlctl.generator import GenerationOutput, Sampling, derive_seed



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


#: train_step metrics that are per-rank counts: the group reports their sum over ranks, not the mean
SUMMED_METRICS = ("train/computed_tokens",)


def merge_rank_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """One metrics dict from the ranks' train_step metrics: the mean over ranks, the sum for
    :data:`SUMMED_METRICS`."""
    return {k: sum(r[k] for r in results) / (1 if k in SUMMED_METRICS else len(results)) for k in results[0]}


class TrainerGroup:
    """The data-parallel trainer workers, called like one trainer (batches are split by rank).

    Residency is decided by :class:`rlctl.colocation.Colocation`; ``onload`` / ``offload`` here just carry it out
    (each worker's trainer makes them no-ops off a shared GPU).
    """

    def __init__(self, workers: list) -> None:
        self.workers = workers
        self.world_size = len(workers)

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
        """Every rank's :meth:`rlctl.trainer.PolicyTrainer.train_step` on its shard; metrics are averaged
        over ranks, except the counts in :data:`SUMMED_METRICS`, which are summed."""
        results = get_all([w.train_step.remote(s, temperature, mini_batch_size)
                           for w, s in zip(self.workers, self._shards(batch))])
        return merge_rank_metrics(results)

    def onload(self) -> None:
        get_all([w.onload.remote() for w in self.workers])

    def offload(self) -> None:
        get_all([w.offload.remote() for w in self.workers])

    def memory_reserved(self) -> int:
        """The largest CUDA reserve of any rank, in bytes (0 on CPU)."""
        return max(get_all([w.memory_reserved.remote() for w in self.workers]))

    def push_weights(self, generators: "GeneratorGroup") -> dict[str, float]:
        """Send the policy weights to ``generators`` through their transport (``generators.transport``, a
        :class:`rlctl.job.transport.WeightTransport`): colocated, generator j gets them from rank
        ``j % world_size`` (its bundle's rank), or with tensor-parallel engines of N GPUs from rank ``j*N``,
        which gathers the CUDA IPC handles of ranks ``j*N .. j*N+N-1``; split, rank 0 broadcasts to all. Every rank takes part in
        gathering the full tensors. Returns rank 0's stats (bytes, buckets, seconds)."""
        transport = generators.transport
        targets = transport.targets(list(generators.workers), self.world_size)
        stats = get_all([w.push_weights.remote(t, transport) for w, t in zip(self.workers, targets)])
        return stats[0]

    def save_checkpoint(self, policy_dir, state_path, model_path, extra) -> None:
        get_all([w.save_checkpoint.remote(str(policy_dir), str(state_path), model_path, extra)
                 for w in self.workers])

    def load_checkpoint(self, policy_dir, state_path) -> dict:
        return get_all([w.load_checkpoint.remote(str(policy_dir), str(state_path)) for w in self.workers])[0]


class GeneratorGroup:
    """The generator engines, called like one generator (prompts are split across engines).

    ``transport`` (:func:`rlctl.job.transport.choose_transport`) says how weights reach them. Sleep and wake
    are carried out on :class:`rlctl.colocation.Colocation`'s order; nothing here tracks residency.
    """

    def __init__(self, workers: list, backend: str, colocated: bool, tp_size: int = 1) -> None:
        from rlctl.job.transport import choose_transport

        self.workers, self.backend, self.colocated, self.tp_size = workers, backend, colocated, tp_size
        self.transport = choose_transport(backend, colocated, tp_size)
        self._stats: dict[str, float] = {}

    def initial_state(self) -> str:
        """The engines' state right after they were built: a colocated SGLang engine sleeps at once
        (``rlctl.generator.sglang``), every other engine starts awake with the model's weights."""
        return "asleep" if self.colocated and self.backend == "sglang" else "awake"

    def init_weight_sync(self, trainers: TrainerGroup, backend: str, timeout_s: float, tp_size: int = 1) -> None:
        """Split placement: form the weight-update process group -- trainer rank 0 as rank 0, engine i's
        ranks from ``1 + i * tp_size`` -- all members joining at once, each with ``timeout_s``. Every weight
        push is then a broadcast over it (``backend``: nccl on GPUs, gloo on CPU).

        Raises (through Ray): ``WeightSyncError`` naming the side (trainer or engine) that failed.
        """
        from rlctl.job.transport import WEIGHT_GROUP, weight_group_ranks

        addr, port = get_all([trainers.workers[0].address.remote()])[0]
        world, offsets = weight_group_ranks(len(self.workers), tp_size)
        refs = [w.init_weights_update_group.remote(addr, port, off, world, WEIGHT_GROUP, backend, timeout_s)
                for off, w in zip(offsets, self.workers)]
        refs.append(trainers.workers[0].init_weight_group.remote(addr, port, world, WEIGHT_GROUP, backend, timeout_s))
        get_all(refs)

    def wake_up(self, tags: list[str]) -> None:
        get_all([w.wake_up.remote(tags) for w in self.workers])

    def sleep(self) -> None:
        get_all([w.sleep.remote() for w in self.workers])

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling) -> GenerationOutput:
        """Split prompts across engines (contiguous, balanced), generate, merge in order. Engine i samples
        with ``derive_seed(sampling.seed, i)`` (independent seed streams per engine)."""
        return self.collect(self.generate_async(prompt_ids, sampling))

    def generate_async(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling) -> list:
        """:meth:`generate` without waiting: the engines' Ray object refs (one per engine that got prompts),
        to pass to :meth:`collect`. The one-step-off loop starts the next step's rollouts with it and trains
        meanwhile."""
        k = len(self.workers)
        n = len(prompt_ids)
        bounds = [round(i * n / k) for i in range(k + 1)]
        refs = []
        for i, w in enumerate(self.workers):
            chunk = [list(p) for p in prompt_ids[bounds[i]:bounds[i + 1]]]
            s = sampling if sampling.seed is None else Sampling(**{**sampling.__dict__, "seed": derive_seed(sampling.seed, i)})
            if chunk:
                refs.append(w.generate.remote(chunk, s))
        return refs

    def collect(self, refs: list) -> GenerationOutput:
        """Wait for the refs of :meth:`generate_async` (failing as soon as one engine fails) and merge the
        engines' outputs in prompt order."""
        outs = get_all(refs)
        merged = GenerationOutput([], [], [])
        for o in outs:
            self._stats.update({f"engine_{k}": v for k, v in (o.stats or {}).items()})
            merged.output_ids += o.output_ids
            merged.logprobs += o.logprobs
            merged.finish_reasons += o.finish_reasons
        return merged

    def last_stats(self) -> dict[str, float]:
        """Engine 0's stats (it stands for all) merged with the per-request ones; numbers only."""
        self._stats.update(get_all([self.workers[0].stats.remote()])[0])
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
        for pg in getattr(self, "placement_groups", []):  # set by build_groups: one per policy node (or one)
            remove_placement_group(pg)
