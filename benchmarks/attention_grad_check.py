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
    from rlctl.testing import (
        gradient_error,
        logprob_loss_gradient,
        masked_response_logprobs,
        trainer_response_logprobs,
    )
    from rlctl.trainer import trainer_attention, trim_padding

    dev = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[:2000]]
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    bf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    variants = {
        "masked_efficient": (masked_response_logprobs, lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
        "masked_cudnn": (masked_response_logprobs, lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
        "masked_default": (masked_response_logprobs, contextlib.nullcontext),
        "causal": (trainer_response_logprobs, lambda: trainer_attention(dev)),
        "bf16_math": (masked_response_logprobs, lambda: sdpa_kernel([SDPBackend.MATH])),
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
        adv = torch.randn(args.rows, generator=torch.Generator().manual_seed(b)).to(dev)
        reference = logprob_loss_gradient(ref, masked_response_logprobs, ids, attn, resp_mask, adv,
                                          sdpa_kernel([SDPBackend.MATH]))
        entry = {"seq_len": int(ids.shape[1]), "mod32": int(ids.shape[1]) % 32, "mod128": int(ids.shape[1]) % 128,
                 "response_tokens": int(resp_mask.sum())}
        for name, (fn, ctx) in variants.items():
            found = gradient_error(bf, fn, ctx(), ids, attn, resp_mask, adv, reference)
            entry[name] = {k: round(v, 5) if isinstance(v, float) else v for k, v in found.items()}
        report["batches"].append(entry)
        print(json.dumps(entry), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
