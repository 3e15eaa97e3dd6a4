"""Step breakdown: where a colocated GRPO step's seconds go, weight-sync bandwidth, training tokens/s and MFU.

    python benchmarks/step_breakdown.py --model /tmp/models/qwen2.5-coder-0.5b-instruct --steps 6 --out step_qwen05.json
    python benchmarks/step_breakdown.py --from-metrics docs/results/qwen05-h200/metrics.jsonl   # analyse a finished run

Runs ``rlctl train --backend sglang --preset gsm8k-h200`` in a subprocess (its own Ray cluster) for
``--steps`` steps with ``--prompts`` x ``--samples`` rollouts of at most ``--max-new-tokens`` (default
64 x 8, 512), no evaluation, then reads the run's ``metrics.jsonl`` and reports, as the median over the
steps after the first ``--skip-steps`` (step 1 carries the first onload and kernel warm-up):

* seconds per phase (``timing/*``): weight sync (wake weights + push + trainer offload), generate (wake
  KV cache + engine generate + sleep), reward (+ advantages), old log-probs (+ trainer onload), train;
  the engine's own sleep and wake seconds (``generator/sleep_s``, ``generator/wake_s``) and generate
  seconds (``generator/generate_s``). Eval and checkpoint time is left out of the step (the final
  step always checkpoints).
* weight sync GB/s = ``generator/weight_sync_bytes`` / ``generator/weight_sync_s`` (trainer side, all buckets).
* training tokens/s = ``train/tokens`` (prompt + response tokens, no padding) x update epochs / ``timing/train``,
  and MFU = 6 x N x tokens/s / the bf16 matmul rate measured by this script (``torch.matmul`` of two
  8192 x 8192 bf16 matrices in a child process before the run). N = the parameters that take part in
  matmuls (all but the input embedding table); the total is in the JSON. Attention-score FLOPs are
  not counted, so this MFU is a slight underestimate.
* the share of the step that is not generation: 1 - ``generator/generate_s`` / step (target <= 30%).
* the bare rate of the same model on the same card in the same call (after the run, in a child process: plain bf16
  forward + backward of one train micro-batch of the run's mean sequence length, and a no-grad forward of one forward
  micro-batch; ``_common.bare_model_rates``), and the ratios train phase / bare fwd+bwd and old-log-prob phase / bare
  forward; the trainer's memory metrics (``memory/*``) and the skipped (non-finite) optimizer steps.

Older runs without ``train/tokens`` get it estimated as ``rollout/tokens`` + rollouts x the mean
prompt length of the data (marked ``estimated``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PHASES = ("weight_sync", "generate", "reward", "advantages", "logprobs", "train", "log")
TARGET_NON_GEN = 0.30


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """Arguments of one ``rlctl train`` benchmark run (shared with scaling.py)."""
    ap.add_argument("--model", default=C.QWEN05, help="Hugging Face model folder (default: %(default)s)")
    ap.add_argument("--data", default=None, help="folder with train.parquet / validation.parquet (default: "
                    "/tmp/rlctl/data/gsm8k if prepared, else the bundled 64-row sample)")
    ap.add_argument("--backend", choices=("sglang", "hf"), default="sglang")
    ap.add_argument("--preset", default="gsm8k-h200")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip-steps", type=int, default=1, help="leading steps left out of the medians")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `rlctl train` override (repeatable)")
    ap.add_argument("--workdir", default="/tmp/rlctl_bench", help="runs, checkpoints and logs go here")
    ap.add_argument("--timeout", type=float, default=480, help="seconds before the training subprocess is killed")
    ap.add_argument("--keep-ckpt", action="store_true", help="keep the final checkpoint (deleted by default)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap)
    ap.add_argument("--name", default=None, help="run name (default: step_<model>_<time>)")
    ap.add_argument("--from-metrics", default=None, help="analyse this metrics.jsonl (its run's config.yaml "
                    "beside it) instead of training")
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--peak-tflops", type=float, default=None, help="use this bf16 rate instead of measuring it")
    ap.add_argument("--no-matmul", action="store_true", help="do not measure the matmul rate (no MFU)")
    ap.add_argument("--n-params", type=float, default=None, help="matmul parameters when the model folder is absent")
    ap.add_argument("--mean-prompt-tokens", type=float, default=None,
                    help="for runs without train/tokens when the model folder is absent (estimate)")
    ap.add_argument("--no-bare", action="store_true", help="do not measure the bare bf16 forward(+backward) rate")
    ap.add_argument("--bare", action="store_true", help="with --from-metrics on a GPU machine: measure the bare rates "
                    "too (the run's model and micro-batches), e.g. right after a real run in the same device call")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------- run
def train_overrides(args, run_name: str, data_dir: Path, extra: list[str] = ()) -> list[str]:
    rows = C.parquet_rows(data_dir / "train.parquet")
    steps_per_epoch = max(1, rows // args.prompts)
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    val = data_dir / "validation.parquet"
    wd = Path(args.workdir)
    ov = [
        f"trainer.policy.model.path={args.model}",
        f"data.train_data=['{data_dir / 'train.parquet'}']",
        f"data.val_data=['{val}']" if val.is_file() else "data.val_data=null",
        f"trainer.train_batch_size={args.prompts}",
        f"generator.n_samples_per_prompt={args.samples}",
        f"generator.sampling_params.max_new_tokens={args.max_new_tokens}",
        f"trainer.max_steps={args.steps}", f"trainer.epochs={epochs}",
        "trainer.eval_before_train=false", "trainer.eval_interval=-1",
        "trainer.ckpt_interval=-1", "trainer.max_ckpts_to_keep=1", "trainer.resume_mode=none",
        "trainer.rollout_dump_interval=-1", "trainer.logger=tensorboard",
        f"trainer.log_path={wd / 'runs'}", f"trainer.ckpt_path={wd / 'ckpts'}", f"trainer.run_name={run_name}",
        # stop cleanly (final checkpoint, metrics flushed) before the subprocess timeout
        f"trainer.max_wall_time_s={max(30.0, args.timeout - 150)}",
    ]
    if args.backend == "sglang":
        ov.append(f"generator.sglang.cuda_graph_max_bs_decode={args.prompts * args.samples}")
    return ov + list(extra) + list(args.overrides)


def run_train(args, run_name: str, extra: list[str] = ()) -> dict:
    """``rlctl train`` in a subprocess; returns ``{"rc", "wall_s", "run_dir", "log", "cmd"}``."""
    data_dir = Path(args.data) if args.data else C.default_data_dir()
    wd = Path(args.workdir)
    (wd / "logs").mkdir(parents=True, exist_ok=True)
    for sub in ("runs", "ckpts"):
        for old in (wd / sub).glob(f"*/{run_name}"):
            shutil.rmtree(old, ignore_errors=True)
    cmd = [sys.executable, "-m", "rlctl", "train", "--backend", args.backend, "--preset", args.preset,
           *train_overrides(args, run_name, data_dir, list(extra))]
    logf = wd / "logs" / f"{run_name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(C.REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    C.log(f"rlctl train ({run_name}): {args.steps} steps, {args.prompts} x {args.samples}, "
          f"<= {args.max_new_tokens} new tokens, data {data_dir}; log {logf}")
    t0 = time.perf_counter()
    with open(logf, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=args.timeout,
                                cwd=str(C.REPO)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    runs = sorted((wd / "runs").glob(f"*/{run_name}"))
    run_dir = runs[0] if runs else None
    C.log(f"rlctl train exited rc={rc} after {wall:.0f} s; run folder {run_dir}")
    if rc != 0:
        tail = logf.read_text(errors="replace").splitlines()[-25:]
        print("---- last lines of the training log ----\n" + "\n".join(tail), flush=True)
    if not getattr(args, "keep_ckpt", False):
        for d in (wd / "ckpts").glob(f"*/{run_name}"):
            shutil.rmtree(d, ignore_errors=True)
    return {"rc": rc, "wall_s": wall, "run_dir": str(run_dir) if run_dir else None, "log": str(logf), "cmd": cmd}


# ---------------------------------------------------------------------------------------------- analysis
def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def read_config(run_dir: Path) -> dict:
    import yaml

    p = run_dir / "config.yaml"
    return yaml.safe_load(p.read_text()) if p.is_file() else {}


def _get(d: dict, path: str, default=None):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def mean_prompt_tokens(model_path: str, data_paths: list[str], limit: int = 2000) -> float | None:
    try:
        from transformers import AutoTokenizer

        from rlctl.gsm8k import read_prompts
        from rlctl.loop import tokenize_prompts

        tok = AutoTokenizer.from_pretrained(model_path)
        data = tokenize_prompts(read_prompts(data_paths)[:limit], tok, 10 ** 9)
        return sum(map(len, data.prompt_ids)) / max(1, len(data.prompt_ids))
    except Exception as e:  # noqa: BLE001
        C.log(f"note: could not measure prompt lengths ({type(e).__name__}: {e})")
        return None


def analyze(metrics_path: Path, skip_steps: int = 1, peak_tflops: float | None = None,
            n_params: dict | None = None, mean_prompt: float | None = None) -> dict:
    """Medians per phase and the derived rates of one run (see the module doc)."""
    run_dir = metrics_path.parent
    cfg = read_config(run_dir)
    rows = [r for r in read_metrics(metrics_path) if "timing/train" in r]
    if not rows:
        raise RuntimeError(f"{metrics_path}: no training steps logged")
    used = [r for r in rows if r["step"] > skip_steps] or rows[-1:]
    prompts = _get(cfg, "trainer.train_batch_size")
    samples = _get(cfg, "generator.n_samples_per_prompt")
    rollouts = prompts * samples if prompts and samples else None
    epochs = _get(cfg, "trainer.update_epochs_per_batch", 1) or 1
    model = _get(cfg, "trainer.policy.model.path")

    est_prompt = mean_prompt
    if est_prompt is None and any("train/tokens" not in r for r in used):
        est_prompt = mean_prompt_tokens(model, _get(cfg, "data.train_data", []) or []) if model else None

    per_step = []
    for r in used:
        core = sum(r.get(f"timing/{p}", 0.0) for p in PHASES)
        if "train/tokens" in r:
            tokens, estimated = r["train/tokens"], False
        elif est_prompt is not None and rollouts:
            tokens, estimated = r["rollout/tokens"] + rollouts * est_prompt, True
        else:
            tokens, estimated = None, True
        per_step.append({
            "step": r["step"], "step_s": core,
            **{p: r.get(f"timing/{p}", 0.0) for p in PHASES},
            "engine_generate_s": r.get("generator/generate_s", r.get("generator/engine_gen_time_s")),  # sglang / hf
            "sleep_s": r.get("generator/sleep_s"), "wake_s": r.get("generator/wake_s"),
            "weight_push_s": r.get("generator/weight_sync_s"), "weight_push_bytes": r.get("generator/weight_sync_bytes"),
            "engine_update_s": r.get("generator/update_weights_s"),
            "rollout_tokens": r.get("rollout/tokens"), "train_tokens": tokens, "train_tokens_estimated": estimated,
            "train_padded_tokens": r.get("train/padded_tokens"),
            "trainer_peak_reserved_bytes": r.get("memory/trainer_peak_reserved_bytes"),
            "trainer_peak_allocated_bytes": r.get("memory/trainer_peak_allocated_bytes"),
            "trainer_reserved_bytes_offloaded": r.get("memory/trainer_reserved_bytes_offloaded"),
            "trainer_bytes_at_kv_wake": r.get("memory/trainer_reserved_bytes_at_kv_wake"),
            "skipped_steps": r.get("policy/skipped_steps"),
        })
    m = lambda k: C.median([s[k] for s in per_step if s.get(k) is not None])  # noqa: E731
    step_s = m("step_s")
    gen_engine = m("engine_generate_s")
    ws_gbps = C.median([s["weight_push_bytes"] / s["weight_push_s"] / 1e9 for s in per_step
                        if s.get("weight_push_s") and s.get("weight_push_bytes")])
    train_tps = C.median([s["train_tokens"] * epochs / s["train"] for s in per_step
                          if s.get("train_tokens") and s.get("train")])
    step_train_tps = C.median([s["train_tokens"] * epochs / s["step_s"] for s in per_step
                               if s.get("train_tokens") and s.get("step_s")])
    n_matmul = (n_params or {}).get("matmul")
    mfu = 6.0 * n_matmul * train_tps / (peak_tflops * 1e12) if n_matmul and train_tps and peak_tflops else None
    mfu_total = (6.0 * n_params["total"] * train_tps / (peak_tflops * 1e12)
                 if n_params and n_params.get("total") and train_tps and peak_tflops else None)
    kl = bool(_get(cfg, "trainer.algorithm.use_kl_loss", False))
    lp_tps = C.median([s["train_tokens"] * (2 if kl else 1) / s["logprobs"] for s in per_step
                       if s.get("train_tokens") and s.get("logprobs")])
    mx = lambda k: max((s[k] for s in per_step if s.get(k) is not None), default=None)  # noqa: E731
    summary = {
        "steps_used": [s["step"] for s in per_step], "rollouts_per_step": rollouts,
        "logprobs_tokens_per_s": lp_tps, "kl_reference_forward": kl,
        "mfu_train_vs_989": 6.0 * n_matmul * train_tps / 989e12 if n_matmul and train_tps else None,
        "trainer_peak_reserved_bytes_max": mx("trainer_peak_reserved_bytes"),
        "trainer_peak_allocated_bytes_max": mx("trainer_peak_allocated_bytes"),
        "trainer_reserved_bytes_offloaded_max": mx("trainer_reserved_bytes_offloaded"),
        "trainer_bytes_at_kv_wake_max": mx("trainer_bytes_at_kv_wake"),
        "skipped_optimizer_steps_all_steps": sum(r.get("policy/skipped_steps", 0.0) or 0.0 for r in rows),
        # whether the run learns at all (every step, in order): GSM8K's answer format rises within ~5 steps in a run
        # that learns (docs/benchmarks.md 5d: the runs of e68745c did not)
        "format_rate_by_step": [r.get("reward/format_rate") for r in rows if "timing/step" in r],
        "step_s": step_s,
        "phases_s": {p: m(p) for p in PHASES},
        "engine_generate_s": gen_engine, "sleep_s": m("sleep_s"), "wake_s": m("wake_s"),
        "weight_push_s": m("weight_push_s"), "weight_push_bytes": m("weight_push_bytes"),
        "engine_update_weights_s": m("engine_update_s"),
        "weight_sync_GBps": ws_gbps,
        "rollout_tokens": m("rollout_tokens"),
        "rollout_tokens_per_s": (m("rollout_tokens") / gen_engine) if gen_engine and m("rollout_tokens") else None,
        "train_tokens": m("train_tokens"), "train_tokens_estimated": any(s["train_tokens_estimated"] for s in per_step),
        "update_epochs_per_batch": epochs,
        "train_tokens_per_s": train_tps, "step_train_tokens_per_s": step_train_tps,
        "samples_per_s": rollouts / step_s if rollouts and step_s else None,
        "n_params": n_params, "peak_bf16_tflops": peak_tflops,
        "mfu_train": mfu, "mfu_train_total_params": mfu_total,
        "non_generation_share": 1.0 - gen_engine / step_s if gen_engine and step_s else None,
        "non_generate_phase_share": 1.0 - m("generate") / step_s if step_s else None,
        "target_non_generation_share": TARGET_NON_GEN,
    }
    s = summary["non_generation_share"]
    summary["meets_target"] = bool(s is not None and s <= TARGET_NON_GEN)
    return {"metrics": str(metrics_path), "model": model, "config": {
        "train_batch_size": prompts, "n_samples_per_prompt": samples,
        "max_new_tokens": _get(cfg, "generator.sampling_params.max_new_tokens"),
        "policy_mini_batch_size": _get(cfg, "trainer.policy_mini_batch_size"),
        "micro_train_batch_size_per_gpu": _get(cfg, "trainer.micro_train_batch_size_per_gpu"),
        "micro_forward_batch_size_per_gpu": _get(cfg, "trainer.micro_forward_batch_size_per_gpu"),
        "policy_num_gpus_per_node": _get(cfg, "trainer.placement.policy_num_gpus_per_node"),
        "num_inference_engines": _get(cfg, "generator.num_inference_engines"),
        "backend": _get(cfg, "generator.backend")}, "per_step": per_step, "summary": summary}


def _span(steps: list[int]) -> str:
    if not steps:
        return "-"
    return f"{steps[0]}-{steps[-1]}" if steps == list(range(steps[0], steps[-1] + 1)) and len(steps) > 1 else str(steps)


def print_report(res: dict, title: str) -> None:
    s = res["summary"]
    step = s["step_s"] or float("nan")
    ph = s["phases_s"]

    def row(name, secs, note=""):
        share = f"{100 * secs / step:.0f}%" if secs is not None and step == step and step > 0 else ""
        return [name, C.fmt(secs, 3 if secs is not None and secs < 1 else 2), share, note]

    gb = s["weight_push_bytes"]
    rows = [
        row("generate (engine)", s["engine_generate_s"], f"{C.fmt(s['rollout_tokens_per_s'], 0)} rollout tok/s"),
        row("generate phase", ph["generate"], "wake KV + generate + sleep + Ray"),
        row("reward + advantages", (ph["reward"] or 0) + (ph["advantages"] or 0)),
        row("old log-probs", ph["logprobs"], "incl. trainer onload"),
        row("train", ph["train"], f"{C.fmt(s['train_tokens_per_s'], 0)} tok/s"
            + (" (est.)" if s["train_tokens_estimated"] else "")),
        row("weight sync phase", ph["weight_sync"], "wake weights + push + offload"),
        row("  weight push (trainer side)", s["weight_push_s"],
            f"{C.fmt(gb / 1e9 if gb else None)} GB at {C.fmt(s['weight_sync_GBps'])} GB/s"),
        row("  sleep + wake (engine)", (s["sleep_s"] or 0) + (s["wake_s"] or 0) if s["sleep_s"] is not None else None,
            f"sleep {C.fmt(s['sleep_s'], 3)} s, wake {C.fmt(s['wake_s'], 3)} s"),
        row("step (w/o eval, ckpt)", s["step_s"], f"{C.fmt(s['samples_per_s'])} samples/s"),
        ["MFU (train phase)", "", "", (f"{100 * s['mfu_train']:.1f}% of {C.fmt(s['peak_bf16_tflops'], 0 if s['peak_bf16_tflops'] >= 10 else 3)} TFLOP/s "
                                      f"{s.get('peak_source') or ''}" if s["mfu_train"] is not None else "n/a")],
        ["train / bare fwd+bwd", "", C.fmt(s.get("train_vs_bare")), f"bare {C.fmt(s.get('bare_fwd_bwd_tokens_per_s'), 0)} tok/s"],
        ["old log-probs / bare fwd", "", C.fmt(s.get("logprobs_vs_bare")),
         f"{C.fmt(s.get('logprobs_tokens_per_s'), 0)} vs bare {C.fmt(s.get('bare_fwd_tokens_per_s'), 0)} tok/s"],
        ["trainer peak reserved", "", C.fmt((s.get("trainer_peak_reserved_bytes_max") or 0) / 2**30), "GiB (max over steps)"],
        ["trainer peak allocated", "", ("n/a" if s.get("trainer_peak_allocated_bytes_max") is None
                                        else C.fmt(s["trainer_peak_allocated_bytes_max"] / 2**30)), "GiB (max over steps)"],
        ["trainer reserved offloaded", "", C.fmt((s.get("trainer_reserved_bytes_offloaded_max") or 0) / 2**30), "GiB (max)"],
        ["skipped optimizer steps", "", C.fmt(s.get("skipped_optimizer_steps_all_steps"), 0), "all steps"],
        ["answer-format rate by step", "", "", " ".join("-" if v is None else f"{v:.3f}"
                                                     for v in s.get("format_rate_by_step") or [])],
        ["non-generation share", "", (f"{100 * s['non_generation_share']:.0f}%"
                                      if s["non_generation_share"] is not None else "n/a"),
         f"target <= 30%: {'met' if s['meets_target'] else 'NOT met'}"],
    ]
    C.print_table(title, ["phase", "seconds", "share", "notes"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    result: dict = {"benchmark": "step_breakdown", "args": vars(args), "versions": C.versions()}
    peak = args.peak_tflops
    want_matmul = peak is None and not args.no_matmul
    if want_matmul and args.from_metrics and C.visible_gpus() == 0:
        want_matmul = False  # analysing a finished run on a machine without a GPU: no peak, no MFU
    if want_matmul:
        C.log(f"measuring the matmul rate ({args.matmul_size}^3)")
        mm = C.matmul_tflops_subprocess(args.matmul_size)
        result["matmul"] = mm
        peak = mm["tflops"]
        C.log(f"matmul: {peak:.1f} TFLOP/s ({mm['dtype']}, n={mm['n']}, {mm['device']})")
    rc = 0
    if args.from_metrics:
        metrics = Path(args.from_metrics)
    else:
        name = args.name or f"step_{Path(args.model).name}_{time.strftime('%H%M%S')}"
        run = run_train(args, name)
        result["run"] = run
        rc = run["rc"]
        if not run["run_dir"] or not (Path(run["run_dir"]) / "metrics.jsonl").is_file():
            C.write_json(args.out, result)
            print(f"step_breakdown: no metrics (rlctl train rc={rc}); see {run['log']}", flush=True)
            return rc or 1
        metrics = Path(run["run_dir"]) / "metrics.jsonl"
    cfg = read_config(metrics.parent)
    model = _get(cfg, "trainer.policy.model.path") or args.model
    n_params = None
    if args.n_params:
        n_params = {"matmul": int(args.n_params), "total": None}
    elif model and Path(model).expanduser().is_dir():
        n_params = C.model_param_counts(str(Path(model).expanduser()))
    title_model = Path(model).name if model else metrics.parent.name
    try:
        res = analyze(metrics, args.skip_steps, peak, n_params, args.mean_prompt_tokens)
    except RuntimeError as e:
        C.write_json(args.out, result)
        print(f"step_breakdown: {e}", flush=True)
        return rc or 1
    res["summary"]["peak_source"] = "measured" if "matmul" in result else ("given" if peak else None)
    sm, c = res["summary"], res["config"]
    result.update(res)
    C.write_json(args.out, result)  # the run's numbers now: a call cut off during the bare rates keeps them
    if not args.no_bare and (args.bare or not args.from_metrics) and model and Path(model).expanduser().is_dir() and C.visible_gpus() > 0 \
            and sm.get("train_tokens") and sm.get("rollouts_per_step"):
        seq_len = max(8, round(sm["train_tokens"] / sm["rollouts_per_step"]))
        micro_t = c.get("micro_train_batch_size_per_gpu") or 1
        micro_f = c.get("micro_forward_batch_size_per_gpu") or 1
        C.log(f"bare bf16 rates of {model}: {micro_t} x {seq_len} fwd+bwd, {micro_f} x {seq_len} fwd")
        try:
            bare = C.bare_model_rates_subprocess(str(Path(model).expanduser()), seq_len, micro_t, micro_f)
            result["bare"] = bare
            sm["bare_fwd_bwd_tokens_per_s"] = bare["fwd_bwd_tokens_per_s"]
            sm["bare_fwd_tokens_per_s"] = bare["fwd_tokens_per_s"]
            sm["train_vs_bare"] = sm["train_tokens_per_s"] / bare["fwd_bwd_tokens_per_s"] if sm["train_tokens_per_s"] else None
            sm["logprobs_vs_bare"] = sm["logprobs_tokens_per_s"] / bare["fwd_tokens_per_s"] if sm["logprobs_tokens_per_s"] else None
            C.log(f"bare: fwd+bwd {bare['fwd_bwd_tokens_per_s']:,.0f} tok/s, fwd {bare['fwd_tokens_per_s']:,.0f} tok/s; "
                  f"train/bare {C.fmt(sm['train_vs_bare'])}, logprobs/bare {C.fmt(sm['logprobs_vs_bare'])}")
        except Exception as e:  # noqa: BLE001 - the run's numbers stay useful without it
            result["bare_error"] = f"{type(e).__name__}: {e}"
            C.log(f"bare rate failed: {result['bare_error']}")
    result.update(res)
    C.write_json(args.out, result)
    c = res["config"]
    print_report(res, f"step breakdown: {title_model}, {c['train_batch_size']} prompts x {c['n_samples_per_prompt']}, "
                      f"<= {c['max_new_tokens']} new tokens, {c['policy_num_gpus_per_node']} GPU(s), "
                      f"median of steps {_span(res['summary']['steps_used'])}")
    return rc


if __name__ == "__main__":  # the run spawns SGLang and Ray processes: keep all work under this guard
    sys.exit(main())
