"""The cause of the non-finite optimizer steps of the Qwen2.5 GPU runs, on the GPU itself: a masked SDPA call whose
sequence length is 64 modulo 128 and whose every query row has a log-sum-exp below ln(FLT_MAX) (~ -88.7), backward.
cuDNN attention (torch 2.11+'s default for a masked call on H100 / H200) returns NaN in dQ there
(pytorch/pytorch#196678); the trainer's forwards run under :func:`rlctl.trainer.trainer_attention`, which leaves
cuDNN out, and must give finite gradients. Whether the default path is affected depends on the torch / cuDNN build,
so it is recorded (with cuDNN attention forced too), not asserted; 640 (0 modulo 128) is the control length.

Run (GPU, no model needed): ``RLCTL_METRICS_OUT=/tmp/m.json pytest -q tests/gpu/test_attention_nan.py``.
"""

from __future__ import annotations

import contextlib
import math

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


def _masked_attention_grad_q(length: int, ctx) -> int:
    """Non-finite entries of dQ for one head of ``length`` positions whose logits all sit near -120."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    d = 64
    q = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    k = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    v = torch.randn(1, 1, length, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q[..., 0] = 1.0
    k[..., 0] = -120.0 * math.sqrt(d)  # q . k / sqrt(d) ~ -120 for every pair: each row's log-sum-exp < -88.7
    q.requires_grad_(True)
    mask = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()[None, None]
    with ctx:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(torch.ones_like(out))
    return int((~torch.isfinite(q.grad)).sum())


@pytest.mark.parametrize("length", [640, 704])
def test_training_attention_gives_finite_grads_where_cudnn_does_not(length, metrics):
    from rlctl.trainer import trainer_attention

    from torch.nn.attention import SDPBackend, sdpa_kernel

    default_bad = _masked_attention_grad_q(length, contextlib.nullcontext())
    try:  # cuDNN attention forced: is the bug in this torch / cuDNN build at this length? (640 = 0 mod 128: control)
        cudnn_bad = _masked_attention_grad_q(length, sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
    except RuntimeError as e:  # no cuDNN attention for these inputs on this build
        cudnn_bad = f"not available: {str(e).splitlines()[0][:200]}"
    ours_bad = _masked_attention_grad_q(length, trainer_attention(torch.device("cuda")))
    metrics.setdefault("attention_nan", {})[str(length)] = {
        "default_backend_nonfinite_dq": default_bad, "cudnn_forced_nonfinite_dq": cudnn_bad,
        "trainer_attention_nonfinite_dq": ours_bad, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
    assert ours_bad == 0
