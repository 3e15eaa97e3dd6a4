"""Which attention path gives the trainer the right gradient: a GPU check against an fp32 reference.

    python benchmarks/attention_grad_check.py --model /tmp/models/qwen2.5-coder-0.5b-instruct \
        --data gpu_data/gsm8k/train.jsonl --out attention_grad.json

Why: on 2026-12-07 (H100, main e68745c) the trainer's forwards ran with an explicit attention mask under
``sdpa_kernel([FLASH, EFFICIENT, MATH])`` (cuDNN excluded for its NaN bug, pytorch/pytorch#196678), i.e. on SDPA's
memory-efficient kernel, and two colocated runs stopped learning GSM8K's answer format, which every earlier run
(default kernel choice: cuDNN) learned within 5-10 steps. This script measures, on real GSM8K text through the real
model, the gradient of a GRPO-like loss (sum over response tokens of advantage x log-prob, one random advantage per
row) under each attention path, against the same loss computed in fp32 with the math kernel:

* ``masked_efficient``: right-packed rows, explicit mask + position ids (the path of e68745c), memory-efficient kernel;
* ``masked_cudnn``: the same, cuDNN attention (the default before e68745c on H100 / H200);
* ``masked_default``: the same, SDPA's own choice;
* ``causal``: right-packed rows, no mask (:func:`rlctl.trainer.response_logprobs_forward` now), the trainer's context;
* ``bf16_math``: explicit mask, math kernel in bf16 (how much of the error is bf16 itself).

Each micro-batch is ``--rows`` GSM8K questions (prompt) + reference answers (response) of a randomly drawn length
mix; the trimmed lengths cover 1 mod 32 and 64 mod 128. Per variant and micro-batch: cosine similarity and relative
L2 error of the full gradient (all parameters, flattened) against the fp32 reference, the max |log-prob| error, and
whether anything was non-finite. A path that gives the right gradient has cosine ~0.99+ like ``bf16_math``.
Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def masked_logprobs(model, ids, attn, t):
    """The trainer's forward at e68745c: explicit mask + position ids (:func:`rlctl.testing.masked_response_logprobs`)."""
    from rlctl.testing import masked_response_logprobs

    return masked_response_logprobs(model, ids, attn, t)


def causal_logprobs(model, ids, attn, t):
    """The trainer's forward now (:func:`rlctl.trainer.response_logprobs_forward`: no mask, causal)."""
    from rlctl.trainer import response_logprobs_forward

    return response_logprobs_forward(model, ids, attn, t, 1.0)[0]


def grad_of(model, fn, ids, attn, resp_mask, adv, t, ctx):
    """(flat gradient fp32, log-probs) of loss = -sum(adv * logp * mask) / mask.sum()."""
    import torch

    model.zero_grad(set_to_none=True)
    with ctx:
        logp = fn(model, ids, attn, t)
        loss = -(adv[:, None] * logp * resp_mask).sum() / resp_mask.sum()
        loss.backward()
    flat = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return flat, logp.detach().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="GSM8K train.jsonl (question, answer)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--out", default="attention_grad.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (CUDA-only kernels are reported as errors)")
    args = ap.parse_args()

    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlctl.loop import build_batch
    from rlctl.trainer import trainer_attention, trim_padding

    dev = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[:2000]]
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    bf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    variants = {
        "masked_efficient": (masked_logprobs, lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
        "masked_cudnn": (masked_logprobs, lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
        "masked_default": (masked_logprobs, contextlib.nullcontext),
        "causal": (causal_logprobs, lambda: trainer_attention(dev)),
        "bf16_math": (masked_logprobs, lambda: sdpa_kernel([SDPBackend.MATH])),
    }
    rng = random.Random(0)
    report: dict = {"model": args.model, "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                    "cudnn": torch.backends.cudnn.version(), "batches": []}
    for b in range(args.batches):
        picks = rng.sample(rows, args.rows)
        prompts = [tok(r["question"])["input_ids"] for r in picks]
        p_max = max(len(p) for p in prompts)
        # the trimmed length (longest prompt + longest response): 64 mod 128 (cuDNN's NaN lengths) on even batches,
        # 1 mod 32 on odd ones (pytorch/pytorch#191937's lengths for the memory-efficient kernel)
        mod, rem = (128, 64) if b % 2 == 0 else (32, 1)
        length = rng.choice([n for n in range(p_max + 16, p_max + 300) if n % mod == rem])
        lens = [length - p_max] + [rng.randint(8, length - p_max) for _ in picks[1:]]
        resps = [(tok(r["answer"])["input_ids"] * 64)[:n] for r, n in zip(picks, lens)]
        batch, _ = trim_padding(build_batch(prompts, resps, pad_id=tok.pad_token_id or 0))
        if batch["input_ids"].shape[1] != length:
            raise RuntimeError(f"batch {b}: trimmed length {batch['input_ids'].shape[1]}, wanted {length}")
        ids, attn = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        resp_mask = batch["response_mask"].to(dev)
        t = resp_mask.shape[1]
        adv = torch.randn(args.rows, generator=torch.Generator().manual_seed(b)).to(dev)
        g_ref, lp_ref = grad_of(ref, masked_logprobs, ids, attn, resp_mask, adv, t,
                                sdpa_kernel([SDPBackend.MATH]))
        entry = {"seq_len": int(ids.shape[1]), "mod32": int(ids.shape[1]) % 32, "mod128": int(ids.shape[1]) % 128,
                 "response_tokens": int(resp_mask.sum())}
        for name, (fn, ctx) in variants.items():
            try:
                g, lp = grad_of(bf, fn, ids, attn, resp_mask, adv, t, ctx())
            except RuntimeError as e:  # a kernel that does not take these inputs (or is not on this device)
                entry[name] = {"error": str(e).splitlines()[0][:200]}
                continue
            finite = bool(torch.isfinite(g).all())
            g = torch.nan_to_num(g)
            entry[name] = {"cos": round(float(torch.nn.functional.cosine_similarity(g, g_ref, dim=0)), 5),
                           "rel_err": round(float((g - g_ref).norm() / g_ref.norm()), 5),
                           "logp_max_err": round(float(((lp - lp_ref) * resp_mask).abs().max()), 5),
                           "finite": finite}
        report["batches"].append(entry)
        print(json.dumps(entry), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
