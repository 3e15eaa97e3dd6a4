"""Memory calibration: rlctl.memory_plan's predictions against what finished runs measured.

    python benchmarks/memory_calibration.py docs/results/qwen05-h200 --gpu-memory-gb 140.4 \\
        --model-config path/to/qwen2.5-coder-0.5b-instruct/config.json
    python benchmarks/memory_calibration.py RUN_DIR... --json calibration.json
    python benchmarks/memory_calibration.py --probe cal_*.json --json calibration.json   # trainer probes
    python benchmarks/memory_calibration.py --fit cal_q05_m16.json cal_q05_m8.json cal_q15_m16.json cal_q15_m8.json

``--probe`` reads the JSON lines of ``scripts/gpu_trainer_probe.py --like SHAPE`` runs (``scripts/gpu_calibrate.sh``
makes a grid of them on a bare GPU machine): one FSDP2 trainer rank of a random model of a known shape, KL on,
with the probe's micro-batches, prompt and response lengths and checkpointing. Each is compared with the plan's
trainer peak (largest of its log-probs and train phases) without the CUDA context, which
``torch.cuda.max_memory_reserved`` does not count; both the reserved and the allocated peak of the padded cycles
are printed (reserved - allocated is the caching allocator's slack).

Each RUN_DIR holds ``config.yaml`` (the resolved config rlctl writes) and ``metrics.jsonl``. The
model's ``config.json`` is found as ``rlctl check-config`` finds it (the run's model folder or the
Hugging Face cache) unless ``--model-config`` names it (the run's folder is often on another machine).
The GPU size is ``--gpu-memory-gb`` (GiB), else the local GPU (nvidia-smi), else the engine rows are
left out. Printed per run (bytes as GiB; relative error = (predicted - measured) / measured):

* ``memory/trainer_peak_reserved_bytes`` (max over steps) against the plan's trainer peak (largest of
  the train / log-probs / weight-sync phases, the trainer's own items only, without its CUDA context). rlctl does not log this
  metric yet; the row then says so.
* ``generator/engine_build_bytes`` (first step) against ``gpu_memory_utilization x GPU`` + the memory
  outside the fraction (CUDA graphs) - the context the generator actor made before measuring.
  Colocated runs: it also holds what the trainer allocated while the engine started.
* ``generator/wake_bytes`` against the engine's weights + KV cache (what the memory saver maps back).
* colocated runs: GPU memory in use while the engine sleeps and the trainer is offloaded
  (GPU - ``generator/free_after_sleep_bytes``, median over steps >= 2) against both processes' CUDA
  contexts + what the trainer keeps after offload + what the engine keeps asleep.

It prints numbers; it asserts nothing. Use the errors to set ``COEFFICIENTS`` in rlctl/memory_plan.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402  (puts the checkout's rlctl first on sys.path)

from rlctl import memory_plan as mp  # noqa: E402


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (blank or broken lines skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], key: str, min_step: int = 0) -> list[float]:
    return [float(r[key]) for r in rows if key in r and r.get("step", 0) >= min_step]


def rel_err(pred: Optional[float], meas: Optional[float]) -> Optional[float]:
    """(predicted - measured) / measured; None when either is missing or measured is 0."""
    if pred is None or meas is None or meas == 0:
        return None
    return (pred - meas) / meas


def calibrate(run_dir: Path, gpu_bytes: Optional[int], model_config: Optional[str]) -> list[dict[str, Any]]:
    """Predicted vs measured rows for one run folder: ``{"run", "quantity", "predicted", "measured",
    "rel_err"}`` with bytes (None where unknown). Raises ValueError when the folder lacks a file."""
    from rlctl.config import load_config

    cfg_path, met_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for p in (cfg_path, met_path):
        if not p.is_file():
            raise ValueError(f"{run_dir}: no {p.name}")
    cfg = load_config(config_file=cfg_path).cfg
    found = Path(model_config) if model_config else mp.find_config_json(cfg.trainer.policy.model.path)
    if found is None:
        raise ValueError(f"{run_dir}: no config.json for {cfg.trainer.policy.model.path}; pass --model-config")
    shape = mp.ModelShape.from_config_json(found)
    plan = mp.plan(cfg, shape, gpu_bytes)
    rows = read_metrics(met_path)
    name = run_dir.name
    out: list[dict[str, Any]] = []

    def add(quantity: str, pred: Optional[float], meas: Optional[float]) -> None:
        out.append({"run": name, "quantity": quantity, "predicted": pred, "measured": meas, "rel_err": rel_err(pred, meas)})

    # trainer peak: the trainer's own parts of its phases (no engine parts), without its CUDA context, which
    # torch.cuda.max_memory_reserved (the metric) does not count
    trainer_phases = []
    ctx = plan.item("trainer", "cuda_context").bytes
    for ph in plan.phases:
        if ph.name in ("train", "log-probs", "weight sync"):
            trainer_phases.append(sum(plan.item(proc, key).bytes for proc, key in ph.parts if proc == "trainer") - ctx)
    meas = _series(rows, "memory/trainer_peak_reserved_bytes")
    add("trainer peak" + ("" if meas else " (memory/trainer_peak_reserved_bytes not logged)"),
        max(trainer_phases) if trainer_phases else None, max(meas) if meas else None)

    if "engine" in plan.processes and gpu_bytes is not None:
        ctx = mp.COEFFICIENTS["cuda_context_bytes"]
        eng = {it.key: it.bytes for it in plan.processes["engine"]}
        build = _series(rows, "generator/engine_build_bytes")
        add("engine build (fraction + outside - actor context)",
            eng["weights"] + eng["kv_cache"] + eng["outside_fraction"], build[0] if build else None)
        wake = _series(rows, "generator/wake_bytes")
        add("engine wake (weights + KV cache)", eng["weights"] + eng["kv_cache"], wake[0] if wake else None)
        free = _series(rows, "generator/free_after_sleep_bytes", min_step=2)
        if plan.layout == "colocated":
            pred = (2 * ctx + plan.item("trainer", "kept_after_offload").bytes + eng.get("kept_asleep", 0))
            add("in use, engine asleep + trainer offloaded", pred,
                gpu_bytes - statistics.median(free) if free else None)
    return out


def probe_inputs(probe: dict[str, Any]) -> tuple[dict[str, Any], "mp.ModelShape"]:
    """The memory plan's inputs (:func:`rlctl.memory_plan.plan_inputs` keys) and model shape for one probe JSON:
    preset ``gsm8k-h200`` with the probe's micro-batches, checkpointing, ``max_prompt_length`` = its prompt tokens,
    ``max_new_tokens`` = its ``--len``, KL on, one colocated GPU. Raises ValueError without ``args.like`` (the
    byte-vocabulary Llama of the probe has no named shape) or for a probe JSON written before args were recorded."""
    from random_model import SHAPES

    from rlctl.config import load_config

    a = probe.get("args")
    if not isinstance(a, dict) or not a.get("like"):
        raise ValueError("probe JSON without args.like (run scripts/gpu_trainer_probe.py --like SHAPE)")
    if a["like"] not in SHAPES:
        raise ValueError(f"unknown shape {a['like']!r}; known: {', '.join(SHAPES)}")
    x = mp.plan_inputs(load_config(preset="gsm8k-h200").cfg)
    x.update({"trainer.micro_train_batch_size_per_gpu": a["micro_train"],
              "trainer.micro_forward_batch_size_per_gpu": a["micro_forward"],
              "trainer.gradient_checkpointing": bool(a.get("grad_ckpt")),
              "trainer.max_prompt_length": int(probe.get("prompt_tokens", 40)),
              "generator.sampling_params.max_new_tokens": a["len"],
              "trainer.algorithm.use_kl_loss": True, "trainer.placement.colocate_all": True,
              "trainer.placement.policy_num_nodes": 1, "trainer.placement.policy_num_gpus_per_node": 1})
    return x, mp.ModelShape.from_config_json(dict(SHAPES[a["like"]]))


def calibrate_probe(path: Path) -> list[dict[str, Any]]:
    """Predicted vs measured trainer peak (bytes) for one probe JSON (:func:`probe_inputs`): rows as
    :func:`calibrate` writes them, ``run`` = ``SHAPE micro T/F len L [ckpt]``. Raises ValueError for a file that
    is not a probe JSON of a ``--like`` shape or has no CUDA cycle."""
    probe = _read_probe(path)
    x, shape = probe_inputs(probe)
    plan = mp.plan_from_inputs(x, shape, None)
    ctx = plan.item("trainer", "cuda_context").bytes
    pred = max(sum(plan.item(proc, key).bytes for proc, key in ph.parts if proc == "trainer") - ctx
               for ph in plan.phases if ph.name in ("train", "log-probs"))
    padded = [c for c in probe.get("cycles", []) if not c.get("packed") and c.get("peak_reserved_bytes")]
    if not padded:
        raise ValueError(f"{path}: no padded CUDA cycle with a peak")
    a = probe["args"]
    name = f"{a['like']} micro {a['micro_train']}/{a['micro_forward']} len {a['len']}" + (" ckpt" if a.get("grad_ckpt") else "")
    out = []
    for what, key in (("reserved", "peak_reserved_bytes"), ("allocated", "peak_allocated_bytes")):
        meas = max((c.get(key) or 0) for c in padded) or None
        out.append({"run": name, "quantity": f"trainer peak ({what}, no CUDA context)", "predicted": pred,
                    "measured": meas, "rel_err": rel_err(pred, meas)})
    return out


def _read_probe(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8").strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: not a probe JSON line ({e})") from None


def fit_slack(paths: list[Path]) -> float:
    """The ``allocator_slack_fraction`` that best fits these probes' reserved train-phase peaks: with S the planned
    static bytes (weights, gradients, AdamW state, reference model, compute copies), D the planned transient bytes
    (train activations + log-prob working set) and R the measured ``max_memory_reserved`` (padded cycles),
    ``R ~ S + (1 + f) D``; f minimizes the sum of squared relative errors,
    ``f = sum(a b) / sum(a a) - 1`` with ``a = D / R``, ``b = (R - S) / R``. Raises ValueError (as
    :func:`calibrate_probe`) or for no usable probe."""
    num = den = 0.0
    for path in paths:
        probe = _read_probe(path)
        x, shape = probe_inputs(probe)
        items = {it.key: it.bytes for it in mp.plan_from_inputs(x, shape, None).processes["trainer"]}
        res = max(((c.get("peak_reserved_bytes") or 0) for c in probe.get("cycles", []) if not c.get("packed")), default=0)
        if not res:
            raise ValueError(f"{path}: no padded CUDA cycle with a peak")
        static = sum(items[k] for k in ("master_weights", "gradients", "adamw_state", "compute_copies"))
        static += items.get("reference_weights", 0)
        a, b = (items["train_activations"] + items["train_logits"]) / res, (res - static) / res
        num, den = num + a * b, den + a * a
    if den == 0:
        raise ValueError("no probe to fit")
    return num / den - 1.0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="*", type=Path, help="run folders (config.yaml + metrics.jsonl)")
    ap.add_argument("--probe", nargs="+", type=Path, default=[], help="trainer probe JSON files (scripts/gpu_calibrate.sh)")
    ap.add_argument("--fit", nargs="+", type=Path, default=[], help="probe JSON files to fit allocator_slack_fraction on "
                    "(prints it; compare the held-out probe with --probe afterwards)")
    ap.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory in GiB (default: the local GPU)")
    ap.add_argument("--model-config", default=None, help="the model's config.json (default: found from the run's model path)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.fit:
        try:
            fitted = fit_slack(args.fit)
        except ValueError as e:
            print(f"memory_calibration: --fit: {e}", file=sys.stderr)
            return 2
        print(f"allocator_slack_fraction fitted on {len(args.fit)} probes: {fitted:.3f} "
              f"(rlctl.memory_plan uses {mp.COEFFICIENTS['allocator_slack_fraction']:g})")
        if not args.run_dirs and not args.probe:
            return 0
    if not args.run_dirs and not args.probe:
        ap.error("name run folders and/or --probe files")
    gpu = mp.gpu_bytes_from_gb(args.gpu_memory_gb) if args.gpu_memory_gb else mp.local_gpu_bytes()
    if gpu is None:
        C.log("no --gpu-memory-gb and no local GPU: engine rows left out")
    rows: list[dict[str, Any]] = []
    for d in args.run_dirs:
        try:
            rows += calibrate(d, gpu, args.model_config)
        except ValueError as e:
            C.log(f"skipped: {e}")
    for f in args.probe:
        try:
            rows += calibrate_probe(f)
        except ValueError as e:
            C.log(f"skipped: {e}")

    def g(v: Optional[float]) -> Optional[float]:
        return None if v is None else v / mp.GiB

    C.print_table(f"memory plan vs measured (GPU {mp.gib(gpu)}; stated error +-{mp.ERROR_FRACTION:.0%})",
                  ["run", "quantity", "predicted GiB", "measured GiB", "relative error"],
                  [[r["run"], r["quantity"], g(r["predicted"]), g(r["measured"]),
                    "n/a" if r["rel_err"] is None else f"{r['rel_err']:+.1%}"] for r in rows])
    C.write_json(args.json, {"gpu_bytes": gpu, "coefficients": mp.COEFFICIENTS, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
