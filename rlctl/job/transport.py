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
:meth:`WeightTransport.send` once per bucket inside its actor.

Test: ``pytest tests/unit/test_transport.py`` (choice and targets), ``tests/unit/test_train_e2e.py``
(object store and broadcast over gloo through Ray), ``tests/gpu/`` (CUDA IPC and NCCL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

WEIGHT_GROUP = "rlctl_weights"  # the split-placement weight-update process group


class WeightTransport(Protocol):
    """Sends one bucket of full (unsharded) weights from a trainer rank to its engines."""

    name: ClassVar[str]

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
    """Colocated SGLang: CUDA IPC handles of the (flattened) bucket, ``update_weights_from_tensor``."""

    name: ClassVar[str] = "ipc"

    def targets(self, generators: list, world_size: int) -> list[list]:
        return _colocated_targets(generators, world_size)

    def send(self, bucket: list, generators: list, worker: Any) -> None:
        import ray

        from rlctl.weight_sync import serialize_for_ipc

        payload = serialize_for_ipc(bucket)
        ray.get([g.update_weights.remote(payload) for g in generators])


@dataclass(frozen=True)
class ObjectStore:
    """Colocated ``hf`` generator: CPU copies of the bucket through Ray's object store."""

    name: ClassVar[str] = "object"

    def targets(self, generators: list, world_size: int) -> list[list]:
        return _colocated_targets(generators, world_size)

    def send(self, bucket: list, generators: list, worker: Any) -> None:
        import ray

        payload = [(name, t.detach().to("cpu")) for name, t in bucket]
        ray.get([g.update_weights.remote(payload) for g in generators])


@dataclass(frozen=True)
class Broadcast:
    """Split placement: trainer rank 0 broadcasts each bucket over the weight-update group while every engine
    receives it (``update_weights_from_distributed``). Errors name the side that gave up."""

    name: ClassVar[str] = "broadcast"

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


def choose_transport(backend: str, colocated: bool) -> WeightTransport:
    """The one place a weight transport is chosen.

    Args:
        backend: ``generator.backend`` (``sglang`` or ``hf``).
        colocated: ``trainer.placement.colocate_all`` (engines share the trainer ranks' bundles).
    Returns:
        :class:`Broadcast` for split placement, else :class:`CudaIpc` for SGLang and :class:`ObjectStore` for hf.
    """
    if not colocated:
        return Broadcast()
    return CudaIpc() if backend == "sglang" else ObjectStore()
