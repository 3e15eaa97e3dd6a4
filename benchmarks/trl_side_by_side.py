"""Peer side by side: TRL's GRPOTrainer (its own transformers generation, no vLLM) against rlctl, same GRPO step.

    python benchmarks/trl_side_by_side.py --model /tmp/models/qwen2.5-coder-0.5b-instruct \\
        --rlctl-json step_qwen05.json --out trl_qwen05.json

Trains ``--generations`` GRPO steps with TRL's ``GRPOTrainer`` on the same model, GSM8K prompts (chat
template), reward (rlctl's scorer with the ``--preset``'s shaped reward), group size, batch and lengths
as benchmarks/step_breakdown.py (64 prompts x 8 samples, <= 512 new tokens; optimizer settings in
benchmarks/trl_config.yaml: 4 optimizer steps of 128 completions per generation, like rlctl's
``policy_mini_batch_size`` 16). A TRL "step" here is one generation plus its optimizer steps, the
unit of an rlctl step; its seconds are the wall time between the optimizer-step ends that close it
(a ``TrainerCallback``). Reported: median seconds per step over the steps after the first ``--skip``
(warm-up), samples/s (completions trained per second), and, from ``--rlctl-json`` (the JSON of a
step_breakdown.py run of the same model on the same machine, just before), rlctl's seconds per step,
samples/s and the ratio rlctl / TRL in samples/s.

Needs TRL 1.16.0 and datasets (benchmarks/fetch_trl_wheels.sh; on the H200 after the devkit, with
transformers 5.12.1). ``--cpu`` runs it on CPU for a smoke test (fp32, no bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=C.QWEN05, help="Hugging Face model folder (default: %(default)s)")
    ap.add_argument("--data", default=None, help="folder with train.parquet (default: /tmp/rlctl/data/gsm8k "
                    "if prepared, else the bundled 64-row sample)")
    ap.add_argument("--config", default=str(HERE / "trl_config.yaml"), help="GRPOConfig fields (YAML)")
    ap.add_argument("--preset", default="gsm8k-h200", help="rlctl preset whose reward settings are used")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--generations", type=int, default=3, help="GRPO steps (generations) to run")
    ap.add_argument("--skip", type=int, default=1, help="leading steps left out of the median (warm-up)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a GRPOConfig field (YAML value), repeatable")
    ap.add_argument("--rlctl-json", default=None, help="step_breakdown.py JSON to compare with")
    ap.add_argument("--max-wall-s", type=float, default=480, help="stop training after this many seconds")
    ap.add_argument("--output-dir", default="/tmp/trl_bench")
    ap.add_argument("--cpu", action="store_true", help="run on CPU in fp32 (smoke test)")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    return ap.parse_args(argv)


def grpo_config_dict(args) -> dict:
    import yaml

    cfg = yaml.safe_load(Path(args.config).read_text()) or {}
    for item in args.overrides:
        k, _, v = item.partition("=")
        cfg[k.strip()] = yaml.safe_load(v)
    per_dev = int(cfg.get("per_device_train_batch_size", 8))
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    rollouts = args.prompts * args.samples
    if rollouts % per_dev:
        raise SystemExit(f"--prompts x --samples = {rollouts} is not a multiple of per_device_train_batch_size {per_dev}")
    spg = rollouts // per_dev
    if spg % accum:
        raise SystemExit(f"steps_per_generation {spg} is not a multiple of gradient_accumulation_steps {accum}")
    cfg.update({"num_generations": args.samples, "max_completion_length": args.max_new_tokens,
                "steps_per_generation": spg, "max_steps": args.generations * (spg // accum),
                "output_dir": args.output_dir})
    if cfg.get("generation_batch_size") is None:
        cfg.pop("generation_batch_size", None)
    if args.cpu:
        cfg.update({"use_cpu": True, "bf16": False})
    return cfg


def build_dataset(args, data_dir: Path):
    from datasets import Dataset

    from rlctl.gsm8k import read_prompts

    rows = read_prompts([str(data_dir / "train.parquet")])
    need = args.prompts * (args.generations + 1)  # the bundled sample has only 64 rows: repeat it
    if len(rows) < need:
        rows = [rows[i % len(rows)] for i in range(need)]
    return Dataset.from_list([{"prompt": [{"role": str(m["role"]), "content": str(m["content"])} for m in r["prompt"]],
                               "answer": str(r["answer"])} for r in rows])


def make_reward(preset: str):
    """rlctl's GSM8K reward (the preset's shaped scores), as a TRL reward function."""
    from rlctl.config import load_config
    from rlctl.loop import make_reward_fn

    env = load_config(preset=preset).cfg.environment
    fn = make_reward_fn(env)

    def gsm8k_reward(prompts=None, completions=None, answer=None, completion_ids=None, **_):
        out = []
        for i, c in enumerate(completions):
            text = c[-1]["content"] if isinstance(c, list) else str(c)
            ids = list(completion_ids[i]) if completion_ids is not None else []
            out.append(fn(text, answer[i], ids)["reward"])
        return out

    return gsm8k_reward, {"method": env.reward.method, "correct_score": env.reward.correct_score,
                          "flexible_score": env.reward.flexible_score, "format_score": env.reward.format_score}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    data_dir = Path(args.data) if args.data else C.default_data_dir()
    cfg_dict = grpo_config_dict(args)
    opt_per_gen = cfg_dict["steps_per_generation"] // int(cfg_dict.get("gradient_accumulation_steps", 1))
    reward_fn, reward_cfg = make_reward(args.preset)
    dataset = build_dataset(args, data_dir)
    tok = AutoTokenizer.from_pretrained(args.model)
    result: dict = {"benchmark": "trl_side_by_side", "args": vars(args), "versions": C.versions(),
                    "data_dir": str(data_dir), "grpo_config": cfg_dict, "reward": reward_cfg,
                    "optimizer_steps_per_generation": opt_per_gen}

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.ends: dict[int, float] = {}

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.ends[state.global_step] = time.perf_counter()
            if time.perf_counter() - self.t0 > args.max_wall_s and state.global_step % opt_per_gen == 0:
                C.log(f"stopping: --max-wall-s {args.max_wall_s:.0f} reached after {state.global_step} optimizer steps")
                control.should_training_stop = True

    clock = Clock()
    C.log(f"TRL GRPOTrainer: {args.generations} steps of {args.prompts} x {args.samples}, "
          f"<= {args.max_new_tokens} new tokens, {opt_per_gen} optimizer steps each; model {args.model}; data {data_dir}")
    t_load = time.perf_counter()
    trainer = GRPOTrainer(model=args.model, reward_funcs=[reward_fn], args=GRPOConfig(**cfg_dict),
                          train_dataset=dataset, processing_class=tok, callbacks=[clock])
    result["setup_s"] = time.perf_counter() - t_load
    C.log(f"trainer built in {result['setup_s']:.1f} s; device {trainer.args.device}")
    trainer.train()
    if torch.cuda.is_available() and not args.cpu:
        result["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30

    # per GRPO step (generation + its optimizer steps)
    marks = [clock.t0] + [clock.ends.get(g) for g in range(opt_per_gen, args.generations * opt_per_gen + 1, opt_per_gen)]
    steps = []
    hist = [h for h in trainer.state.log_history if "step" in h and "loss" in h]
    for k in range(1, len(marks)):
        if marks[k] is None or marks[k - 1] is None:
            break
        logs = [h for h in hist if (k - 1) * opt_per_gen < h["step"] <= k * opt_per_gen]
        lens = [float(h["completions/mean_length"]) for h in logs if h.get("completions/mean_length") is not None]
        rew = [float(h["reward"]) for h in logs if h.get("reward") is not None]
        steps.append({"step": k, "s": marks[k] - marks[k - 1],
                      "completion_mean_length": sum(lens) / len(lens) if lens else None,
                      "reward_mean": sum(rew) / len(rew) if rew else None,
                      "num_tokens_seen": next((float(h["num_tokens"]) for h in reversed(logs)
                                               if h.get("num_tokens") is not None), None)})
    for i, s in enumerate(steps):
        prev = steps[i - 1]["num_tokens_seen"] if i else 0
        s["tokens"] = (s["num_tokens_seen"] - prev) if s["num_tokens_seen"] is not None and prev is not None else None
    used = steps[args.skip:] or steps[-1:]
    rollouts = args.prompts * args.samples
    trl_s = C.median([s["s"] for s in used])
    summary = {
        "steps_used": [s["step"] for s in used], "step_s": trl_s,
        "samples_per_s": rollouts / trl_s if trl_s else None,
        "completion_mean_length": C.median([s["completion_mean_length"] for s in used]),
        "tokens_per_s": C.median([s["tokens"] / s["s"] for s in used if s.get("tokens")]),
    }
    result["per_step"] = steps
    result["trl"] = summary

    rl = None
    if args.rlctl_json and Path(args.rlctl_json).is_file():
        rj = json.loads(Path(args.rlctl_json).read_text())
        rs = rj.get("summary", {})
        rl = {"json": args.rlctl_json, "model": rj.get("model"), "config": rj.get("config"),
              "step_s": rs.get("step_s"), "samples_per_s": rs.get("samples_per_s"),
              "completion_mean_length": (rs["rollout_tokens"] / rs["rollouts_per_step"]
                                         if rs.get("rollout_tokens") and rs.get("rollouts_per_step") else None),
              "tokens_per_s": rs.get("step_train_tokens_per_s")}
        c = rj.get("config") or {}
        mism = [f"{k} {c.get(k)} != {v}" for k, v in (("train_batch_size", args.prompts),
                                                     ("n_samples_per_prompt", args.samples),
                                                     ("max_new_tokens", args.max_new_tokens)) if c.get(k) != v]
        if rj.get("model") and Path(rj["model"]).name != Path(args.model).name:
            mism.append(f"model {rj['model']} != {args.model}")
        rl["mismatches"] = mism
        if mism:
            C.log("WARNING: the rlctl run differs: " + "; ".join(mism))
        result["rlctl"] = rl
        if rl["samples_per_s"] and summary["samples_per_s"]:
            result["ratio_rlctl_over_trl_samples_per_s"] = rl["samples_per_s"] / summary["samples_per_s"]
    C.write_json(args.out, result)
    rows = [["TRL GRPOTrainer (transformers generate)", C.fmt(trl_s), C.fmt(summary["samples_per_s"]),
             C.fmt(summary["completion_mean_length"], 0), C.fmt(summary["tokens_per_s"], 0)]]
    if rl:
        backend = (rl.get("config") or {}).get("backend") or "sglang"
        rows.append([f"rlctl ({backend}, colocated)", C.fmt(rl["step_s"]), C.fmt(rl["samples_per_s"]),
                     C.fmt(rl["completion_mean_length"], 0), C.fmt(rl["tokens_per_s"], 0)])
        r = result.get("ratio_rlctl_over_trl_samples_per_s")
        rows.append(["ratio rlctl / TRL (samples/s)", "", C.fmt(r), "", ""])
    else:
        rows.append(["rlctl", "(no --rlctl-json)", "", "", ""])
    C.print_table(f"GRPO step, {Path(args.model).name}, {args.prompts} prompts x {args.samples}, <= "
                  f"{args.max_new_tokens} new tokens, median of steps {summary['steps_used']}",
                  ["trainer", "s / step", "samples/s", "mean completion tokens", "train tokens/s (step)"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
