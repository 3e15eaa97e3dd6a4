"""Scaling: the step_breakdown.py run on 2 GPUs (data-parallel FSDP2 trainer, one SGLang engine per GPU) vs 1 GPU.

    python benchmarks/scaling.py --model /tmp/models/qwen2.5-coder-0.5b-instruct --out scaling.json
    python benchmarks/scaling.py --baseline-json step_qwen05.json --out scaling.json   # reuse a 1-GPU run

Same global batch in both runs (``--prompts`` x ``--samples``, default 64 x 8, <= 512 new tokens): the
2-GPU run adds ``trainer.placement.policy_num_gpus_per_node=2 generator.num_inference_engines=2`` (each
GPU holds one trainer rank and one engine, colocated; each engine generates half the rollouts, each
rank trains on half). Throughput = rollouts per second of the step (eval and checkpoint excluded),
median over the steps after the first ``--skip-steps``; ratio = 2 GPUs / 1 GPU (ideal 2.0).

The 1-GPU run is made here, first (``CUDA_VISIBLE_DEVICES`` limited to one GPU), unless
``--baseline-json`` names a step_breakdown.py JSON of the same settings measured on the same machine
just before. With fewer than 2 GPUs visible the script prints "needs 2 GPUs", writes a JSON saying so
and exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import step_breakdown as SB  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    SB.add_run_args(ap)
    ap.set_defaults(steps=5)
    ap.add_argument("--gpus", type=int, default=2, help="GPUs of the scaled run (default: %(default)s)")
    ap.add_argument("--baseline-json", default=None, help="step_breakdown.py JSON of the 1-GPU run to reuse")
    ap.add_argument("--only-scaled", action="store_true", help="run only the multi-GPU configuration")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    return ap.parse_args(argv)


def one_run(args, gpus: int, name: str) -> dict:
    extra = [f"trainer.placement.policy_num_gpus_per_node={gpus}", f"generator.num_inference_engines={gpus}"]
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if args.backend == "sglang":
        visible = [d for d in (old.split(",") if old else [str(i) for i in range(C.visible_gpus())]) if d != ""]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:gpus])
    try:
        run = SB.run_train(args, name, extra)
    finally:
        if args.backend == "sglang":
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
    out = {"gpus": gpus, "run": run}
    if run["run_dir"] and (Path(run["run_dir"]) / "metrics.jsonl").is_file():
        try:
            out.update(SB.analyze(Path(run["run_dir"]) / "metrics.jsonl", args.skip_steps))
        except RuntimeError as e:
            out["error"] = str(e)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    result: dict = {"benchmark": "scaling", "args": vars(args), "versions": C.versions()}
    n = C.visible_gpus() if args.backend == "sglang" else args.gpus  # the hf backend runs on CPU (smoke test)
    result["visible_gpus"] = n
    if n < args.gpus:
        result["status"] = f"needs {args.gpus} GPUs, {n} visible: not run"
        C.write_json(args.out, result)
        print(f"scaling: needs {args.gpus} GPUs, {n} visible: not run (use a 2-GPU machine, e.g. the "
              "nvidia-h200-x2 device kind)", flush=True)
        C.print_table("scaling: not run", ["GPUs", "samples/s", "ratio"], [["1", "n/a", ""], [str(args.gpus), "n/a", "needs "
                      f"{args.gpus} GPUs"]])
        return 3
    stamp = time.strftime("%H%M%S")
    base = None
    if args.baseline_json:
        base = json.loads(Path(args.baseline_json).read_text())
        base["gpus"] = 1
        result["baseline_from"] = args.baseline_json
    elif not args.only_scaled:
        base = one_run(args, 1, f"scale1_{Path(args.model).name}_{stamp}")
        # keep the 1-GPU result even if the scaled run is cut short by an outer timeout
        result["runs"] = {"1": base}
        result["status"] = "incomplete"
        C.write_json(args.out, result)
    scaled = one_run(args, args.gpus, f"scale{args.gpus}_{Path(args.model).name}_{stamp}")
    result["runs"] = {"1": base, str(args.gpus): scaled}

    def tput(r):
        return ((r or {}).get("summary") or {}).get("samples_per_s")

    t1, tn = tput(base), tput(scaled)
    result["ratio"] = tn / t1 if t1 and tn else None
    result["efficiency"] = result["ratio"] / args.gpus if result["ratio"] else None
    result["status"] = "ok" if result["ratio"] else "incomplete"
    C.write_json(args.out, result)
    rows = []
    for r in (base, scaled):
        if r is None:
            continue
        s = r.get("summary") or {}
        ph = s.get("phases_s") or {}
        rows.append([str(r["gpus"]), C.fmt(s.get("step_s")), C.fmt(s.get("samples_per_s")),
                     C.fmt(s.get("engine_generate_s")), C.fmt(ph.get("train")), C.fmt(ph.get("logprobs")),
                     C.fmt(ph.get("weight_sync")), C.fmt(tput(r) / t1 if t1 and tput(r) else None)])
    C.print_table(f"scaling: {Path(args.model).name}, {args.prompts} prompts x {args.samples}, <= "
                  f"{args.max_new_tokens} new tokens (global batch fixed)",
                  ["GPUs", "s / step", "samples/s", "generate s", "train s", "log-probs s", "weight sync s",
                   "throughput ratio"], rows)
    rc = max(int((r or {}).get("run", {}).get("rc", 0) or 0) for r in (base, scaled) if r is not None and "run" in r)
    return 0 if result["ratio"] else (rc or 1)


if __name__ == "__main__":
    sys.exit(main())
