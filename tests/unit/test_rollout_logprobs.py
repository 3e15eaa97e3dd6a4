"""``trainer.algorithm.use_rollout_logprobs`` (slime's ``--use-rollout-logprobs``, verl's "bypass" mode): the engine's
log-probs of the sampled tokens become the old policy, so the trainer's old-log-prob forward is skipped. Checked here:
the padding and the one-log-prob-per-token check (hand numbers), the loop through the recording fakes of
test_colocation.py (which log-probs the trainer computes and what ``train_step`` gets), and the config rules. That the
``hf`` generator returns one log-prob per response token, equal to a full forward at the sampling temperature, is
tests/unit/test_generator_hf.py's ``test_logprobs_match_full_forward``."""

from __future__ import annotations

import pytest
import torch
from test_colocation import (
    FakeCheckpointer,
    FakeGenerators,
    FakeLogger,
    FakeTokenizer,
    FakeTrainers,
    World,
    _data,
)

from rlctl.colocation import Colocation
from rlctl.config import ConfigError, load_config
from rlctl.generator import GenerationOutput
from rlctl.loop import rollout_old_logprobs, run


def test_rollout_old_logprobs_pads_rows_by_hand():
    lp = rollout_old_logprobs([[-0.5, -1.25], [-2.0], []], [[7, 8], [9], []], 3)
    assert lp.dtype == torch.float32
    assert lp.tolist() == [[-0.5, -1.25, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_rollout_old_logprobs_refuses_a_row_without_one_logprob_per_token():
    with pytest.raises(RuntimeError) as exc:
        rollout_old_logprobs([[-0.5, -1.0], [-2.0]], [[7, 8], [9, 10]], 2)
    assert str(exc.value).startswith("trainer.algorithm.use_rollout_logprobs=true: rollout 1 has 1 log-probs for 2 "
                                     "response tokens")
    with pytest.raises(RuntimeError, match="rollout 0 has 0 log-probs for 1 response tokens"):
        rollout_old_logprobs([None], [[3]], 1)


class RolloutLogprobGenerators(FakeGenerators):
    """Responses [5, 6] with log-probs (-0.25 - 0.01 i, -0.5 - 0.01 i) for rollout i: each row its own numbers."""

    def generate(self, prompt_ids, sampling) -> GenerationOutput:
        out = super().generate(prompt_ids, sampling)
        return GenerationOutput(out.output_ids, [[-0.25 - 0.01 * i, -0.5 - 0.01 * i] for i in range(len(prompt_ids))],
                                out.finish_reasons)


class RecordingTrainers(FakeTrainers):
    def __init__(self, w: World) -> None:
        super().__init__(w)
        self.which: list[str] = []
        self.old: list[torch.Tensor] = []

    def compute_logprobs(self, batch, temperature, which):
        self.which.append(which)
        return super().compute_logprobs(batch, temperature, which)

    def train_step(self, batch, temperature, mini):
        self.old.append(batch["old_logprobs"].clone())
        return super().train_step(batch, temperature, mini)


def _run(*extra: str):
    cfg = load_config(preset="gsm8k-cpu", backend="hf", overrides=[
        "trainer.train_batch_size=2", "trainer.policy_mini_batch_size=2", "generator.n_samples_per_prompt=2",
        "trainer.max_steps=2", "trainer.eval_interval=-1", "trainer.eval_before_train=false", "trainer.ckpt_interval=-1",
        *extra]).cfg
    w = World()
    trainers = RecordingTrainers(w)
    colo = Colocation(trainers, RolloutLogprobGenerators(w, shared_gpu=True), shared_gpu=True, engine_sleeps=True,
                      engine_state="asleep")
    logger = FakeLogger()
    run(cfg, colo, FakeTokenizer(), _data(8), None, logger, FakeCheckpointer(w, resume=False), [0])
    assert w.violations == []
    return trainers, logger


def test_loop_uses_the_engine_logprobs_and_skips_the_policy_forward():
    trainers, logger = _run("trainer.algorithm.use_rollout_logprobs=true", "trainer.algorithm.use_kl_loss=true")
    assert trainers.which == ["ref", "ref"]  # one reference forward per step, no policy forward
    # the batch's response columns are [5, 6] for every row: the engine's numbers, row by row
    expected = [[-0.25 - 0.01 * i, -0.5 - 0.01 * i] for i in range(4)]
    for old in trainers.old:
        assert old.shape == (4, 2)
        assert torch.allclose(old, torch.tensor(expected))
    assert all("policy/rollout_train_logprobs_abs_diff_mean" not in row for row in logger.rows.values())


def test_loop_default_recomputes_the_old_logprobs():
    trainers, logger = _run("trainer.algorithm.use_kl_loss=false")
    assert trainers.which == ["policy", "policy"]
    assert all(torch.equal(old, torch.zeros(4, 2)) for old in trainers.old)  # the fake trainer's log-probs
    # |0 - engine| averaged over the 8 response tokens of step 1: (0.25 + 0.5) + 4 x 0.01 x (0 + 1 + 2 + 3) / 8
    assert logger.rows[1]["policy/rollout_train_logprobs_abs_diff_mean"] == pytest.approx((4 * 0.75 + 0.12) / 8)


def test_config_key_defaults_off_and_refuses_tis():
    assert load_config(backend="hf").cfg.trainer.algorithm.use_rollout_logprobs is False
    with pytest.raises(ConfigError) as exc:
        load_config(backend="hf", overrides=["trainer.algorithm.use_rollout_logprobs=true",
                                             "trainer.algorithm.off_policy_correction.tis_ratio_type=token"])
    assert [e.split(":")[0] for e in exc.value.errors] == ["trainer.algorithm.use_rollout_logprobs=true"]
    assert "the TIS ratio pi_old / pi_rollout of trainer.algorithm.off_policy_correction.tis_ratio_type=token is 1" \
        in exc.value.errors[0]
    with pytest.raises(ConfigError, match="trainer.algorithm.use_rollout_logprobs"):
        load_config(backend="hf", overrides=["trainer.algorithm.use_rollout_logprobs=maybe"])


def test_config_warns_when_sampling_truncates_the_distribution():
    loaded = load_config(backend="hf", overrides=["trainer.algorithm.use_rollout_logprobs=true",
                                                  "generator.sampling_params.top_p=0.9"])
    assert [w for w in loaded.warnings if w.startswith("generator.sampling_params.top_p")] == [
        ("generator.sampling_params.top_p: 0.9 truncates the distribution the engine samples from, so with "
         "trainer.algorithm.use_rollout_logprobs=true the ratio's old policy is not the policy's; use the neutral value")]
    quiet = load_config(backend="hf", overrides=["trainer.algorithm.use_rollout_logprobs=true"])
    assert not [w for w in quiet.warnings if w.startswith("generator.sampling_params")]
