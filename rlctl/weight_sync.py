"""Trainer-side weight sync: full policy weights in bounded buckets, and how they travel to SGLang.

Two transports, both fed by :func:`iter_weight_buckets`:

* **Colocated (CUDA IPC)**: the trainer and the engine share one GPU. :func:`serialize_for_ipc` turns
  a bucket of CUDA tensors into an :class:`IPCPayload` (bytes holding CUDA IPC handles, no tensor
  data), which crosses process boundaries (a Ray call) and is handed to
  ``SGLangGenerator.update_weights`` unchanged: the engine's scheduler opens the handles and loads
  the weights straight from the trainer's GPU memory.
* **Not colocated (NCCL)**: :func:`init_trainer_weight_group` joins the trainer (rank 0) to a
  process group with the engine's ranks (``SGLangGenerator.init_weights_update_group``), and
  :func:`broadcast_bucket` broadcasts each bucket while the engine receives it
  (``SGLangGenerator.update_weights_from_distributed`` with :func:`bucket_metadata`). Every blocking
  step has a timeout, and errors say which side (trainer or engine) failed.

This module imports only torch; SGLang helpers are used when importable (on the GPU machine).

Test: ``pytest tests/unit/test_weight_sync.py`` (CPU), ``tests/gpu/test_sglang_engine.py`` (GPU).
"""

from __future__ import annotations

import datetime
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "IPCPayload",
    "TensorParallelPayload",
    "hf_param_name",
    "iter_weight_buckets",
    "serialize_for_ipc",
    "bucket_metadata",
    "join_weight_group",
    "init_trainer_weight_group",
    "broadcast_bucket",
    "receive_bucket",
    "WeightSyncError",
]

# Wrapper prefixes that torch adds to parameter names (activation checkpointing, FSDP1, torch.compile).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")
_WRAPPER_RE = re.compile("|".join(re.escape(p) for p in _WRAPPER_PREFIXES))
# State-dict entries SGLang's loaders skip anyway (never worth sending).
_SKIP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

FLATTENED = "flattened_bucket"


class WeightSyncError(RuntimeError):
    """A weight sync step failed; the message names the side (trainer or engine) that failed."""


def hf_param_name(name: str) -> str:
    """Map a (possibly wrapped) module's parameter name to the Hugging Face checkpoint name.

    >>> hf_param_name("_orig_mod.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
    'model.layers.0.mlp.up_proj.weight'
    """
    return _WRAPPER_RE.sub("", name)


def _ties_embeddings(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    tie = getattr(cfg, "tie_word_embeddings", None)
    if tie is None and hasattr(cfg, "get_text_config"):  # multimodal configs keep it on the text config
        tie = getattr(cfg.get_text_config(), "tie_word_embeddings", False)
    return bool(tie)


def _materialize(t: torch.Tensor) -> torch.Tensor:
    """Full tensor of a parameter: ``DTensor.full_tensor()`` (a collective) or the tensor itself."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # type: ignore[assignment]
    if isinstance(t, DTensor):
        return t.full_tensor()
    return t


def iter_weight_buckets(
    model: torch.nn.Module,
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
    *,
    device: torch.device | str | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the model's full weights as lists of ``(hf_name, tensor)``, each of at most ``bucket_bytes``.

    Walks ``model.state_dict()`` in order. FSDP2 ``DTensor`` entries are materialized with
    ``full_tensor()``, a collective: **every rank must run this iterator to the end** in lockstep
    (non-zero ranks may simply discard the buckets). Tensors are cast to ``dtype`` (the generator's
    dtype, e.g. ``torch.bfloat16``) and moved to ``device`` when given; sizes are counted after the
    cast. A tensor larger than ``bucket_bytes`` travels alone in its own bucket, so peak extra
    memory is about ``max(bucket_bytes, largest tensor) + largest tensor``.

    Names are Hugging Face checkpoint names (wrapper prefixes such as ``_orig_mod.`` or
    ``_checkpoint_wrapped_module.`` removed). ``lm_head.weight`` is skipped when the model ties it to
    the input embeddings (SGLang's Llama/Qwen2 loaders ignore it then), and so are rotary caches.
    A consumer must be done with a bucket before asking for the next (the iterator drops it).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    tied = _ties_embeddings(model)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    seen: set[str] = set()
    for raw_name, value in model.state_dict().items():
        name = hf_param_name(raw_name)
        if name in seen or name.endswith(_SKIP_SUFFIXES):
            continue
        if tied and name.endswith("lm_head.weight"):
            continue
        if not isinstance(value, torch.Tensor) or value.is_meta:
            raise ValueError(f"cannot sync state-dict entry {raw_name!r} ({type(value).__name__}, meta or not a tensor)")
        seen.add(name)
        with torch.no_grad():  # scoped per tensor: a `with` around the yields would leak into the caller
            full = _materialize(value.detach())
            if dtype is not None and full.is_floating_point() and full.dtype != dtype:
                full = full.to(dtype)
            if device is not None:
                full = full.to(device)
            full = full.contiguous()
        nbytes = full.numel() * full.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, full))
        size += nbytes
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------------------- CUDA IPC


@dataclass(eq=False)
class IPCPayload:
    """A serialized bucket of CUDA tensors (IPC handles) for ``SGLangGenerator.update_weights``.

    ``data`` goes to the engine as is (never deserialized on the way). ``load_format`` is
    ``"flattened_bucket"`` (one flat uint8 buffer + metadata) or ``None`` (a list of named tensors).
    The sender must keep the GPU memory alive until the engine has loaded it: the payload holds a
    reference to its tensors, which is dropped when it is pickled (e.g. sent through Ray), so keep the
    original object until the engine's ``update_weights`` returned.
    """

    data: bytes
    load_format: str | None
    names: tuple[str, ...]
    nbytes: int
    _keepalive: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_keepalive"] = None
        return state

    def release(self) -> None:
        """Drop the reference to the sender's tensors (after the engine loaded them)."""
        self._keepalive = None


@dataclass(eq=False)
class TensorParallelPayload:
    """One bucket for a tensor-parallel SGLang engine: one :class:`IPCPayload` per TP rank, in TP-rank order.

    Entry k holds CUDA IPC handles of the full bucket on the GPU of TP rank k (serialized by the trainer
    rank colocated there); SGLang's TP rank k deserializes ``serialized_named_tensors[k]``
    (``update_weights_from_tensor``). All entries carry the same names and ``load_format``.
    """

    per_rank: tuple[IPCPayload, ...]

    def __post_init__(self) -> None:
        if not self.per_rank:
            raise ValueError("TensorParallelPayload needs one IPCPayload per TP rank, got none")
        fmts = {p.load_format for p in self.per_rank}
        names = {p.names for p in self.per_rank}
        if len(fmts) != 1 or len(names) != 1:
            raise ValueError(f"TensorParallelPayload: the {len(self.per_rank)} TP ranks' payloads differ "
                             f"(load formats {sorted(map(str, fmts))}, {len(names)} distinct name lists); "
                             "every trainer rank must serialize the same bucket")

    @property
    def load_format(self) -> str | None:
        return self.per_rank[0].load_format

    @property
    def nbytes(self) -> int:
        """Bytes of one copy of the bucket (each TP rank loads one full copy)."""
        return self.per_rank[0].nbytes


def _patch_reductions() -> bool:
    """Map IPC handles by GPU UUID (SGLang's patch); needed when Ray gives each actor its own devices."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except Exception:  # noqa: BLE001 - sglang absent or broken: plain torch reductions
        return False
    monkey_patch_torch_reductions()
    return True


def _serialize(obj: Any) -> bytes:
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except Exception:  # noqa: BLE001
        MultiprocessingSerializer = None
    if MultiprocessingSerializer is not None:
        return MultiprocessingSerializer.serialize(obj)
    import torch.multiprocessing  # noqa: F401 - registers the tensor reductions with ForkingPickler
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return buf.getvalue()


def _flat_metadata(name: str, t: torch.Tensor, start: int, end: int) -> Any:
    # SGLang's own class when importable; otherwise a SimpleNamespace, which its safe unpickler
    # also accepts ("types." is allow-listed) and which has the same attributes.
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except Exception:  # noqa: BLE001
        from types import SimpleNamespace as FlattenedTensorMetadata  # type: ignore[assignment]
    return FlattenedTensorMetadata(name=name, shape=t.shape, dtype=t.dtype, start_idx=start, end_idx=end,
                                   numel=end - start)


def serialize_for_ipc(bucket: list[tuple[str, torch.Tensor]], *, flatten: bool = True) -> IPCPayload:
    """Serialize a bucket of CUDA tensors into CUDA IPC handles for an engine on the same GPU.

    ``flatten=True`` concatenates the bucket into one uint8 buffer (one IPC handle per bucket,
    ``load_format="flattened_bucket"``); ``False`` sends one handle per tensor. CPU tensors are
    refused (the IPC path needs device memory: move them to the GPU first).
    """
    if not bucket:
        raise ValueError("empty bucket")
    for name, t in bucket:
        if not isinstance(t, torch.Tensor) or not t.is_cuda:
            where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"serialize_for_ipc needs CUDA tensors; {name!r} is on {where} "
                             "(pass device='cuda' to iter_weight_buckets)")
    _patch_reductions()
    names = tuple(n for n, _ in bucket)
    nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
    if flatten:
        pieces, metas, pos = [], [], 0
        for name, t in bucket:
            flat = t.contiguous().view(-1).view(torch.uint8)
            metas.append(_flat_metadata(name, t, pos, pos + flat.numel()))
            pieces.append(flat)
            pos += flat.numel()
        buf = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # a view: IPC keeps its offset
        data = _serialize({"flattened_tensor": buf, "metadata": metas})
        return IPCPayload(data=data, load_format=FLATTENED, names=names, nbytes=nbytes, _keepalive=buf)
    tensors = [(n, t.detach().contiguous()) for n, t in bucket]
    data = _serialize(tensors)
    return IPCPayload(data=data, load_format=None, names=names, nbytes=nbytes, _keepalive=tensors)


# -------------------------------------------------------------------------------------------- NCCL


def bucket_metadata(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str], list[list[int]]]:
    """``(names, dtypes, shapes)`` for ``update_weights_from_distributed`` (dtype names without ``torch.``)."""
    names = [n for n, _ in bucket]
    dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
    shapes = [list(t.shape) for _, t in bucket]
    return names, dtypes, shapes


def _new_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
               timeout: datetime.timedelta) -> Any:
    """A process group outside the default one, rendezvoused like SGLang's engine side does
    (tcp store, prefixed by the group name), so both sides meet in the same store keys."""
    import inspect

    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    params = inspect.signature(c10d._new_process_group_helper).parameters
    opt_name = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, timeout=timeout, **{opt_name: None})
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def join_weight_group(
    master_address: str,
    master_port: int,
    world_size: int,
    rank: int,
    group_name: str = "rlctl_weights",
    *,
    timeout_s: float = 120.0,
    backend: str = "nccl",
    side: str = "trainer",
) -> Any:
    """Join the weight-update process group as ``rank`` (the trainer is rank 0, engines 1..world_size-1).

    Rendezvous over TCP at ``master_address:master_port`` the way SGLang's engine side does
    (``init_custom_process_group``: tcp store prefixed by ``group_name``), so an SGLang engine and an
    rlctl process meet in the same store keys. Works in a process without a default process group
    (the hf generator). Every member must call it at the same time.

    Raises:
        WeightSyncError: naming ``side`` when the rendezvous does not complete within ``timeout_s``
            seconds (the usual cause: a member never joined, or a wrong address / world size).
    """
    init_method = f"tcp://{master_address}:{master_port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        return _new_group(backend, init_method, world_size, rank, group_name, timeout)
    except Exception as e:  # noqa: BLE001
        raise WeightSyncError(
            f"{side} side: could not form weight-update group {group_name!r} at {init_method} as rank {rank} "
            f"(world_size={world_size}, backend={backend}) within {timeout_s:.0f}s: {type(e).__name__}: {e}. "
            "Did every member join with the same address, port and world size?"
        ) from e


def init_trainer_weight_group(
    master_address: str,
    master_port: int,
    world_size: int,
    group_name: str = "rlctl_weights",
    *,
    timeout_s: float = 120.0,
    backend: str = "nccl",
) -> Any:
    """Join the weight-update group as rank 0 (the trainer). The engine joins as ranks 1..world_size-1
    (``SGLangGenerator.init_weights_update_group(..., rank_offset=1, world_size=world_size)``), at the
    same time (launch the engine's call first, without waiting on it). Only the trainer's rank 0 calls this.

    Raises :class:`WeightSyncError` naming the trainer side when the rendezvous does not complete
    within ``timeout_s`` (the usual cause: the engine never joined, or a wrong address).
    """
    return join_weight_group(master_address, master_port, world_size, 0, group_name, timeout_s=timeout_s,
                             backend=backend, side="trainer")


def _broadcast_all(tensors: list[torch.Tensor], group: Any, timeout_s: float,
                   check: Callable[[], None] | None = None) -> None:
    """Broadcast ``tensors`` from rank 0 of ``group`` (sender and receivers call it alike), waiting at
    most ``timeout_s`` seconds for each; raises ``TimeoutError`` or the backend's error.

    ``check`` (optional) is called about every 50 ms while a broadcast is pending and may raise, e.g.
    when a peer has already failed: the wait then ends at once instead of after ``timeout_s`` (with an
    explicit timeout, ``Work.wait`` blocks the host for gloo and NCCL alike).
    """
    import torch.distributed as dist

    works = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
    for w in works:
        deadline = time.monotonic() + timeout_s
        if check is not None:
            next_check = 0.0
            while not w.is_completed():
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"broadcast not complete after {timeout_s:.0f}s")
                if now >= next_check:
                    check()
                    next_check = now + 0.05
                time.sleep(0.001)
        if not w.wait(timeout=datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))):
            raise TimeoutError(f"broadcast not complete after {timeout_s:.0f}s")


def receive_bucket(
    names: list[str],
    dtypes: list[str],
    shapes: list[list[int]],
    group: Any,
    *,
    load_format: str | None = None,
    device: torch.device | str = "cpu",
    timeout_s: float = 120.0,
    side: str = "engine",
) -> list[tuple[str, torch.Tensor]]:
    """Receive one bucket broadcast by :func:`broadcast_bucket` (the receiving end for rlctl's own
    generators; SGLang engines run the same protocol internally in ``update_weights_from_distributed``).

    Allocates ``shapes`` / ``dtypes`` (dtype names as from :func:`bucket_metadata`) on ``device``;
    with ``load_format="flattened_bucket"`` one uint8 buffer of the summed byte size, split into views.
    Returns ``[(name, tensor)]`` in the order of ``names``.

    Raises:
        WeightSyncError: naming ``side`` when the broadcast fails or takes longer than ``timeout_s``.
    """
    metas = [(n, getattr(torch, d), tuple(s)) for n, d, s in zip(names, dtypes, shapes)]
    if load_format == FLATTENED:
        sizes = [torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, d, s in metas]
        flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        tensors, out, pos = [flat], [], 0
        for (name, dt, shape), size in zip(metas, sizes):
            out.append((name, flat[pos:pos + size].view(dt).view(shape)))
            pos += size
    elif load_format is None:
        out = [(name, torch.empty(shape, dtype=dt, device=device)) for name, dt, shape in metas]
        tensors = [t for _, t in out]
    else:
        raise ValueError(f"unknown load_format {load_format!r}")
    try:
        _broadcast_all(tensors, group, timeout_s)
    except Exception as e:  # noqa: BLE001
        raise WeightSyncError(
            f"{side} side: receiving {len(names)} tensors ({names[0] if names else '-'} ...) failed: "
            f"{type(e).__name__}: {e}. Is the trainer side broadcasting the same bucket?"
        ) from e
    return out


def broadcast_bucket(
    bucket: list[tuple[str, torch.Tensor]],
    group: Any,
    *,
    load_format: str | None = None,
    timeout_s: float = 120.0,
    check: Callable[[], None] | None = None,
) -> None:
    """Broadcast one bucket from the trainer (rank 0) to the engine ranks of ``group``.

    The engine must receive it concurrently: launch ``generator.update_weights_from_distributed(
    *bucket_metadata(bucket), load_format=load_format)`` first (e.g. a Ray ``.remote`` call), then call
    this, then wait for the engine's call. ``load_format="flattened_bucket"`` sends one flat buffer.
    ``check``: called while waiting (about every 50 ms); raising there, e.g. because the engine's call
    already ended with an error, stops the wait at once (see :func:`_broadcast_all`).

    Raises:
        WeightSyncError: naming the trainer side, when the broadcast fails, ``check`` raises or the
            broadcast takes longer than ``timeout_s`` seconds.
    """
    if load_format == FLATTENED:
        flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in bucket])
        tensors = [flat]
    elif load_format is None:
        tensors = [t.contiguous() for _, t in bucket]
    else:
        raise ValueError(f"unknown load_format {load_format!r}")
    try:
        _broadcast_all(tensors, group, timeout_s, check)
    except Exception as e:  # noqa: BLE001
        raise WeightSyncError(
            f"trainer side: broadcast of {len(bucket)} tensors ({bucket[0][0]} ...) failed: {type(e).__name__}: {e}. "
            "Is the engine side receiving (update_weights_from_distributed called with the same names/shapes)?"
        ) from e
