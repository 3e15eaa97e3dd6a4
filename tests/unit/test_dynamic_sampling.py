"""Dynamic sampling through the real loop (:func:`rlctl.loop.run`) with the recording fakes of test_colocation.py:
DAPO ``filter`` (generate the next prompts until the batch holds train_batch_size informative groups, give up
after max_sample_batches generations), POLARIS ``replace``, and the data position saved in and restored from
checkpoints. A scripted generator decides per generation call which groups have reward variance."""

from __future__ import annotations

import pytest

from rlctl.colocation import Colocation
from rlctl.config import load_config
from rlctl.generator import GenerationOutput
from rlctl.loop import PromptOrder, epoch_order, run
from test_colocation import FakeCheckpointer, FakeGenerators, FakeLogger, FakeTrainers, World, _data

N = 2  # samples per prompt


class ScriptedGenerators(FakeGenerators):
    """Generation call k makes group g informative (rewards 0, 1) when ``script[k][g]``, else flat (0, 0)."""

    def __init__(self, w: World, script: list[list[bool]]) -> None:
        super().__init__(w, shared_gpu=True)
        self.script, self.calls, self.prompts = script, 0, []

    def generate(self, prompt_ids, sampling) -> GenerationOutput:
        super().generate(prompt_ids, sampling)  # the residency checks
        plan = self.script[self.calls]
        self.calls += 1
        self.prompts.append([p[-1] - 3 for p in prompt_ids[::N]])  # prompt index of each group
        ids = [[5, i % N if plan[i // N] else 0] for i in range(len(prompt_ids))]
        return GenerationOutput(ids, [[-0.5, -0.5] for _ in ids], ["stop"] * len(ids))


class RecordingTrainers(FakeTrainers):
    def __init__(self, w: World, restored: dict | None = None) -> None:
        super().__init__(w)
        self.batches, self.restored = [], restored

    def train_step(self, batch, temperature, mini):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return super().train_step(batch, temperature, mini)

    def load_checkpoint(self, *a) -> dict:
        super().load_checkpoint()
        return self.restored


class Tok:
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["#### 3" if o[-1] == 1 else "#### 4" for o in ids]  # the answer is 3: reward 1 for sample 1


class RecordingCheckpointer(FakeCheckpointer):
    def save(self, trainers, extra) -> None:
        super().save(trainers, extra)
        self.extras = getattr(self, "extras", []) + [dict(extra)]


def _run(ds: list[str], script, max_steps=2, restored=None):
    over = ["trainer.train_batch_size=2", "trainer.policy_mini_batch_size=2", f"generator.n_samples_per_prompt={N}",
            f"trainer.max_steps={max_steps}", "trainer.eval_interval=-1", "trainer.eval_before_train=false",
            "trainer.ckpt_interval=1", *[f"trainer.algorithm.dynamic_sampling.{x}" for x in ds]]
    cfg = load_config(preset="gsm8k-cpu", overrides=over, backend="hf").cfg
    w = World()
    trainers, gens = RecordingTrainers(w, restored), ScriptedGenerators(w, script)
    colo = Colocation(trainers, gens, shared_gpu=True, engine_sleeps=True, engine_state="asleep")
    ckpt, logger = RecordingCheckpointer(w, resume=restored is not None), FakeLogger()
    run(cfg, colo, Tok(), _data(8), None, logger, ckpt, [0])
    assert w.violations == []
    return trainers, gens, ckpt, logger, cfg


def _prompt_of(batch) -> list[int]:
    return [int(row[row != 0][2]) - 3 for row in batch["input_ids"]]  # prompt [1, 2, 3 + i], then the response


def test_filter_collects_informative_groups_then_gives_up():
    order = epoch_order(8, seed=42, epoch=0)  # gsm8k-cpu: trainer.seed=42; 8 prompts = one epoch of 4 steps
    script = [[False, True], [False, False], [True, True],  # step 1: 1 + 0 + 2 informative groups >= 2
              [True, False], [False, False], [False, False]]  # step 2: 1 group after 3 generations: give up
    trainers, gens, ckpt, logger, _ = _run(["type=filter", "max_sample_batches=3"], script)
    assert gens.calls == 6
    # step 1: positions 0-5 generated; the batch is position 1's group and position 4's (position 5's is dropped)
    assert gens.prompts[:3] == [[order[0], order[1]], [order[2], order[3]], [order[4], order[5]]]
    b1, b2 = trainers.batches
    assert _prompt_of(b1) == [order[1]] * 2 + [order[4]] * 2
    assert b1["response_mask"].sum(1).tolist() == [2.0] * 4
    assert b1["advantages"].tolist() == pytest.approx([-0.70711, 0.70711] * 2, abs=1e-5)
    # step 2: positions 6-7, then 8-11 cross into epoch 1; the batch is position 6's informative group and the
    # first flat group (position 7) with no loss tokens
    order1 = epoch_order(8, seed=42, epoch=1)
    assert gens.prompts[3:] == [[order[6], order[7]], [order1[0], order1[1]], [order1[2], order1[3]]]
    assert _prompt_of(b2) == [order[6]] * 2 + [order[7]] * 2
    assert b2["response_mask"].sum(1).tolist() == [2.0, 2.0, 0.0, 0.0]
    m1, m2 = logger.rows[1], logger.rows[2]
    assert (m1["dynamic_sampling/sample_batches"], m1["dynamic_sampling/gave_up"], m1["data/prompts_consumed"]) == (3.0, 0.0, 6.0)
    assert (m2["dynamic_sampling/sample_batches"], m2["dynamic_sampling/gave_up"], m2["data/prompts_consumed"]) == (3.0, 1.0, 12.0)
    assert (m1["dynamic_sampling/informative_groups"], m2["dynamic_sampling/informative_groups"]) == (2.0, 1.0)
    assert m2["train/loss_tokens"] == 4.0
    # train_time_s (trainer.max_train_time_s's running total, real seconds here) is only checked to grow
    assert [(e["step"], e["data_position"]) for e in ckpt.extras] == [(1, 6), (2, 12)]
    assert 0 < ckpt.extras[0]["train_time_s"] < ckpt.extras[1]["train_time_s"]


def test_filter_resumes_at_the_saved_data_position():
    order = epoch_order(8, seed=42, epoch=0)
    trainers, gens, _, logger, _ = _run(["type=filter"], [[True, True]], restored={"step": 1, "data_position": 6})
    assert gens.prompts == [[order[6], order[7]]] and logger.steps == [2]
    # a checkpoint from before data_position was saved: derived from the step (1 x train_batch_size)
    trainers, gens, *_ = _run(["type=filter"], [[True, True]], restored={"step": 1})
    assert gens.prompts == [[order[2], order[3]]]


@pytest.mark.parametrize("ratio,replaced", [(0.5, 1), (0.6, 0)])
def test_replace_copies_an_informative_group_over_the_flat_one(ratio, replaced):
    order = epoch_order(8, seed=42, epoch=0)
    trainers, gens, _, logger, _ = _run(["type=replace", f"min_replace_ratio={ratio}"], [[True, False]], max_steps=1)
    assert gens.calls == 1
    (b,) = trainers.batches
    assert _prompt_of(b) == ([order[0]] * 4 if replaced else [order[0]] * 2 + [order[1]] * 2)
    assert logger.rows[1]["dynamic_sampling/replaced_groups"] == float(replaced)


def test_prompt_order_crosses_epochs():
    o0, o1 = epoch_order(9, seed=1, epoch=0), epoch_order(9, seed=1, epoch=1)
    order = PromptOrder(9, 8, seed=1)  # 9 prompts, batches of 4: 8 per epoch, the 9th never used
    assert order.take(0, 4) == o0[:4]
    assert order.take(6, 4) == o0[6:8] + o1[:2]
    assert (order.epoch_of(7), order.epoch_of(8)) == (0, 1)
