"""The trainer's bf16 forward + backward gives the gradient an fp32 reference gives, at the lengths where attention
kernels have failed (64 mod 128: cuDNN's NaN dQ, pytorch/pytorch#196678; 1 mod 32: pytorch/pytorch#191937).

Why: on 2026-12-07 (H100, e68745c) two colocated runs stopped learning GSM8K's answer format while the trainer's
loss, its CPU math and the weight sync all checked out; its forwards then ran with an explicit mask on SDPA's
memory-efficient kernel (docs/benchmarks.md 5d). This test pins the trainer's path (:func:`rlctl.trainer.
response_logprobs_forward` under :func:`rlctl.trainer.trainer_attention`, bf16) against the same loss in fp32 on the
math kernel, and records (not asserts) the masked memory-efficient and cuDNN paths next to it.

Run (GPU + devkit model): ``RLCTL_METRICS_OUT=/tmp/m.json pytest -q tests/gpu/test_trainer_gradient.py``
(``RLCTL_TEST_MODEL=/tmp/models/qwen2.5-coder-0.5b-instruct`` for the model of the runs).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("length_mod", [(128, 64), (32, 1)])
def test_trainer_gradient_matches_fp32_reference(model_path, tokenizer, prompt_ids, metrics, length_mod):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from rlctl.loop import build_batch
    from rlctl.testing import (
        gradient_error,
        logprob_loss_gradient,
        masked_response_logprobs,
        trainer_response_logprobs,
    )
    from rlctl.trainer import trainer_attention, trim_padding

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(length_mod[1])
    prompts = prompt_ids
    p_max = max(len(p) for p in prompts)
    mod, rem = length_mod
    length = next(n for n in range(p_max + 200, p_max + 400) if n % mod == rem)  # the trimmed micro-batch length
    lens = [length - p_max] + torch.randint(16, length - p_max, (len(prompts) - 1,), generator=g).tolist()
    vocab = len(tokenizer)
    outputs = [torch.randint(100, min(vocab, 20000), (n,), generator=g).tolist() for n in lens]
    b, _ = trim_padding(build_batch(prompts, outputs, pad_id=tokenizer.pad_token_id or 0))
    assert b["input_ids"].shape[1] % mod == rem
    batch = (b["input_ids"].to(dev), b["attention_mask"].to(dev), b["response_mask"].to(dev))
    adv = torch.randn(len(prompts), generator=g).to(dev)

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    reference = logprob_loss_gradient(ref, masked_response_logprobs, *batch, adv, sdpa_kernel([SDPBackend.MATH]))
    del ref
    bf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    found = {name: gradient_error(bf, fn, ctx, *batch, adv, reference) for name, fn, ctx in (
        ("trainer", trainer_response_logprobs, trainer_attention(dev)),
        ("trainer_flash_only", trainer_response_logprobs, sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
        ("masked_efficient", masked_response_logprobs, sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
        ("masked_cudnn", masked_response_logprobs, sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
        ("masked_math_bf16", masked_response_logprobs, sdpa_kernel([SDPBackend.MATH])))}
    metrics.setdefault("trainer_gradient", {})[f"{rem}_mod_{mod}"] = {"seq_len": length, **found}
    # the trainer's unmasked forward is eligible for flash attention (not silently on the math kernel)
    assert "error" not in found["trainer_flash_only"], found
    ours = found["trainer"]
    assert ours["finite"] and ours["cos"] > 0.98, found
    assert ours["logp_max_err"] < 0.25, found  # bf16 log-probs of random tokens: ~0.1 at worst
