"""The trainer's host offload on 2 gloo ranks with an uneven shard: the copies into the host buffers must land
before FSDP2 re-pads a short shard (``FSDPParam.reset_sharded_param`` inside ``model._apply``).

On CUDA the copies into pinned buffers are non-blocking, so a swap before they land re-pads stale memory on the
rank whose shard is shorter (the tiny model's 259-row embedding over 2 ranks: 130 + 129 rows). Here the pinned
behaviour is simulated: :class:`DeferredBuffers` fills a buffer with NaN and writes the real values only in
``wait()``. Run: ``pytest tests/unit/test_offload_sharded.py``.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from rlctl.testing import build_tiny_llama, free_port, spawn_ranks, trainer_section
from rlctl.trainer import HostBuffers, PolicyTrainer, move_module_to_device, move_module_to_host


class DeferredBuffers(HostBuffers):
    """Host buffers whose copies land only at :meth:`wait`, as non-blocking copies into pinned memory do."""

    def __init__(self) -> None:
        super().__init__(pin=False)
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def copy_in(self, key, t):
        buf = self._bufs.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype)
            self._bufs[key] = buf
        buf.fill_(float("nan"))  # what the host memory holds before the copy lands
        self.pending.append((buf, t.detach().clone()))
        return buf

    def wait(self) -> None:
        for buf, src in self.pending:
            buf.copy_(src)
        self.pending = []


def _worker(rank: int, port: int, path: str, q) -> None:  # a spawned process
    try:
        PolicyTrainer.init_process_group(rank, 2, "127.0.0.1", port, "cpu", timeout_s=60)
        tr = PolicyTrainer(path, trainer_section(seed=0, gradient_checkpointing=False), rank=rank, world_size=2,
                           device="cpu", max_response_len=8)
        named = dict(tr.model.named_parameters())
        before = {n: p._local_tensor.clone() for n, p in named.items()}
        embed_rows = named["model.embed_tokens.weight"]._local_tensor.shape[0]
        hb = DeferredBuffers()
        move_module_to_host(tr.model, hb)
        bad_host = sorted(n for n, p in named.items() if not torch.equal(p._local_tensor, before[n]))
        move_module_to_device(tr.model, torch.device("cpu"))
        bad_back = sorted(n for n, p in named.items() if not torch.equal(p._local_tensor, before[n]))
        same_objects = list(tr.model.parameters()) == list(named.values())
        dist.destroy_process_group()
        q.put((rank, (embed_rows, bad_host, bad_back, same_objects)))
    except BaseException:  # noqa: BLE001 - reported to the test
        q.put((rank, traceback.format_exc()))


def test_offload_waits_for_the_host_copies_before_fsdp_repads_a_short_shard(tmp_path):
    path = str(build_tiny_llama(tmp_path / "tiny", seed=1))
    port = free_port()
    got = spawn_ranks(_worker, [(r, port, path) for r in range(2)], timeout_s=300)
    assert all(isinstance(v, tuple) for v in got.values()), "\n".join(str(v) for v in got.values())
    assert (got[0][0], got[1][0]) == (130, 129)  # 259 embedding rows: rank 1's shard is the short one
    for rank in (0, 1):
        _, bad_host, bad_back, same_objects = got[rank]
        assert bad_host == [] and bad_back == [], (rank, bad_host, bad_back)
        assert same_objects
