"""A colocated 1-rank ``PolicyTrainer`` on CUDA (NCCL) frees the GPU when offloaded.

One train step (KL on: the reference model is loaded too), then ``offload``: at most
``OFFLOADED_RESERVE_LIMIT_BYTES`` (1 GiB) stays reserved; a second onload / train step / offload cycle
reuses the same pinned host buffers and keeps training. Also checks the fused AdamW and the bf16
reference model. The measured numbers go to the ``metrics`` fixture.

Run (GPU + devkit model): ``RLCTL_METRICS_OUT=/tmp/m.json pytest -q tests/gpu/test_trainer_offload.py``.
"""

from __future__ import annotations

import math
import socket

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


def _tcfg():
    """The trainer section of this test (schema defaults elsewhere: lr 1e-6, weight decay 0.01, clipping at 1)."""
    from rlctl.testing import trainer_section

    return trainer_section({"algorithm.eps_clip_high": 0.28, "algorithm.kl_loss_coef": 0.01,
                            "algorithm.entropy_loss_coef": 0.0},
                           seed=0, micro_forward_batch_size_per_gpu=8, micro_train_batch_size_per_gpu=4)


def test_offload_leaves_at_most_1_gib_reserved(model_path, prompt_ids, metrics):
    import torch.distributed as dist

    from rlctl.loop import build_batch
    from rlctl.trainer import OFFLOADED_RESERVE_LIMIT_BYTES, PolicyTrainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    PolicyTrainer.init_process_group(0, 1, "127.0.0.1", port, "cuda")
    try:
        tr = PolicyTrainer(model_path, _tcfg(), rank=0, world_size=1, device="cuda", max_response_len=64,
                           compute_dtype="bfloat16", colocated=True)
        assert tr.optimizer.defaults["fused"] is True
        assert {p.dtype for p in tr.ref_model.parameters()} == {torch.bfloat16}
        g = torch.Generator().manual_seed(0)
        prompts = prompt_ids[:8]
        outputs = [torch.randint(10, 1000, (8 + 7 * i,), generator=g).tolist() for i in range(8)]
        batch = build_batch(prompts, outputs, pad_id=0)
        batch["advantages"] = torch.tensor([1.0, -1.0] * 4)
        ptrs, reserved = None, []
        for cycle in range(2):
            tr.onload()
            batch["old_logprobs"] = tr.compute_logprobs(batch, 1.0)
            batch["ref_logprobs"] = tr.compute_logprobs(batch, 1.0, "ref")
            m = tr.train_step(batch, 1.0, mini_batch_size=8)
            assert m["policy/skipped_steps"] == 0.0 and math.isfinite(m["policy/loss"])
            assert m["memory/trainer_peak_reserved_bytes"] > OFFLOADED_RESERVE_LIMIT_BYTES / 8
            reserved.append(tr.offload())
            assert reserved[-1] == torch.cuda.memory_reserved() <= OFFLOADED_RESERVE_LIMIT_BYTES
            assert tr.offload_error is None  # the over-the-limit line was not printed
            now = sorted(b.data_ptr() for hb in tr._host.values() for b in hb._bufs.values())
            assert all(b.is_pinned() for hb in tr._host.values() for b in hb._bufs.values())
            if ptrs is not None:
                assert now == ptrs  # the pinned host buffers of the first offload are reused
            ptrs = now
        metrics["trainer_offload"] = {"reserved_bytes_offloaded": reserved, "peak_reserved_bytes":
                                      m["memory/trainer_peak_reserved_bytes"],
                                      "host_buffer_bytes": {k: hb.nbytes for k, hb in tr._host.items()}}
    finally:
        dist.destroy_process_group()
