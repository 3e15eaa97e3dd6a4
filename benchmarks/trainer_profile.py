"""Trainer profile: where one FSDP2 GRPO update's seconds go (the train phase of docs/benchmarks.md table 2).

    python benchmarks/trainer_profile.py --model /tmp/models/qwen2.5-coder-0.5b-instruct --out trainer_profile.json
    python benchmarks/trainer_profile.py --model TINY_MODEL_DIR --device cpu --prompts 4 --samples 2   # smoke test

The step benchmark measured a train phase of 12.8 s (0.5B) and 12.3 s (135M) for the same 64 x 8 batch,
about 3x TRL's update on the same GPU, and MFU of 2-6%: the update looks bound by overhead, not FLOPs.
This script isolates it: one ``PolicyTrainer`` rank (no Ray, no engine, nothing offloaded), a synthetic
batch with the step benchmark's shapes (``--prompts`` x ``--samples`` sequences, prompts of about
``--prompt-len`` tokens, response lengths spread uniformly over 0.2..1.8 x ``--mean-response-len``,
capped at ``--max-new-tokens``; random token ids), the ``gsm8k-h200`` preset's trainer settings, and
for each variant:

* ``baseline``: the trainer as it is;
* ``foreach``: AdamW with ``foreach=True`` (the trainer uses the per-parameter loop);
* ``foreach+no-reshard``: plus ``reshard_after_forward=False`` (no parameter re-gather in backward);
* ``micro32`` / ``micro64``: the trainer as it is with 32 / 64 sequences per micro-batch (train and
  log-prob passes) instead of the preset's 16: fewer, larger kernels per optimizer step;
* ``offload``: the trainer as the colocated run has it: ``offload()`` (host copies, ``empty_cache``) and
  ``onload()`` before the timed log-probs and train step (and before the profiled one), so every block the
  step needs is ``cudaMalloc``-ed again, as after each rollout of a real run. Against ``baseline`` it says
  what re-allocating after each offload costs (the real run's train phase is about half the probe's rate);
* ``offload+expandable``: ``offload`` with the caching allocator's expandable segments on for this variant
  (``torch.cuda.memory._set_allocator_settings``, verl's ``set_expandable_segments`` pattern): pages are mapped
  into a few growing segments instead of one ``cudaMalloc`` per new block.

Every variant also records ``cuda_mallocs``: the caching allocator's new segments (``cudaMalloc`` calls,
``torch.cuda.memory_stats()["segment.all.allocated"]``) during the timed log-probs + train step.

``--no-profile`` skips the profiled ``train_step`` (about a minute per variant on the H200). The JSON
is rewritten after every variant, so a call cut off by the 10-minute limit keeps the finished ones.

Per variant: one warm-up (``compute_logprobs`` + ``train_step``), then ``compute_logprobs`` and
``train_step`` timed (CUDA synchronized), then one ``train_step`` under ``torch.profiler``: the GPU busy
time (sum of kernel self time) against the wall time tells whether the update is launch/CPU bound, and
the top operators by self CUDA and self CPU time say where. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = ("baseline", "foreach", "foreach+no-reshard", "micro32", "micro64", "offload", "offload+expandable")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=C.QWEN05)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--preset", default="gsm8k-h200")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=130, help="mean prompt tokens (GSM8K with the chat template)")
    ap.add_argument("--mean-response-len", type=int, default=290, help="mean response tokens (measured: 289)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--mini-prompts", type=int, default=None,
                    help="prompts per mini-batch (trainer.policy_mini_batch_size; default prompts / 4; the real run: 16 of 32)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--top", type=int, default=15, help="operators listed per profile")
    ap.add_argument("--no-profile", action="store_true", help="time the variants only (no torch.profiler pass)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def synthetic_batch(args, vocab: int, pad_id: int):
    """Left-padded prompts + right-padded responses (``rlctl.loop.build_batch``), advantages of +-1."""
    import torch

    from rlctl.loop import build_batch

    rng = random.Random(0)
    prompts, outputs = [], []
    for _ in range(args.prompts):
        p = [rng.randrange(vocab) for _ in range(max(1, int(args.prompt_len * rng.uniform(0.7, 1.3))))]
        for _ in range(args.samples):
            n = min(args.max_new_tokens, max(1, int(args.mean_response_len * rng.uniform(0.2, 1.8))))
            prompts.append(p)
            outputs.append([rng.randrange(vocab) for _ in range(n)])
    batch = build_batch(prompts, outputs, pad_id)
    batch["advantages"] = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(prompts))])
    real = int(batch["attention_mask"].sum())
    return batch, real


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, args, cfg, batch) -> dict:
    import torch

    from rlctl.trainer import PolicyTrainer

    tcfg = cfg.trainer  # the no-reshard variant's config comes with reshard_after_forward=false
    offload = name.startswith("offload") and args.device == "cuda"
    expandable = "expandable" in name and args.device == "cuda"
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    tr = PolicyTrainer(args.model, tcfg, rank=0, world_size=1, device=args.device,
                       max_response_len=args.max_new_tokens, compute_dtype=cfg.generator.model_dtype, colocated=offload)
    if "foreach" in name:
        opt = tcfg.policy.optimizer_config
        tr.optimizer = torch.optim.AdamW(tr.model.parameters(), lr=opt.lr, betas=tuple(opt.adam_betas),
                                         weight_decay=opt.weight_decay, foreach=True)
    mini = tcfg.policy_mini_batch_size * cfg.generator.n_samples_per_prompt
    temp = cfg.generator.sampling_params.temperature
    res: dict = {"variant": name}
    b = dict(batch)
    b["old_logprobs"] = tr.compute_logprobs(b, temp, "policy")  # warm-up
    tr.train_step(b, temp, mini)
    _sync(args.device)
    if offload:
        res.update(offload_cycle(tr))
    mallocs0 = _segments(args.device)
    t0 = time.perf_counter()
    b["old_logprobs"] = tr.compute_logprobs(b, temp, "policy")
    _sync(args.device)
    res["logprobs_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr.train_step(b, temp, mini)
    _sync(args.device)
    res["train_s"] = time.perf_counter() - t0
    res["cuda_mallocs"] = None if mallocs0 is None else _segments(args.device) - mallocs0
    if args.device == "cuda":
        res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if args.no_profile:
        res.update(profiled_train_s=None, gpu_busy_s=None, gpu_busy_fraction=None, top_device=[], top_cpu=[])
    else:
        if offload:
            offload_cycle(tr)
        res.update(profile_train_step(tr, b, temp, mini, args))
    del tr
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    return res


def _segments(device: str) -> int | None:
    """``cudaMalloc`` calls of the caching allocator so far (new segments); None off CUDA."""
    import torch

    return int(torch.cuda.memory_stats().get("segment.all.allocated", 0)) if device == "cuda" else None


def offload_cycle(tr) -> dict:
    """``tr.offload()`` then ``tr.onload()`` (a colocated trainer), timed (seconds, CUDA synchronized)."""
    import torch

    t0 = time.perf_counter()
    tr.offload()
    t1 = time.perf_counter()
    tr.onload()
    torch.cuda.synchronize()
    return {"offload_s": t1 - t0, "onload_s": time.perf_counter() - t1,
            "reserved_after_onload_bytes": torch.cuda.memory_reserved()}


def profile_train_step(tr, b, temp: float, mini: int, args) -> dict:
    """One ``train_step`` under ``torch.profiler``: wall and GPU busy seconds, top operators."""
    from torch.profiler import ProfilerActivity, profile

    res: dict = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        tr.train_step(b, temp, mini)
        _sync(args.device)
        res["profiled_train_s"] = time.perf_counter() - t0
    avgs = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(avgs[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_busy_us = sum(getattr(e, dev_attr, 0) or 0 for e in avgs)
    res["gpu_busy_s"] = gpu_busy_us / 1e6
    res["gpu_busy_fraction"] = res["gpu_busy_s"] / res["profiled_train_s"] if args.device == "cuda" else None
    res["top_device"] = [{"op": e.key, "self_s": getattr(e, dev_attr, 0) / 1e6, "calls": e.count}
                         for e in sorted(avgs, key=lambda e: -(getattr(e, dev_attr, 0) or 0))[:args.top]]
    res["top_cpu"] = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                      for e in sorted(avgs, key=lambda e: -e.self_cpu_time_total)[:args.top]]
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from rlctl.config import ConfigError, load_config
    from rlctl.testing import free_port
    from rlctl.trainer import PolicyTrainer

    if args.device == "cuda" and not torch.cuda.is_available():
        print("trainer_profile: no CUDA device (use --device cpu for a smoke test)")
        return 3
    def make_cfg(*extra: str):
        return load_config(preset=args.preset, backend="sglang" if args.device == "cuda" else "hf", overrides=[
            *base_overrides, *extra]).cfg

    base_overrides = [
        f"trainer.policy.model.path={args.model}", f"trainer.train_batch_size={args.prompts}",
        f"trainer.policy_mini_batch_size={args.mini_prompts or max(1, args.prompts // 4)}",
        f"generator.n_samples_per_prompt={args.samples}",
        f"generator.sampling_params.max_new_tokens={args.max_new_tokens}",
        *([] if args.device == "cuda" else ["trainer.device=cpu", "trainer.micro_train_batch_size_per_gpu=2",
                                            "trainer.micro_forward_batch_size_per_gpu=2"])]
    cfg = make_cfg()
    mcfg = AutoConfig.from_pretrained(args.model)
    vocab = mcfg.vocab_size
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    except (OSError, ValueError):  # a benchmarks/random_model.py folder without --tokenizer-from: ids are random anyway
        pad = getattr(mcfg, "pad_token_id", None) or getattr(mcfg, "eos_token_id", None) or 0
    batch, real_tokens = synthetic_batch(args, vocab, pad)
    port = free_port()
    PolicyTrainer.init_process_group(0, 1, "127.0.0.1", port, args.device)
    C.log(f"batch: {batch['input_ids'].shape[0]} sequences, width {batch['input_ids'].shape[1]}, {real_tokens} real tokens; "
          f"mini-batch {cfg.trainer.policy_mini_batch_size} prompts, micro {cfg.trainer.micro_train_batch_size_per_gpu}")
    results = []
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            print(f"trainer_profile: unknown variant {name!r}; known: {', '.join(VARIANTS)}")
            return 2
        C.log(f"variant {name}")
        if "no-reshard" in name:
            vcfg = make_cfg("trainer.policy.fsdp_config.reshard_after_forward=false")
        elif name.startswith("micro"):
            m = int(name[len("micro"):])
            try:
                vcfg = make_cfg(f"trainer.micro_train_batch_size_per_gpu={m}", f"trainer.micro_forward_batch_size_per_gpu={m}")
            except ConfigError as e:  # e.g. the CPU smoke test's 2-sequence mini-batch cannot hold 32 per micro-batch
                C.log(f"  skipped: {str(e).splitlines()[0]}")
                continue
        else:
            vcfg = cfg
        results.append(run_variant(name, args, vcfg, batch))
        r = results[-1]
        busy = "" if r["gpu_busy_s"] is None else f", GPU busy {r['gpu_busy_s']:.2f} s of {r['profiled_train_s']:.2f} s profiled"
        C.log(f"  logprobs {r['logprobs_s']:.2f} s, train {r['train_s']:.2f} s{busy}; cudaMalloc calls {r['cuda_mallocs']}"
              + (f"; offload {r['offload_s']:.2f} s, onload {r['onload_s']:.2f} s" if "offload_s" in r else ""))
        for e in r["top_device" if args.device == "cuda" else "top_cpu"][:8]:
            C.log(f"    {e['self_s']:8.3f} s  {e['calls']:6d} x  {e['op'][:90]}")
        out = {"benchmark": "trainer_profile", "args": vars(args), "versions": C.versions(), "real_tokens": real_tokens,
               "sequences": int(batch["input_ids"].shape[0]), "results": results}
        C.write_json(args.out, out)  # after every variant: a cut-off call keeps the finished ones
    C.print_table(f"trainer profile: {Path(args.model).name}, {args.prompts} x {args.samples}, {real_tokens} real tokens",
                  ["variant", "log-probs s", "train s", "train tokens/s", "GPU busy in train", "cudaMalloc"],
                  [[r["variant"], C.fmt(r["logprobs_s"]), C.fmt(r["train_s"]),
                    C.fmt(real_tokens * cfg.trainer.update_epochs_per_batch / r["train_s"], 0),
                    "-" if r["gpu_busy_fraction"] is None else f"{r['gpu_busy_fraction']:.0%}",
                    "-" if r["cuda_mallocs"] is None else str(r["cuda_mallocs"])] for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
