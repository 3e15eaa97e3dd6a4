"""Tensor-parallel SGLang engines on 2 GPUs (``generator.inference_engine_tensor_parallel_size=2``).

Colocated: 2 FSDP2 trainer ranks and ONE engine of TP 2 spanning both GPUs; each rank serializes its CUDA IPC
handles, rank 0 sends the engine both (TP-rank order), 2 steps; trainer and engine agree on the rollout log-probs.
(Split placement with a TP-2 engine needs 3 GPUs: 1 trainer rank + 2 engine ranks.)

Skipped unless 2 GPUs are visible (a multi-GPU kind, e.g. nvidia-h100-x2). Not run yet: no multi-GPU machine was lent
when this was written. Needs a model whose attention heads split in 2 (the devkit's Qwen2.5-Coder-0.5B; SmolLM2
has 9). Run: ``RLCTL_TEST_MODEL=/tmp/models/qwen2.5-coder-0.5b-instruct bash scripts/gpu_check.sh -k tensor_parallel``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

torch = pytest.importorskip("torch")
if torch.cuda.is_available() and torch.cuda.device_count() < 2:
    pytest.skip("a tensor-parallel engine needs 2 GPUs", allow_module_level=True)


def test_two_step_colocated_run_with_one_tp2_engine(sample_train, model_path, metrics):
    pytest.importorskip("sglang")
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    if cfg["num_attention_heads"] % 2 or cfg.get("num_key_value_heads", 2) % 2:
        pytest.skip(f"{model_path} has {cfg['num_attention_heads']} attention heads (SmolLM2: 9), not divisible by 2: "
                    "run with RLCTL_TEST_MODEL=/tmp/models/qwen2.5-coder-0.5b-instruct")
    by_step = sample_train("gputp2", "trainer.placement.policy_num_gpus_per_node=2",
                           "generator.num_inference_engines=1", "generator.inference_engine_tensor_parallel_size=2",
                           "trainer.eval_before_train=false")
    assert sorted(s for s in by_step if s > 0) == [1, 2]
    for s in (1, 2):
        r = by_step[s]
        # both TP ranks loaded the pushed weights: the engine's log-probs match the trainer's
        assert r["policy/rollout_train_logprobs_abs_diff_mean"] < 0.05
        assert r["generator/weight_sync_bytes"] > 2e8  # the 0.5B model in bf16 (about 1 GB), pushed by each rank
    metrics["tp2_colocated_run"] = {k: by_step[2][k] for k in sorted(by_step[2]) if not k.startswith("data/")}
