"""A 2-step colocated GRPO run on one GPU: FSDP2 trainer + SGLang engine in one Ray job (``rlctl train``).

Runs the real CLI in a subprocess (its own Ray cluster) on the devkit's SmolLM2-135M-Instruct and the
bundled GSM8K sample, CUDA graphs off, and checks the run's metrics: two steps, the engine's memory came
back at every sleep, the weight push happened, and trainer and engine agree on the rollout log-probs.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def test_two_step_colocated_sglang_run(sample_train, tmp_path, metrics):
    pytest.importorskip("sglang")
    by_step = sample_train("gpu2step", "trainer.eval_before_train=true", "trainer.algorithm.use_kl_loss=true",
                           "generator.gpu_memory_utilization=0.3")
    assert sorted(by_step) == [0, 1, 2]
    assert by_step[0]["eval/num_problems"] == 32.0 and by_step[2]["eval/num_problems"] == 32.0
    for s in (1, 2):
        r = by_step[s]
        if r["groups/zero_variance_fraction"] < 1.0:
            assert r["policy/grad_norm"] > 0
        else:  # every group had equal rewards: all advantages are 0, so is the policy-gradient loss; the KL
            # term (coef 0.001) is left once the policy has moved from the reference (1.4e-4 measured on the H200)
            assert r["policy/pg_loss"] == 0.0
            assert r["policy/grad_norm"] < 0.01
        assert r["policy/rollout_train_logprobs_abs_diff_mean"] < 0.05
        assert r["generator/weight_sync_bytes"] > 2e8  # 135M params in bf16
        assert r["generator/sleep_freed_bytes"] >= 0.9 * r["generator/sleep_expected_bytes"]
    metrics["colocated_run"] = {k: by_step[2][k] for k in sorted(by_step[2]) if not k.startswith("data/")}
    metrics["colocated_run_eval0"] = {k: v for k, v in by_step[0].items() if k.startswith("eval/")}
    assert (tmp_path / "ckpts" / "gsm8k" / "gpu2step" / "global_step_2" / "COMPLETE").is_file()


def test_checkpoint_every_step_without_eval_keeps_the_trainer_off_the_gpu_at_each_kv_wake(sample_train, tmp_path, metrics):
    """The order the flag-based code got wrong: a checkpoint every step and no eval. Each checkpoint needs the
    trainer on the GPU; the next rollout must offload it again before the engine wakes its KV cache. The trainer's
    CUDA reserve at every KV-cache wake (``memory/trainer_reserved_bytes_at_kv_wake``) stays <= 1 GiB."""
    pytest.importorskip("sglang")
    by_step = sample_train("gpuckpt", "trainer.eval_before_train=false", "trainer.ckpt_interval=1",
                           "trainer.max_steps=3", "generator.gpu_memory_utilization=0.3")
    assert sorted(by_step) == [1, 2, 3]
    held = [by_step[s]["memory/trainer_reserved_bytes_at_kv_wake"] for s in (1, 2, 3)]
    metrics["ckpt_every_step_trainer_bytes_at_kv_wake"] = held
    assert max(held) <= 2**30, held
    assert (tmp_path / "ckpts" / "gsm8k" / "gpuckpt" / "global_step_3" / "COMPLETE").is_file()
