"""The colocation invariant, driven through the real loop (:func:`rlctl.loop.run`) with recording fakes.

The fakes keep their own truth of what sits on the GPU (independent of :class:`rlctl.colocation.Colocation`'s
bookkeeping) and assert at every engine wake that the colocated trainer is offloaded, at every generate that the
engine holds the trainer's latest weights, and at every push that the engine did not already have them. The grid:
``eval_interval`` x ``ckpt_interval`` x ``eval_before_train`` x (fresh run, resume from a checkpoint, a
``max_wall_time_s`` stop).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rlctl.colocation import Colocation, ResidencyError
from rlctl.config import load_config
from rlctl.generator import GenerationOutput
from rlctl.loop import PromptData, run


class World:
    """What is really on the GPU, as the fakes see it."""

    def __init__(self) -> None:
        self.trainer_on_gpu = True
        self.engine = "asleep"  # asleep / weights / awake
        self.trainer_version = 0  # bumped by every optimizer step / restore
        self.engine_version = -1  # version the engine's weights hold; -1: released / never pushed
        self.events: list[str] = []
        self.violations: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(f"{what} after {self.events[-4:]}")


class FakeTrainers:
    world_size = 1

    def __init__(self, w: World) -> None:
        self.w = w

    def onload(self) -> None:
        self.w.check(self.w.engine != "awake", "trainer onloaded while the engine's KV cache is awake")
        self.w.trainer_on_gpu = True
        self.w.events.append("onload")

    def offload(self) -> None:
        self.w.trainer_on_gpu = False
        self.w.events.append("offload")

    def memory_reserved(self) -> int:
        return 3 << 30 if self.w.trainer_on_gpu else 1 << 20

    def push_weights(self, generators) -> dict[str, float]:
        w = self.w
        w.check(w.trainer_on_gpu, "push with the trainer offloaded (the full tensors are gathered on its GPU)")
        w.check(w.engine in ("weights", "awake"), "push to an engine whose weights are asleep")
        w.check(w.engine_version != w.trainer_version, "redundant push: the engine already had these weights")
        w.engine_version = w.trainer_version
        w.events.append("push")
        return {"weight_sync_bytes": 8.0}

    def compute_logprobs(self, batch, temperature, which):
        self.w.check(self.w.trainer_on_gpu, "log-probs with the trainer offloaded")
        return torch.zeros(batch["response_mask"].shape)

    def train_step(self, batch, temperature, mini):
        self.w.check(self.w.trainer_on_gpu, "train step with the trainer offloaded")
        self.w.trainer_version += 1
        self.w.events.append("train")
        return {"policy/loss": 0.0}

    def save_checkpoint(self, *a) -> None:
        self.w.check(self.w.trainer_on_gpu, "checkpoint with the trainer offloaded")
        self.w.events.append("save")

    def load_checkpoint(self, *a) -> dict:
        self.w.trainer_version += 1
        return {"step": 2}


class FakeGenerators:
    def __init__(self, w: World, shared_gpu: bool) -> None:
        self.w, self.shared_gpu = w, shared_gpu

    def wake_up(self, tags) -> None:
        w = self.w
        if "kv_cache" in tags:
            w.check(w.engine == "weights", f"KV wake from {w.engine}")
            if self.shared_gpu:
                w.check(not w.trainer_on_gpu, "engine KV cache woken while the trainer is resident")
            w.engine = "awake"
        else:
            w.check(w.engine == "asleep", f"weights wake from {w.engine}")
            w.engine = "weights"
        w.events.append("wake_" + "_".join(tags))

    def sleep(self) -> None:
        self.w.engine = "asleep"
        self.w.engine_version = -1  # SGLang discards released weights
        self.w.events.append("sleep")

    def generate(self, prompt_ids, sampling) -> GenerationOutput:
        w = self.w
        w.check(w.engine == "awake", f"generate on an engine in state {w.engine}")
        w.check(w.engine_version == w.trainer_version, "generate on stale or released weights")
        w.events.append("generate")
        return GenerationOutput([[5, 6] for _ in prompt_ids], [[-0.5, -0.5] for _ in prompt_ids],
                                ["stop"] * len(prompt_ids))

    def last_stats(self) -> dict[str, float]:
        return {}


class FakeTokenizer:
    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["#### 3" if i % 2 else "#### 4" for i in range(len(ids))]  # half right: groups have variance


class FakeCheckpointer:
    def __init__(self, w: World, resume: bool) -> None:
        self.w, self.resume, self.notes, self.saved = w, resume, [], []

    def restore(self, trainers):
        if not self.resume:
            return None
        self.w.check(self.w.trainer_on_gpu, "restore with the trainer offloaded")
        return trainers.load_checkpoint()

    def save(self, trainers, extra) -> None:
        trainers.save_checkpoint()
        self.saved.append(extra["step"])


class FakeLogger:
    class console:  # noqa: N801 - mimics RunLogger.console
        @staticmethod
        def log(*a, **k) -> None:
            pass

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.rows: dict[int, dict] = {}

    def log(self, step, metrics) -> None:
        self.steps.append(step)
        self.rows[step] = metrics

    def truncate_after(self, step) -> None:
        pass

    def mark_resumed(self) -> None:  # RunLogger: versions.json keeps the run's first start
        self.resumed = True

    def start_progress(self, total, done) -> None:
        pass

    def finish_progress(self) -> None:
        pass

    def dump_rollouts(self, *a) -> None:
        pass


def _data(k: int) -> PromptData:
    return PromptData([[1, 2, 3 + i] for i in range(k)], [{"answer": "3", "prompt": []} for _ in range(k)])


def _cfg(eval_interval: int, ckpt_interval: int, eval_before_train: bool, wall: float | None):
    overrides = ["trainer.train_batch_size=2", "trainer.policy_mini_batch_size=2", "generator.n_samples_per_prompt=2",
                 "trainer.max_steps=4", f"trainer.eval_interval={eval_interval}", f"trainer.ckpt_interval={ckpt_interval}",
                 f"trainer.eval_before_train={str(eval_before_train).lower()}", "trainer.eval_batch_size=3"]
    if wall is not None:
        overrides.append(f"trainer.max_wall_time_s={wall}")
    return load_config(preset="gsm8k-cpu", overrides=overrides, backend="hf").cfg


def _drive(cfg, *, shared_gpu=True, engine_sleeps=True, resume=False, colo_cls=Colocation):
    w = World()
    w.engine = "asleep" if engine_sleeps else "awake"
    colo = colo_cls(FakeTrainers(w), FakeGenerators(w, shared_gpu), shared_gpu=shared_gpu, engine_sleeps=engine_sleeps,
                    engine_state=w.engine)
    ckpt = FakeCheckpointer(w, resume)
    logger = FakeLogger()
    summary = run(cfg, colo, FakeTokenizer(), _data(8), _data(5), logger, ckpt, [0])
    return w, colo, ckpt, logger, summary


GRID = list(itertools.product([-1, 1, 2, 3], [-1, 1, 2, 3], [True, False], ["fresh", "resume", "wall"]))


@pytest.mark.parametrize("eval_interval,ckpt_interval,eval_before_train,mode", GRID)
def test_invariant_over_the_eval_checkpoint_resume_grid(eval_interval, ckpt_interval, eval_before_train, mode):
    cfg = _cfg(eval_interval, ckpt_interval, eval_before_train, 1e-6 if mode == "wall" else None)
    w, colo, ckpt, logger, summary = _drive(cfg, resume=mode == "resume")
    assert w.violations == []
    first = 3 if mode == "resume" else 1
    last = 1 if mode == "wall" else 4
    assert summary["last_step"] == last
    train_steps = list(range(first, last + 1))
    assert w.events.count("train") == len(train_steps)
    # one rollout per step plus one per eval (each eval is one rollout block: 5 prompts in batches of 3)
    evals = [s for s in train_steps if (eval_interval > 0 and s % eval_interval == 0) or s == last]
    evals = evals if (eval_interval > 0 or eval_before_train) else []
    evals_before = 1 if eval_before_train and mode != "resume" else 0
    assert w.events.count("wake_kv_cache_cuda_graph") == len(train_steps) + len(evals) + evals_before
    assert w.events.count("generate") == len(train_steps) + 2 * (len(evals) + evals_before)
    # checkpoints: every ckpt_interval steps and after the last
    assert ckpt.saved == [s for s in train_steps if (ckpt_interval > 0 and s % ckpt_interval == 0) or s == last]
    # the first push of a resumed run carries the restored weights; every push follows a train or a wake
    assert w.events.count("push") == w.events.count("wake_weights")


def test_checkpoint_then_rollout_offloads_before_the_kv_wake():
    """The bug of the old flag-based code: eval off, checkpoint every 2 steps -- the checkpoint onloaded the trainer,
    the next rollout found the engine holding current weights and woke the KV cache with the trainer resident."""
    w, colo, _, logger, _ = _drive(_cfg(-1, 2, False, None))
    assert w.violations == []
    assert colo.take_kv_wake_bytes() == 0  # the loop read (and reset) it every step
    assert [logger.rows[s]["memory/trainer_reserved_bytes_at_kv_wake"] for s in (1, 2, 3, 4)] == [1 << 20] * 4
    i = colo.history.index("onload_trainer", colo.history.index("push_weights", 8))
    kv = [j for j, h in enumerate(colo.history) if h == "wake_engine_kv"]
    for j in kv:  # the transition before every KV wake leaves the trainer off the GPU
        before = [h for h in colo.history[:j] if h in ("onload_trainer", "offload_trainer")]
        assert before[-1] == "offload_trainer", colo.history
    assert i > 0


class OldOrder(Colocation):
    """The order of the flag-based code before this object: the trainer offloaded only right after a push
    (``ensure_weights``), and nothing else offloaded it -- so a checkpoint's onload stayed resident into the next
    rollout whenever the engine still held current weights."""

    def sync_weights(self):
        stats = super().sync_weights()
        if stats:
            super().offload_trainer()
        return stats

    def offload_trainer(self) -> None:  # the loop's own offload call did not exist
        pass


def test_the_old_order_is_caught():
    with pytest.raises(ResidencyError, match="the trainer is resident on the same GPU"):
        _drive(_cfg(-1, 2, False, None), colo_cls=OldOrder)


def test_split_placement_never_sleeps_and_pushes_once_per_step():
    w, colo, *_ = _drive(_cfg(2, 2, True, None), shared_gpu=False, engine_sleeps=False)
    assert w.violations == []
    assert "sleep" not in w.events and "offload" not in w.events
    assert colo.take_kv_wake_bytes() == 0  # not measured off a shared GPU
    # the initial push (weights marked stale at start) + one per training step; evals reuse current weights
    assert w.events.count("push") == 1 + 4


def test_eval_right_after_the_push_does_not_push_again():
    w, colo, *_ = _drive(_cfg(1, -1, False, None))
    assert w.violations == []
    step1 = w.events[:w.events.index("train") + 1]
    after = w.events[len(step1):]
    # step 1's push (phase 6), then its eval: offload, KV wake, generate x2, sleep -- no second push; step 2 then
    # pushes again because the sleeping engine released its weights
    assert after[:9] == ["wake_weights", "push", "offload", "wake_kv_cache_cuda_graph", "generate", "generate",
                         "sleep", "onload", "wake_weights"]


def test_impossible_orders_raise():
    w = World()
    colo = Colocation(FakeTrainers(w), FakeGenerators(w, True), shared_gpu=True, engine_sleeps=True, engine_state="asleep")
    with pytest.raises(ResidencyError, match="the engine's weights are released; call sync_weights"):
        with colo.rollout():
            pass
    colo.sync_weights()
    with pytest.raises(ResidencyError, match="the trainer is resident on the same GPU"):
        with colo.rollout():
            pass
    with pytest.raises(ResidencyError, match="only inside rollout"):
        colo.generate([[1]], None)
    colo.offload_trainer()
    with colo.rollout():
        with pytest.raises(ResidencyError, match="the engine's KV cache is awake on the same GPU"):
            colo.onload_trainer()
        colo.mark_stale()
        with pytest.raises(ResidencyError, match="only inside rollout"):
            colo.generate([[1]], None)
    assert colo.state() == {"trainer": "offloaded", "engine": "asleep", "weights": "released"}
    assert w.violations == []


class FlatTokenizer(FakeTokenizer):
    def batch_decode(self, ids, skip_special_tokens=True):
        return ["#### 3"] * len(ids)  # every group right: all flat, so dynamic sampling "filter" keeps asking


def test_filter_dynamic_sampling_keeps_the_engine_awake_over_the_steps_batches():
    """DAPO ``filter`` on a shared GPU: the extra generations of one step reuse the awake engine -- one push, one KV
    wake and one sleep per step, not one per sample batch (the trainer does not change the weights in between)."""
    cfg = load_config(preset="gsm8k-cpu", backend="hf", overrides=[
        "trainer.train_batch_size=2", "trainer.policy_mini_batch_size=2", "generator.n_samples_per_prompt=2",
        "trainer.max_steps=2", "trainer.eval_interval=-1", "trainer.ckpt_interval=-1",
        "trainer.eval_before_train=false", "trainer.algorithm.dynamic_sampling.type=filter",
        "trainer.algorithm.dynamic_sampling.max_sample_batches=3"]).cfg
    w = World()
    colo = Colocation(FakeTrainers(w), FakeGenerators(w, True), shared_gpu=True, engine_sleeps=True,
                      engine_state="asleep")
    logger = FakeLogger()
    run(cfg, colo, FlatTokenizer(), _data(32), _data(5), logger, FakeCheckpointer(w, False), [0])
    assert w.violations == []
    per_step = ["wake_weights", "push", "offload", "wake_kv_cache_cuda_graph", "generate", "generate", "generate",
                "sleep", "onload"]
    assert [e for e in w.events if e != "train"][:2 * len(per_step)] == per_step * 2
    assert [logger.rows[s]["dynamic_sampling/sample_batches"] for s in (1, 2)] == [3.0, 3.0]
    assert [logger.rows[s]["dynamic_sampling/gave_up"] for s in (1, 2)] == [1.0, 1.0]


class CountingGenerators(FakeGenerators):
    """last_stats as the SGLang wrapper keeps them: the latest sleep's numbers (here: how many sleeps so far)."""

    def __init__(self, w: World, shared_gpu: bool) -> None:
        super().__init__(w, shared_gpu)
        self.sleeps = 0

    def sleep(self) -> None:
        super().sleep()
        self.sleeps += 1

    def last_stats(self) -> dict[str, float]:
        return {"sleeps_so_far": float(self.sleeps)}


def test_a_steps_engine_metrics_are_read_after_its_sleep():
    """Step s's row carries step s's sleep (sleep seconds / freed bytes), not step s-1's."""
    w = World()
    colo = Colocation(FakeTrainers(w), CountingGenerators(w, True), shared_gpu=True, engine_sleeps=True,
                      engine_state="asleep")
    logger = FakeLogger()
    run(_cfg(-1, -1, False, None), colo, FakeTokenizer(), _data(8), _data(5), logger, FakeCheckpointer(w, False), [0])
    assert w.violations == []
    assert [logger.rows[s]["generator/sleeps_so_far"] for s in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]
