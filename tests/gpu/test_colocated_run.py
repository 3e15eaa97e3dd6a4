"""A 2-step colocated GRPO run on one GPU: FSDP2 trainer + SGLang engine in one Ray job (``rlctl train``).

Runs the real CLI in a subprocess (its own Ray cluster) on the devkit's SmolLM2-135M-Instruct and the
bundled GSM8K sample, CUDA graphs off, and checks the run's metrics: two steps, the engine's memory came
back at every sleep, the weight push happened, and trainer and engine agree on the rollout log-probs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def test_two_step_colocated_sglang_run(model_path, tmp_path, metrics):
    pytest.importorskip("sglang")
    from rlctl.gsm8k import SAMPLE_DIR

    overrides = [
        f"trainer.policy.model.path={model_path}",
        f"data.train_data=['{SAMPLE_DIR}/train.parquet']",
        f"data.val_data=['{SAMPLE_DIR}/validation.parquet']",
        "trainer.train_batch_size=8", "trainer.policy_mini_batch_size=4", "generator.n_samples_per_prompt=4",
        "trainer.micro_train_batch_size_per_gpu=8", "trainer.micro_forward_batch_size_per_gpu=16",
        "generator.sampling_params.max_new_tokens=128", "generator.eval_sampling_params.max_new_tokens=128",
        "trainer.eval_batch_size=32", "trainer.eval_before_train=true", "trainer.eval_interval=-1",
        "trainer.max_steps=2", "trainer.ckpt_interval=-1", "trainer.algorithm.use_kl_loss=true",
        "generator.gpu_memory_utilization=0.3", "generator.sglang.disable_cuda_graph=true",
        f"trainer.log_path={tmp_path}/runs", f"trainer.ckpt_path={tmp_path}/ckpts", "trainer.run_name=gpu2step",
        "trainer.policy.optimizer_config.lr=1e-6",
        # SmolLM2 is ~0% strict: flexible + a format score give some groups reward variance
        "environment.reward.method=flexible", "environment.reward.format_score=0.1",
    ]
    cmd = [sys.executable, "-m", "rlctl", "train", "--backend", "sglang", "--preset", "gsm8k", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=850, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "colocated_run.log").write_text(proc.stdout + "\n---- stderr ----\n" + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "gsm8k" / "gpu2step"
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [0, 1, 2]
    assert by_step[0]["eval/num_problems"] == 32.0 and by_step[2]["eval/num_problems"] == 32.0
    for s in (1, 2):
        r = by_step[s]
        if r["groups/zero_variance_fraction"] < 1.0:
            assert r["policy/grad_norm"] > 0
        else:  # every group had equal rewards: all advantages are 0, so is the gradient
            assert r["policy/grad_norm"] == 0.0
        assert r["policy/rollout_train_logprobs_abs_diff_mean"] < 0.05
        assert r["generator/weight_sync_bytes"] > 2e8  # 135M params in bf16
        assert r["generator/sleep_freed_bytes"] >= 0.9 * r["generator/sleep_expected_bytes"]
    metrics["colocated_run"] = {k: by_step[2][k] for k in sorted(by_step[2]) if not k.startswith("data/")}
    metrics["colocated_run_eval0"] = {k: v for k, v in by_step[0].items() if k.startswith("eval/")}
    assert (tmp_path / "ckpts" / "gsm8k" / "gpu2step" / "global_step_2" / "COMPLETE").is_file()
