"""Rollout overhead: the same GRPO-shaped batch through a bare ``sglang.Engine`` and through rlctl's generator actor.

    python benchmarks/rollout_overhead.py --model /tmp/models/qwen2.5-coder-0.5b-instruct --out rollout.json

One process, back to back (``--order`` picks which side goes first):

1. **bare**: ``sglang.Engine(**kwargs)`` in this process, with exactly the engine arguments rlctl builds
   for ``--preset`` (``rlctl.job.cluster.generator_kwargs``: attention backend, memory fraction, decode-only
   CUDA graphs sized to the batch, memory saver, seed); ``engine.generate(input_ids=..., sampling_params=...)``
   timed twice per repeat: without log-probs (the plain engine) and with ``return_logprob=True``
   (what RL needs). Then the engine is shut down.
2. **rlctl**: one ``rlctl.job.actors.GeneratorWorker`` Ray actor (1 GPU) hosting ``SGLangGenerator`` with the
   same arguments, called through ``GeneratorGroup.generate`` exactly as the training loop calls it
   (prompt split, Ray round trip, log-probs, token-id lists back in the driver), not colocated (no
   sleep/wake: that cost is in step_breakdown.py).

Each side: one untimed warm-up generate of the full batch (the first generate of a fresh engine JITs
Triton kernels, ~75 s without CUDA graphs), then ``--repeats`` timed ones. Tokens/s = output tokens /
wall seconds of the call, median over repeats; ratio = rlctl / bare (target >= 0.95). Sampling is
random (T=1, natural stop), so each call's token count differs a little; tokens/s normalizes that.

``--backend hf`` runs the same comparison with the transformers backend on CPU (in-process
``HFGenerator`` vs the actor): a smoke test of the script, not a benchmark.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=C.QWEN05, help="Hugging Face model folder (default: %(default)s)")
    ap.add_argument("--data", default=None, help="folder with train.parquet (default: /tmp/rlctl/data/gsm8k "
                    "if prepared, else the bundled 64-row sample)")
    ap.add_argument("--backend", choices=("sglang", "hf"), default="sglang")
    ap.add_argument("--preset", default="gsm8k-h200", help="engine settings come from this preset (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra rlctl config override (repeatable), e.g. generator.gpu_memory_utilization=0.5")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (prompts are repeated)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--order", choices=("bare-first", "rlctl-first"), default="bare-first")
    ap.add_argument("--no-bare-logprobs", action="store_true", help="skip the bare engine's return_logprob run")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    return ap.parse_args(argv)


def load_cfg(args):
    from rlctl.config import load_config

    ov = [f"trainer.policy.model.path={args.model}", "trainer.placement.policy_num_gpus_per_node=1",
          "generator.num_inference_engines=1", f"generator.n_samples_per_prompt={args.samples}",
          f"generator.sampling_params.max_new_tokens={args.max_new_tokens}",
          f"generator.sampling_params.temperature={args.temperature}"]
    if args.backend == "hf":
        ov += ["trainer.device=cpu"]
    else:  # decode CUDA graphs sized to the batch, as step_breakdown.py sets them for `rlctl train`
        ov += [f"generator.sglang.cuda_graph_max_bs_decode={args.prompts * args.samples}"]
    return load_config(preset=args.preset, overrides=ov + list(args.overrides), backend=args.backend).cfg


def timed(fn, tokens_of) -> dict:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    ntok = tokens_of(out)
    return {"s": dt, "tokens": ntok, "tokens_per_s": ntok / dt if dt > 0 else 0.0}


# ---------------------------------------------------------------------------------------------- bare
def run_bare(args, cfg, device, prompts, sampling) -> dict:
    from rlctl.job.cluster import generator_kwargs

    kw = generator_kwargs(cfg, device)
    res: dict = {"engine_kwargs": {k: v for k, v in kw.items()}}
    if args.backend == "hf":
        from rlctl.generator import load_generator

        t0 = time.perf_counter()
        gen = load_generator("hf", **kw)
        res["start_s"] = time.perf_counter() - t0
        fns = {"bare": lambda: gen.generate(prompts, sampling)}
        count = lambda o: sum(len(x) for x in o.output_ids)  # noqa: E731
        close = lambda: None  # noqa: E731
    else:
        import sglang

        kw.pop("colocated", None)
        kw["random_seed"] = kw.pop("seed")
        kw["skip_tokenizer_init"] = True
        for k in ("cuda_graph_max_bs_decode", "max_running_requests"):
            if kw.get(k) is None:
                kw.pop(k, None)
        res["engine_kwargs"] = dict(kw)
        params = {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                  "top_p": sampling.top_p, "top_k": sampling.top_k, "min_p": sampling.min_p,
                  "stop_token_ids": list(sampling.stop_token_ids)}
        # as SGLangGenerator does: torch_memory_saver refuses expandable segments in the engine's environment
        import os

        alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        if "expandable_segments:True" in alloc:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(
                p for p in alloc.split(",") if not p.startswith("expandable_segments"))
        t0 = time.perf_counter()
        eng = sglang.Engine(**kw)
        res["start_s"] = time.perf_counter() - t0
        fns = {"bare": lambda: eng.generate(input_ids=prompts, sampling_params=params)}
        if not args.no_bare_logprobs:
            fns["bare+logprobs"] = lambda: eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
        count = lambda o: sum(len(x["output_ids"]) for x in o)  # noqa: E731
        close = eng.shutdown
    try:
        C.log(f"bare: engine up in {res['start_s']:.1f} s; warm-up generate")
        res["warmup"] = timed(next(iter(fns.values())), count)
        C.log(f"bare: warm-up {res['warmup']['s']:.1f} s")
        for name in fns:
            res[name] = []
        for r in range(args.repeats):
            for name, fn in fns.items():  # interleaved, so drift hits both variants alike
                m = timed(fn, count)
                res[name].append(m)
                C.log(f"{name} #{r + 1}: {m['tokens']} tokens in {m['s']:.2f} s = {m['tokens_per_s']:,.0f} tok/s")
    finally:
        close()
    return res


# ---------------------------------------------------------------------------------------------- rlctl
def run_rlctl(args, cfg, device, prompts, sampling) -> dict:
    import os

    import ray

    from rlctl.job.actors import GeneratorWorker
    from rlctl.job.cluster import generator_kwargs, init_ray, shutdown_ray
    from rlctl.job.groups import GeneratorGroup

    kw = generator_kwargs(cfg, device)
    if args.backend == "sglang":
        kw["colocated"] = False  # engine stays awake: pure generation, as in `rlctl eval`
    started = init_ray(cfg, device)
    res: dict = {}
    group = None
    try:
        # One actor with a whole GPU, the way build_groups places a non-colocated engine. (Built here
        # rather than with build_groups(with_trainer=False), which also reserves the absent trainer's GPU.)
        threads = max(1, os.cpu_count() or 1)
        actor = ray.remote(GeneratorWorker).options(num_cpus=1, num_gpus=1 if device == "cuda" else 0,
                                                    max_concurrency=1).remote(args.backend, kw, threads)
        t0 = time.perf_counter()
        ray.get(actor.start.remote())
        res["start_s"] = time.perf_counter() - t0
        group = GeneratorGroup([actor], args.backend, colocated=False)
        count = lambda o: sum(len(x) for x in o.output_ids)  # noqa: E731
        C.log(f"rlctl: actor up in {res['start_s']:.1f} s; warm-up generate")
        res["warmup"] = timed(lambda: group.generate(prompts, sampling), count)
        C.log(f"rlctl: warm-up {res['warmup']['s']:.1f} s")
        res["rlctl"] = []
        for r in range(args.repeats):
            m = timed(lambda: group.generate(prompts, sampling), count)
            st = group.last_stats()
            # the generate call inside the actor (sglang: generate_s, hf: gen_time_s)
            m["engine_generate_s"] = st.get("engine_generate_s", st.get("engine_gen_time_s"))
            res["rlctl"].append(m)
            C.log(f"rlctl #{r + 1}: {m['tokens']} tokens in {m['s']:.2f} s = {m['tokens_per_s']:,.0f} tok/s "
                  f"(inside the actor {m['engine_generate_s'] or float('nan'):.2f} s)")
    finally:
        if group is not None:
            try:
                ray.get([w.shutdown.remote() for w in group.workers], timeout=120)
            except Exception:  # noqa: BLE001
                pass
            for w in group.workers:
                ray.kill(w, no_restart=True)
        # ray.shutdown() plus init_ray's watchdog: stop it now (a bare engine run later, or SGLang's atexit
        # kill_process_tree, would otherwise find it still a child of this process)
        shutdown_ray(started)
    return res


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    from rlctl.loop import sampling_from
    from rlctl.models import stop_token_ids

    data_dir = Path(args.data) if args.data else C.default_data_dir()
    cfg = load_cfg(args)
    device = "cpu" if args.backend == "hf" else "cuda"
    ids, _ = C.load_prompt_ids(args.model, data_dir, args.prompts, cfg.trainer.max_prompt_length)
    prompts = [p for p in ids for _ in range(args.samples)]  # group-major, as the loop builds them
    sampling = sampling_from(cfg.generator.sampling_params, stop_token_ids(args.model), seed=None)
    C.log(f"{len(prompts)} sequences ({args.prompts} prompts x {args.samples}), mean prompt "
          f"{sum(map(len, ids)) / len(ids):.0f} tokens, max_new_tokens {sampling.max_new_tokens}, "
          f"T={sampling.temperature}, stops {list(sampling.stop_token_ids)}; data {data_dir}")

    result: dict = {"benchmark": "rollout_overhead", "args": vars(args), "data_dir": str(data_dir),
                    "sequences": len(prompts), "versions": C.versions(),
                    "sampling": {k: getattr(sampling, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                                   "min_p", "stop_token_ids")}}
    order = ("bare", "rlctl") if args.order == "bare-first" else ("rlctl", "bare")
    for side in order:
        result[side] = (run_bare if side == "bare" else run_rlctl)(args, cfg, device, prompts, sampling)

    def med(runs, key="tokens_per_s"):
        return C.median([r[key] for r in runs]) if runs else None

    bare = med(result["bare"]["bare"])
    bare_lp = med(result["bare"].get("bare+logprobs", []))
    rl = med(result["rlctl"]["rlctl"])
    rl_inside = C.median([r["tokens"] / r["engine_generate_s"] for r in result["rlctl"]["rlctl"]
                          if r.get("engine_generate_s")])
    result["summary"] = {
        "bare_tokens_per_s": bare, "bare_logprobs_tokens_per_s": bare_lp, "rlctl_tokens_per_s": rl,
        "rlctl_inside_actor_tokens_per_s": rl_inside,
        "ratio_rlctl_over_bare": rl / bare if rl and bare else None,
        "ratio_rlctl_over_bare_logprobs": rl / bare_lp if rl and bare_lp else None,
        "target_ratio": 0.95,
        "meets_target": bool(rl and bare and rl / bare >= 0.95),
    }
    C.write_json(args.out, result)
    s = result["summary"]
    rows = [
        ["bare sglang.Engine" if args.backend == "sglang" else "bare HFGenerator (in process)", C.fmt(bare, 0), C.fmt(med(result["bare"]["bare"], "s")), "1.00"],
    ]
    if bare_lp:
        rows.append(["bare + return_logprob", C.fmt(bare_lp, 0), C.fmt(med(result["bare"]["bare+logprobs"], "s")),
                     C.fmt(bare_lp / bare if bare else None)])
    rows.append(["rlctl generator actor (Ray)", C.fmt(rl, 0), C.fmt(med(result["rlctl"]["rlctl"], "s")),
                 C.fmt(s["ratio_rlctl_over_bare"])])
    print(f"rlctl / bare = {C.fmt(s['ratio_rlctl_over_bare'], 3)} (target >= 0.95: "
          f"{'met' if s['meets_target'] else 'NOT met'})", flush=True)
    C.print_table(f"rollout overhead: {Path(args.model).name}, {args.prompts} prompts x {args.samples}, "
                  f"<= {args.max_new_tokens} new tokens, {args.backend}, median of {args.repeats}",
                  ["path", "tokens/s", "seconds", "ratio to bare"], rows)
    return 0


if __name__ == "__main__":  # SGLang spawns its scheduler: keep all work under this guard
    sys.exit(main())
