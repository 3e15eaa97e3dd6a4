"""How the policy weights travel from the trainer ranks to the generator engines: one small interface,
three transports, chosen in one place (:func:`choose_transport`).

=================  ==========================================  =============================================
transport          when                                        how
=================  ==========================================  =============================================
``CudaIpc``        colocated SGLang (engine on the rank's GPU)  CUDA IPC handles of the bucket
                                                               (``update_weights_from_tensor``)
``ObjectStore``    colocated ``hf`` generator                   CPU tensors through Ray's object store
``Broadcast``      split placement (engines on their own GPUs)  trainer rank 0 broadcasts each bucket over the
                                                               weight-update group (NCCL / gloo)
=================  ==========================================  =============================================

A transport is a small picklable object: the driver picks it, :class:`rlctl.job.groups.TrainerGroup` asks it
which engines each rank serves (:meth:`WeightTransport.targets`) and every trainer rank calls
:meth:`WeightTransport.send` once per bucket inside its actor (a rank with no engine of its own only when
:attr:`WeightTransport.gathers`).

Tensor-parallel SGLang engines (N = ``generator.inference_engine_tensor_parallel_size`` > 1):

* colocated (``CudaIpc(tp_size=N)``): engine j runs TP rank k on the GPU of trainer rank ``j*N + k``. Every
  rank serializes its own full bucket (CUDA IPC handles into its GPU, mapped by GPU UUID after SGLang's
  ``monkey_patch_torch_reductions``); the handles are all-gathered over the trainer's process group, and rank
  ``j*N`` sends engine j one :class:`rlctl.weight_sync.TensorParallelPayload` of the N handles in TP-rank
  order: SGLang passes ``serialized_named_tensors=[h_0, ..., h_{N-1}]`` through and TP rank k deserializes
  entry k (``tp_worker.update_weights_from_tensor``), which lives on its own GPU. A barrier after each bucket
  keeps every rank's bucket alive until its engine loaded it. This is verl's way of feeding a TP engine
  (``fsdp_sglang`` sharding manager: gather the per-rank handles to the engine's first rank), written for rlctl.
* split (``Broadcast``): unchanged; SGLang's TP rank k joins the weight-update group as rank
  ``rank_offset + k`` (:func:`weight_group_ranks`), so trainer rank 0's broadcast reaches every engine rank.

Test: ``pytest tests/unit/test_transport.py`` (choice, targets, the TP gather with fakes),
``tests/unit/test_train_e2e.py`` (object store and broadcast over gloo through Ray), ``tests/gpu/`` (CUDA IPC
and NCCL; TP engines have not run on GPUs yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

WEIGHT_GROUP = "rlctl_weights"  # the split-placement weight-update process group


def _wait_all(refs: list) -> list:
    """``ray.get(refs)`` (one seam, so CPU tests can drive a transport with fake engines)."""
    import ray

    return ray.get(refs)


def weight_group_ranks(num_engines: int, tp_size: int) -> tuple[int, list[int]]:
    """The split-placement weight-update group: its world size and each engine's ``rank_offset``.

    Trainer rank 0 is rank 0; engine i's TP rank k is rank ``1 + i * tp_size + k`` (SGLang's
    ``init_weights_update_group`` joins TP rank k as ``rank_offset + k``).

    Returns:
        ``(1 + num_engines * tp_size, [1 + i * tp_size for each engine i])``.
    """
    return 1 + num_engines * tp_size, [1 + i * tp_size for i in range(num_engines)]


class WeightTransport(Protocol):
    """Sends one bucket of full (unsharded) weights from a trainer rank to its engines."""

    name: ClassVar[str]
    #: every trainer rank calls :meth:`send` for every bucket, also ranks without an engine of their own
    #: (the transport runs collectives over the trainer group)
    gathers: bool

    def targets(self, generators: list, world_size: int) -> list[list]:
        """Engines served by each trainer rank: ``world_size`` lists of actor handles (possibly empty).
        Every rank still walks every bucket (materializing FSDP2 ``DTensor`` parameters is collective)."""
        ...

    def send(self, bucket: list, generators: list, worker: Any) -> None:
        """Deliver ``bucket`` (``[(hf_name, tensor)]``, tensors on the rank's device) to ``generators``
        and return once every one of them has loaded it (``bucket`` must stay alive until then).
        ``worker`` is the calling :class:`rlctl.job.actors.TrainerWorker` (its config and weight group)."""
        ...


def _colocated_targets(generators: list, world_size: int) -> list[list]:
    # generator j shares bundle j % world_size with trainer rank j % world_size
    return [[g for j, g in enumerate(generators) if j % world_size == r] for r in range(world_size)]


@dataclass(frozen=True)
class CudaIpc:
    """Colocated SGLang: CUDA IPC handles of the (flattened) bucket, ``update_weights_from_tensor``.

    ``tp_size`` (N): GPUs per engine. N = 1: each rank sends its handles to the engines on its GPU. N > 1:
    see the module doc (all-gather of the handles, rank ``j*N`` sends engine j all N in TP-rank order).
    """

    name: ClassVar[str] = "ipc"
    tp_size: int = 1

    @property
    def gathers(self) -> bool:
        return self.tp_size > 1

    def targets(self, generators: list, world_size: int) -> list[list]:
        """N = 1: engine j from rank ``j % world_size``; N > 1: engine j from rank ``j * N`` only."""
        if self.tp_size == 1:
            return _colocated_targets(generators, world_size)
        n = self.tp_size
        return [[generators[r // n]] if r % n == 0 and r // n < len(generators) else [] for r in range(world_size)]

    def send(self, bucket: list, generators: list, worker: Any) -> None:
        """N > 1 needs ``worker.rank``, ``worker.all_gather_object(obj) -> list`` (one entry per trainer rank,
        rank order) and ``worker.barrier()``; every rank must call it for every bucket."""
        from rlctl.weight_sync import TensorParallelPayload, serialize_for_ipc

        payload = serialize_for_ipc(bucket)
        if self.tp_size == 1:
            _wait_all([g.update_weights.remote(payload) for g in generators])
            return
        everyone = worker.all_gather_object(payload)  # pickled: handles only, no tensor data
        if generators:
            mine = TensorParallelPayload(tuple(everyone[worker.rank:worker.rank + self.tp_size]))
            _wait_all([g.update_weights.remote(mine) for g in generators])
        worker.barrier()  # no rank drops its bucket (``payload`` holds it) before the engine has loaded it


@dataclass(frozen=True)
class ObjectStore:
    """Colocated ``hf`` generator: CPU copies of the bucket through Ray's object store."""

    name: ClassVar[str] = "object"
    gathers: ClassVar[bool] = False

    def targets(self, generators: list, world_size: int) -> list[list]:
        return _colocated_targets(generators, world_size)

    def send(self, bucket: list, generators: list, worker: Any) -> None:
        import ray

        payload = [(name, t.detach().to("cpu")) for name, t in bucket]
        _wait_all([g.update_weights.remote(payload) for g in generators])


@dataclass(frozen=True)
class Broadcast:
    """Split placement: trainer rank 0 broadcasts each bucket over the weight-update group while every engine
    receives it (``update_weights_from_distributed``). Errors name the side that gave up."""

    name: ClassVar[str] = "broadcast"
    gathers: ClassVar[bool] = False

    def targets(self, generators: list, world_size: int) -> list[list]:
        return [list(generators)] + [[] for _ in range(world_size - 1)]

    def send(self, bucket: list, generators: list, worker: Any) -> None:
        import ray

        from rlctl.weight_sync import FLATTENED, WeightSyncError, broadcast_bucket, bucket_metadata

        timeout = worker.cfg.generator.weight_sync_timeout_s
        refs = [g.update_weights_from_distributed.remote(*bucket_metadata(bucket), WEIGHT_GROUP, FLATTENED, timeout)
                for g in generators]

        def engine_failed() -> None:  # raises the error of an engine whose call already failed
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            ray.get(done)

        try:
            broadcast_bucket(bucket, worker.weight_group, load_format=FLATTENED, timeout_s=timeout, check=engine_failed)
        except WeightSyncError:
            # an engine that failed first explains the hang better: raise its error if it has one
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
            ray.get(done)
            raise
        ray.get(refs)


def choose_transport(backend: str, colocated: bool, tp_size: int = 1) -> WeightTransport:
    """The one place a weight transport is chosen.

    Args:
        backend: ``generator.backend`` (``sglang`` or ``hf``).
        colocated: ``trainer.placement.colocate_all`` (engines share the trainer ranks' bundles).
        tp_size: ``generator.inference_engine_tensor_parallel_size`` (GPUs per engine).
    Returns:
        :class:`Broadcast` for split placement (it reaches every TP rank of every engine), else
        ``CudaIpc(tp_size)`` for SGLang and :class:`ObjectStore` for hf.
    Raises:
        ValueError: ``tp_size`` > 1 with the hf backend, or below 1.
    """
    if tp_size < 1 or (tp_size > 1 and backend != "sglang"):
        raise ValueError(f"generator.inference_engine_tensor_parallel_size={tp_size}: tensor-parallel engines "
                         f"need generator.backend=sglang and a size >= 1 (backend is {backend})")
    if not colocated:
        return Broadcast()
    return CudaIpc(tp_size) if backend == "sglang" else ObjectStore()
