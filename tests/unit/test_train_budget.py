"""``trainer.max_train_time_s``: the training-time budget, driven through the real loop (:func:`rlctl.loop.run`)
with the recording fakes of ``test_colocation.py`` and a fake clock.

The clock only moves where a fake says so: every train step takes 4 s, every eval 100 s, every checkpoint 50 s. So
``timing/step`` includes eval and checkpoint while the budget counts only the 4 s steps. Hand numbers: budget
10 s, steps of 4 s -> totals 4, 8, 12 -> the run stops after step 3 (12 >= 10), also when resumed after step 2
(state 8 s) or split by ``max_wall_time_s`` into several calls.

Test: ``pytest tests/unit/test_train_budget.py``.
"""

from __future__ import annotations

import types

import pytest

import rlctl.loop
from rlctl.colocation import Colocation
from rlctl.config import load_config
from rlctl.loop import run, train_seconds
from test_colocation import FakeGenerators, FakeLogger, FakeTokenizer, FakeTrainers, World, _data

TRAIN_S, EVAL_S, CKPT_S = 4.0, 100.0, 50.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedTrainers(FakeTrainers):
    def __init__(self, w, clock) -> None:
        super().__init__(w)
        self.clock = clock

    def train_step(self, *a):
        self.clock.now += TRAIN_S
        return super().train_step(*a)

    def save_checkpoint(self, *a) -> None:
        self.clock.now += CKPT_S
        super().save_checkpoint(*a)


class StateCheckpointer:
    """Saves each checkpoint's extra state; restores ``state`` (the extra of an earlier run) when given."""

    def __init__(self, state: dict | None) -> None:
        self.state, self.notes, self.saved = state, [], []

    def restore(self, trainers):
        if self.state is None:
            return None
        trainers.load_checkpoint()  # the fakes' version bookkeeping
        return dict(self.state)

    def save(self, trainers, extra) -> None:
        trainers.save_checkpoint()
        self.saved.append(dict(extra))


class NoteLogger(FakeLogger):
    def __init__(self) -> None:
        super().__init__()
        self.notes: list[str] = []
        self.console = types.SimpleNamespace(log=lambda msg, *a, **k: self.notes.append(msg))


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(rlctl.loop, "time", types.SimpleNamespace(perf_counter=c, time=c))

    def fake_evaluate(*a, **k):
        c.now += EVAL_S
        return {"eval/accuracy_strict": 0.5}

    monkeypatch.setattr(rlctl.loop, "evaluate", fake_evaluate)
    return c


def _cfg(*extra: str):
    overrides = ["trainer.train_batch_size=2", "trainer.policy_mini_batch_size=2", "generator.n_samples_per_prompt=2",
                 "trainer.eval_interval=2", "trainer.ckpt_interval=-1", "trainer.eval_before_train=false",
                 "trainer.eval_batch_size=3", "trainer.max_steps=10", *extra]
    return load_config(preset="gsm8k-cpu", overrides=overrides, backend="hf").cfg


def _drive(cfg, clock, state=None):
    w = World()
    colo = Colocation(TimedTrainers(w, clock), FakeGenerators(w, True), shared_gpu=True, engine_sleeps=True,
                      engine_state="asleep")
    ckpt, logger = StateCheckpointer(state), NoteLogger()
    summary = run(cfg, colo, FakeTokenizer(), _data(20), _data(5), logger, ckpt, [0])  # 10 steps of 2 prompts
    assert w.violations == []
    return summary, ckpt, logger, w


def test_train_seconds_leaves_out_eval_log_and_checkpoint():
    assert train_seconds({"generate": 1.5, "train": 4.0, "eval": 100.0, "log": 0.25, "checkpoint": 50.0}) == 5.5


def test_budget_stops_after_the_step_that_reaches_it(clock):
    summary, ckpt, logger, w = _drive(_cfg("trainer.max_train_time_s=10"), clock)
    assert (summary["last_step"], summary["stopped_because"]) == (3, "max_train_time_s")
    assert w.events.count("train") == 3
    assert [logger.rows[s]["timing/train_time_total_s"] for s in (1, 2, 3)] == [4.0, 8.0, 12.0]
    # timing/step still holds eval (step 2: interval; step 3: final) and checkpoint (step 3: final)
    assert [logger.rows[s]["timing/step"] for s in (1, 2, 3)] == [4.0, 104.0, 154.0]
    assert ckpt.saved == [{"step": 3, "data_position": 6, "train_time_s": 12.0}]
    assert summary["final_eval"] == {"eval/accuracy_strict": 0.5}


def test_resume_continues_the_saved_budget(clock):
    state = {"step": 2, "data_position": 4, "train_time_s": 8.0}
    summary, ckpt, logger, w = _drive(_cfg("trainer.max_train_time_s=10"), clock, state)
    assert (summary["last_step"], summary["stopped_because"]) == (3, "max_train_time_s")
    assert sorted(logger.rows) == [3]
    assert logger.rows[3]["timing/train_time_total_s"] == 12.0
    assert ckpt.saved == [{"step": 3, "data_position": 6, "train_time_s": 12.0}]


def test_calls_split_by_max_wall_time_stop_where_one_call_does(clock):
    """Three calls of max_wall_time_s=3 (each stops after one step: 4 s >= 3 s), each resuming the previous
    call's checkpoint, end at step 3 with the same totals as one call."""
    cfg = _cfg("trainer.max_train_time_s=10", "trainer.max_wall_time_s=3")
    state, reasons, totals = None, [], []
    for _ in range(3):
        summary, ckpt, logger, _ = _drive(cfg, clock, state)
        reasons.append(summary["stopped_because"])
        totals += [logger.rows[s]["timing/train_time_total_s"] for s in sorted(logger.rows)]
        state = ckpt.saved[-1]
    assert reasons == ["max_wall_time_s", "max_wall_time_s", "max_train_time_s"]
    assert totals == [4.0, 8.0, 12.0]
    assert state == {"step": 3, "data_position": 6, "train_time_s": 12.0}
    # a fourth call finds the budget spent: no step, the same reason, a note
    summary, ckpt, logger, w = _drive(cfg, clock, state)
    assert (summary["last_step"], summary["stopped_because"]) == (3, "max_train_time_s")
    assert w.events.count("train") == 0 and ckpt.saved == [] and logger.rows == {}
    assert any("has used 12.0 s of trainer.max_train_time_s=10: nothing to train" in n for n in logger.notes)


def test_old_checkpoint_without_train_time_counts_from_zero(clock):
    summary, ckpt, logger, _ = _drive(_cfg("trainer.max_train_time_s=10"), clock, {"step": 2, "data_position": 4})
    assert summary["last_step"] == 5  # steps 3, 4, 5: 4 + 4 + 4 = 12 >= 10
    assert [logger.rows[s]["timing/train_time_total_s"] for s in (3, 4, 5)] == [4.0, 8.0, 12.0]
    assert any("holds no training time" in n for n in logger.notes)


def test_without_a_budget_the_total_is_logged_and_the_run_ends_at_max_steps(clock):
    summary, ckpt, logger, _ = _drive(_cfg("trainer.max_steps=4"), clock)
    assert (summary["last_step"], summary["stopped_because"]) == (4, "max_steps")
    assert [logger.rows[s]["timing/train_time_total_s"] for s in (1, 2, 3, 4)] == [4.0, 8.0, 12.0, 16.0]
    assert ckpt.saved == [{"step": 4, "data_position": 8, "train_time_s": 16.0}]


def test_budget_must_be_positive():
    with pytest.raises(Exception, match=r"trainer.max_train_time_s=0: must be > 0"):
        _cfg("trainer.max_train_time_s=0")
