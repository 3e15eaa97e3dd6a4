"""A GPU probe of the trainer alone, without the devkit (the machine's own torch and transformers): a random
Llama (byte tokenizer vocabulary, ``--hidden`` / ``--layers``) as one colocated FSDP2 rank on CUDA, KL on, two
cycles of onload -> old / ref log-probs -> train step -> offload, then ``--packed`` padding-free cycles (the first
one warms up) with the max difference of their log-probs from the padded path. Tokens per second count real
(prompt + response) tokens; ``train_computed_tokens_per_s`` counts what the forward passes ran (length-sorted
micro-batches trimmed to their longest row: real tokens + the padding left), the work the bare rate is
compared with. Prints one JSON line: the CUDA reserve after each
offload (bytes), the peak reserve of each step, seconds per phase, fused AdamW and the reference dtype, skipped steps.

    python3 scripts/gpu_trainer_probe.py [--hidden 1024 --layers 8 --seqs 32 --len 512] > $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--len", type=int, default=512, help="response tokens per sequence")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (no memory numbers)")
    ap.add_argument("--like", default=None, help="a shape of benchmarks/random_model.py (e.g. qwen2.5-0.5b: its "
                    "151,936-row vocabulary) instead of the byte-vocabulary Llama")
    ap.add_argument("--micro-train", type=int, default=8)
    ap.add_argument("--micro-forward", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=4, help="cycles in all; the last --packed of them padding-free")
    ap.add_argument("--packed", type=int, default=2, help="padding-free cycles at the end (the first one warms up)")
    ap.add_argument("--grad-ckpt", action="store_true", help="trainer.gradient_checkpointing=true (preset gsm8k's)")
    ap.add_argument("--bare", action="store_true", help="also the bare bf16 fwd(+bwd) rate of the same model "
                    "(benchmarks/_common.bare_model_rates, same micro-batches, no FSDP, no padding)")
    a = ap.parse_args()
    import torch

    from rlctl.loop import build_batch
    from rlctl.testing import build_tiny_llama, free_port, trainer_section
    from rlctl.trainer import OFFLOADED_RESERVE_LIMIT_BYTES, PolicyTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    if a.like:
        from random_model import build_random_model

        model = Path(tempfile.mkdtemp()) / a.like
        build_random_model(a.like, model, None)
    else:
        model = build_tiny_llama(Path(tempfile.mkdtemp()) / "m", hidden_size=a.hidden, num_layers=a.layers,
                                 num_heads=a.hidden // 64, num_kv_heads=max(1, a.hidden // 256),
                                 intermediate_size=a.hidden * 3, max_position_embeddings=a.len + 64)
    tcfg = trainer_section({"algorithm.eps_clip_high": 0.28, "algorithm.kl_loss_coef": 0.01,
                            "algorithm.entropy_loss_coef": 0.0},
                           seed=0, gradient_checkpointing=a.grad_ckpt, micro_forward_batch_size_per_gpu=a.micro_forward,
                           micro_train_batch_size_per_gpu=a.micro_train)
    port = free_port()
    PolicyTrainer.init_process_group(0, 1, "127.0.0.1", port, a.device)
    tr = PolicyTrainer(str(model), tcfg, rank=0, world_size=1, device=a.device, max_response_len=a.len,
                       compute_dtype="bfloat16", colocated=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (40,), generator=g).tolist() for _ in range(a.seqs)]
    outputs = [torch.randint(3, 250, (a.len // 2 + (a.len // 2) * i // a.seqs,), generator=g).tolist()
               for i in range(a.seqs)]
    batch = build_batch(prompts, outputs, pad_id=0)
    batch["advantages"] = torch.tensor([1.0, -1.0] * (a.seqs // 2))
    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "params": sum(p.numel() for p in tr.model.parameters()), "fused_adamw": tr.optimizer.defaults.get("fused"),
           "ref_dtype": str(next(tr.ref_model.parameters()).dtype), "tokens": int(batch["attention_mask"].sum()),
           "args": vars(a), "prompt_tokens": 40, "cycles": []}  # args + prompt length: the memory plan's inputs
    first_packed = a.cycles - a.packed
    for cycle in range(a.cycles):
        c = {"packed": cycle >= first_packed}
        if cycle == first_packed:  # the same batch padding-free (trainer.remove_microbatch_padding + a token budget)
            padded_old = batch["old_logprobs"].clone()
            tr.tcfg = tr.tcfg.model_copy(update={"remove_microbatch_padding": True,
                                                 "max_tokens_per_microbatch": 8 * (a.len + 40)})
        t0 = time.perf_counter()
        tr.onload()
        sync()
        c["onload_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        batch["old_logprobs"] = tr.compute_logprobs(batch, 1.0)
        batch["ref_logprobs"] = tr.compute_logprobs(batch, 1.0, "ref")
        sync()
        c["logprobs_s"] = time.perf_counter() - t0
        if cycle >= first_packed:  # packed vs a padded pass over the same (current) weights
            packed_old = batch["old_logprobs"]
            tr.tcfg = tr.tcfg.model_copy(update={"remove_microbatch_padding": False})
            padded_now = tr.compute_logprobs(batch, 1.0)
            tr.tcfg = tr.tcfg.model_copy(update={"remove_microbatch_padding": True})
            mask = batch["response_mask"].bool()
            c["packed_vs_padded_max_abs"] = float((packed_old - padded_now)[mask].abs().max())
            c["step_change_max_abs"] = float((padded_old - padded_now)[mask].abs().max())
        t0 = time.perf_counter()
        m = tr.train_step(batch, 1.0, mini_batch_size=a.seqs // 2)
        sync()
        c["train_s"] = time.perf_counter() - t0
        c["train_tokens_per_s"] = res["tokens"] / c["train_s"]  # real (unpadded) tokens
        # what the forward passes ran: sorted micro-batches trimmed to their longest row (padding included)
        c["train_computed_tokens"] = m.get("train/computed_tokens")
        if c["train_computed_tokens"]:
            c["train_computed_tokens_per_s"] = c["train_computed_tokens"] / c["train_s"]
        c["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() if cuda else 0
        c["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() if cuda else 0  # reserved - this: allocator slack
        c["skipped_steps"] = m["policy/skipped_steps"]
        t0 = time.perf_counter()
        try:
            c["reserved_after_offload_bytes"] = tr.offload()
            if getattr(tr, "offload_error", None) and c["reserved_after_offload_bytes"] > OFFLOADED_RESERVE_LIMIT_BYTES:
                c["offload_error"] = tr.offload_error  # this cycle is over the 1 GiB limit (the text: the first such)
        except RuntimeError as e:  # a tree from before the limit became a printed error (gpu_prev)
            c["offload_error"] = str(e)
            c["reserved_after_offload_bytes"] = torch.cuda.memory_reserved() if cuda else 0
        c["offload_s"] = time.perf_counter() - t0
        res["cycles"].append(c)
    if a.bare and cuda:
        tr.offload()
        from _common import bare_model_rates_subprocess

        res["bare"] = bare_model_rates_subprocess(str(model), 40 + a.len, a.micro_train, a.micro_forward)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
