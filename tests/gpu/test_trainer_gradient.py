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


def _masked_logprobs(model, ids, attn, t):
    """Response log-probs [N, T] through right-packed rows WITH the explicit mask and position ids (e68745c's path)."""
    from rlctl.testing import masked_response_logprobs

    return masked_response_logprobs(model, ids, attn, t)


def _trainer_logprobs(model, ids, attn, t):
    from rlctl.trainer import response_logprobs_forward

    return response_logprobs_forward(model, ids, attn, t, 1.0)[0]


def _grad(model, fn, batch, adv, ctx):
    """Flat fp32 gradient and log-probs of loss = -sum(adv * logp * response_mask) / response tokens."""
    ids, attn, rmask = batch
    model.zero_grad(set_to_none=True)
    with ctx:
        logp = fn(model, ids, attn, rmask.shape[1])
        (-(adv[:, None] * logp * rmask).sum() / rmask.sum()).backward()
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]), logp.detach()


@pytest.mark.parametrize("length_mod", [(128, 64), (32, 1)])
def test_trainer_gradient_matches_fp32_reference(model_path, tokenizer, prompt_ids, metrics, length_mod):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from rlctl.loop import build_batch
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
    g_ref, lp_ref = _grad(ref, _masked_logprobs, batch, adv, sdpa_kernel([SDPBackend.MATH]))
    del ref
    bf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    found = {}
    for name, fn, ctx in (("trainer", _trainer_logprobs, trainer_attention(dev)),
                          ("trainer_flash_only", _trainer_logprobs, sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
                          ("masked_efficient", _masked_logprobs, sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
                          ("masked_cudnn", _masked_logprobs, sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
                          ("masked_math_bf16", _masked_logprobs, sdpa_kernel([SDPBackend.MATH]))):
        try:
            grad, lp = _grad(bf, fn, batch, adv, ctx)
        except RuntimeError as e:  # a kernel that does not take these inputs on this build
            found[name] = {"error": str(e).splitlines()[0][:200]}
            continue
        finite = bool(torch.isfinite(grad).all())
        grad = torch.nan_to_num(grad)
        found[name] = {"cos": float(torch.nn.functional.cosine_similarity(grad, g_ref, dim=0)),
                       "rel_err": float((grad - g_ref).norm() / g_ref.norm()),
                       "logp_max_err": float(((lp - lp_ref) * batch[2]).abs().max()), "finite": finite}
    metrics.setdefault("trainer_gradient", {})[f"{rem}_mod_{mod}"] = {"seq_len": length, **found}
    # the trainer's unmasked forward is eligible for flash attention (not silently on the math kernel)
    assert "error" not in found["trainer_flash_only"], found
    ours = found["trainer"]
    assert ours["finite"] and ours["cos"] > 0.98, found
    assert ours["logp_max_err"] < 0.25, found  # bf16 log-probs of random tokens: ~0.1 at worst
