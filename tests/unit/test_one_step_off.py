"""One-step-off overlap (``trainer.algorithm.async_rollouts.one_step_off``): the engines generate step k+1's rollouts
while the trainer trains step k, in split placement.

The real loop (:func:`rlctl.loop.run`) runs against recording fakes that keep their own truth: the weight version
(optimizer steps) the trainer holds, the one the engines hold, whether the engines are generating, and for every
train step the version of the weights its rollouts came from (the fake engine writes it into the response tokens).
Checked here: the order (step k+1's generation starts before train k, the push of step k's weights after it was
collected), the staleness (step k+1 trains on step k-1's weights, never older), an exact resume after a crash (the
checkpoint keeps the in-flight rollouts), the colocation object's refusals and the config rules. The last test runs
the same resume comparison through Ray with ``hf`` engines and a gloo weight broadcast.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from rlctl.colocation import Colocation, ResidencyError
from rlctl.config import ConfigError, load_config
from rlctl.generator import GenerationOutput
from rlctl.loop import PromptData, in_flight_state, output_from_state, run
from test_colocation import FakeGenerators, FakeLogger, FakeTokenizer, FakeTrainers, World


class SplitWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.engine = "awake"  # split placement: the engines never sleep
        self.generating = False
        self.trained_on: list[tuple[int, int]] = []  # (trainer version before the step, rollout weight version)


def _outputs(version: int, n: int) -> GenerationOutput:
    # the second response token carries the engine's weight version, the log-probs are -0.5 - 0.1 x version
    lp = -0.5 - 0.1 * version
    return GenerationOutput([[5, 100 + version] for _ in range(n)], [[lp, lp] for _ in range(n)], ["stop"] * n)


class SplitTrainers(FakeTrainers):
    def __init__(self, w: SplitWorld, crash_at_version: int | None = None) -> None:
        super().__init__(w)
        self.crash_at_version = crash_at_version

    def push_weights(self, generators) -> dict[str, float]:
        self.w.check(not self.w.generating, "push while the engines generate")
        stats = super().push_weights(generators)
        self.w.events[-1] = f"push@{self.w.trainer_version}"
        return stats

    def compute_logprobs(self, batch, temperature, which):
        return torch.full(batch["response_mask"].shape, -0.5 - 0.2 * self.w.trainer_version)

    def train_step(self, batch, temperature, mini):
        if self.w.trainer_version == self.crash_at_version:
            raise RuntimeError("trainer worker died")
        self.w.trained_on.append((self.w.trainer_version, int(batch["input_ids"][0, -1]) - 100))
        loss = float((batch["tis_weights"] * batch["response_mask"]).sum())
        super().train_step(batch, temperature, mini)
        self.w.events[-1] = f"train->{self.w.trainer_version}"
        return {"policy/loss": loss}

    def load_checkpoint(self, *a) -> dict:
        raise AssertionError("StoreCheckpointer restores directly")


class SplitGenerators(FakeGenerators):
    def __init__(self, w: SplitWorld) -> None:
        super().__init__(w, shared_gpu=False)

    def generate(self, prompt_ids, sampling) -> GenerationOutput:
        super().generate(prompt_ids, sampling)  # its checks: awake, on the trainer's latest weights
        return _outputs(self.w.engine_version, len(prompt_ids))

    def generate_async(self, prompt_ids, sampling):
        w = self.w
        w.check(w.engine == "awake", f"async rollout on an engine in state {w.engine}")
        w.check(not w.generating, "a second rollout started while one is in flight")
        w.check(w.engine_version == w.trainer_version, "async rollout on weights older than the trainer's")
        w.generating = True
        w.events.append(f"start@{w.engine_version}")
        return (w.engine_version, len(prompt_ids))

    def collect(self, handle) -> GenerationOutput:
        self.w.check(self.w.generating, "collect with nothing in flight")
        self.w.generating = False
        self.w.events.append("collect")
        return _outputs(*handle)


class StoreCheckpointer:
    """Checkpoints in a dict; each one goes through ``torch.save`` / ``torch.load(weights_only=True)`` as the
    trainer state does, and a restore sets the fake trainer's version to the checkpoint's step."""

    def __init__(self, w: SplitWorld, store: dict, resume: bool) -> None:
        self.w, self.store, self.resume, self.notes = w, store, resume, []

    def restore(self, trainers):
        if not self.resume or not self.store:
            return None
        step = max(self.store)
        self.w.trainer_version = step
        return self.store[step]

    def save(self, trainers, extra) -> None:
        trainers.save_checkpoint()
        buf = io.BytesIO()
        torch.save(extra, buf)
        buf.seek(0)
        self.store[extra["step"]] = torch.load(buf, weights_only=True)


def _cfg(*extra: str, max_steps: int = 4):
    return load_config(preset="gsm8k-cpu", backend="hf", overrides=[
        "trainer.train_batch_size=2", "trainer.policy_mini_batch_size=2", "generator.n_samples_per_prompt=2",
        f"trainer.max_steps={max_steps}", "trainer.eval_interval=-1", "trainer.ckpt_interval=-1",
        "trainer.eval_before_train=false", "trainer.eval_batch_size=3", "trainer.placement.colocate_all=false",
        "generator.weight_sync_backend=gloo", "trainer.algorithm.async_rollouts.one_step_off=true",
        "trainer.algorithm.off_policy_correction.tis_ratio_type=token", *extra]).cfg


def _drive(cfg, store=None, resume=False, crash_at_version=None):
    w = SplitWorld()
    colo = Colocation(SplitTrainers(w, crash_at_version), SplitGenerators(w), shared_gpu=False, engine_sleeps=False,
                      engine_state="awake")
    logger = FakeLogger()
    ckpt = StoreCheckpointer(w, {} if store is None else store, resume)
    data = PromptData([[1, 2, 3 + i] for i in range(8)], [{"answer": "3", "prompt": []} for _ in range(8)])
    val = PromptData([[1, 2]] * 5, [{"answer": "3", "prompt": []}] * 5)
    summary = run(cfg, colo, FakeTokenizer(), data, val, logger, ckpt, [0])
    return w, colo, logger, summary


def test_next_generation_starts_before_the_train_step_and_the_push_waits_for_it():
    w, colo, logger, summary = _drive(_cfg())
    assert summary["last_step"] == 4 and w.violations == []
    # step 1 generates on the initial weights (v0); step k (k < 4) starts step k+1's rollouts before it trains;
    # step k+1 collects them, then pushes step k's weights; the last step starts nothing and pushes after training
    assert [e for e in w.events if e != "save"] == [
        "push@0", "generate", "start@0", "train->1",
        "collect", "push@1", "start@1", "train->2",
        "collect", "push@2", "start@2", "train->3",
        "collect", "train->4", "push@4"]
    assert "rollout_async" in colo.history and colo.in_flight is None


@pytest.mark.parametrize("eval_interval", [-1, 1, 2])
@pytest.mark.parametrize("ckpt_interval", [-1, 1, 3])
def test_rollouts_are_one_step_stale_never_older(eval_interval, ckpt_interval):
    cfg = _cfg(f"trainer.eval_interval={eval_interval}", f"trainer.ckpt_interval={ckpt_interval}")
    w, colo, logger, _ = _drive(cfg)
    assert w.violations == []
    # step k trains from weights v(k-1) on rollouts of v(k-2) (step 1: the initial weights, on-policy)
    assert w.trained_on == [(0, 0), (1, 0), (2, 1), (3, 2)]
    assert [logger.rows[s]["rollout/weight_version_lag"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    # TIS sees the one-step gap: at step k pi_old (trainer v(k-1)) is -0.5 - 0.2 (k-1) and the engine's log-prob
    # (v(k-2)) -0.5 - 0.1 (k-2), a ratio of exp(-0.1 k) (on-policy step 1: 1); rollouts of v(k-1) would give exp(-0.1 (k-1))
    assert [logger.rows[s]["off_policy/tis_ratio_mean"] for s in (1, 2, 3, 4)] == pytest.approx(
        [1.0, 0.818730753, 0.740818221, 0.670320046], abs=1e-6)
    assert torch.isnan(torch.tensor(logger.rows[2]["rollout/tokens_per_s"]))  # only the wait was timed
    evals = [s for s in (1, 2, 3, 4) if "eval/num_problems" in logger.rows[s]]
    assert evals == ([1, 2, 3, 4] if eval_interval == 1 else [2, 4] if eval_interval == 2 else [])


def test_a_crash_then_resume_repeats_the_uninterrupted_run():
    full_w, _, full_log, _ = _drive(_cfg("trainer.ckpt_interval=1"))
    store: dict = {}
    with pytest.raises(RuntimeError, match="trainer worker died"):
        _drive(_cfg("trainer.ckpt_interval=1"), store, crash_at_version=2)  # dies training step 3
    assert sorted(store) == [1, 2]
    saved = store[2]["in_flight"]  # step 3's rollouts, generated with step 1's weights while step 2 trained
    assert (saved["step"], saved["weight_version"], saved["output_lengths"].tolist()) == (3, 1, [2, 2, 2, 2])
    w, colo, logger, summary = _drive(_cfg("trainer.ckpt_interval=1"), store, resume=True)
    assert summary["last_step"] == 4 and w.violations == []
    assert w.trained_on == full_w.trained_on[2:] == [(2, 1), (3, 2)]
    for step in (3, 4):
        a = {k: v for k, v in full_log.rows[step].items() if not k.startswith("timing/")}
        b = {k: v for k, v in logger.rows[step].items() if not k.startswith("timing/")}
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), step
    # the resumed run collected nothing for step 3 (it came from the checkpoint) and pushed the restored v2 first
    assert [e for e in w.events if e != "save"][:3] == ["push@2", "start@2", "train->3"]


def test_in_flight_state_round_trips_ragged_outputs():
    out = GenerationOutput([[7, 8, 9], [], [4]], [[-0.25, -1.5, -3.0], [], [-0.125]], ["stop", "length", "stop"])
    from rlctl.colocation import AsyncRollout

    state = in_flight_state(AsyncRollout(step=6, weight_version=4), out)
    assert state["output_lengths"].tolist() == [3, 0, 1] and state["logprobs"].dtype == torch.float32
    back = output_from_state(state)
    assert (back.output_ids, back.logprobs, back.finish_reasons) == (out.output_ids, out.logprobs, out.finish_reasons)


# ---------------------------------------------------------------------------------------------- the colocation object
def _colo(shared_gpu=False, engine_sleeps=False):
    w = SplitWorld()
    return w, Colocation(SplitTrainers(w), SplitGenerators(w), shared_gpu=shared_gpu, engine_sleeps=engine_sleeps,
                         engine_state="awake")


def _sampling():
    from rlctl.generator import Sampling

    return Sampling(max_new_tokens=2, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, stop_token_ids=(0,), seed=11)


@pytest.mark.parametrize("shared_gpu,engine_sleeps", [(True, True), (False, True)])
def test_rollout_async_needs_split_placement(shared_gpu, engine_sleeps):
    _, colo = _colo(shared_gpu, engine_sleeps)
    with pytest.raises(ResidencyError, match=r"rollout_async refused: .*one-step-off overlap needs split placement "
                                             r"\(trainer.placement.colocate_all=false\)"):
        colo.rollout_async([[1]], _sampling(), step=2)


def test_nothing_touches_the_engines_while_a_rollout_is_in_flight():
    w, colo = _colo()
    colo.mark_stale(version=0)
    colo.sync_weights()
    handle = colo.rollout_async([[1], [2]], _sampling(), step=2)
    assert (handle.step, handle.weight_version) == (2, 0)
    w.trainer_version = 1  # an optimizer step while the engines generate
    colo.mark_stale(version=1)
    busy = "the engines are generating step 2's rollouts; call collect\\(\\) first"
    with pytest.raises(ResidencyError, match="sync_weights refused: " + busy):
        colo.sync_weights()
    with pytest.raises(ResidencyError, match="rollout_async refused: " + busy):
        colo.rollout_async([[1]], _sampling(), step=3)
    with pytest.raises(ResidencyError, match="rollout refused: " + busy):
        with colo.rollout():
            pass
    assert colo.collect(handle).output_ids == [[5, 100], [5, 100]]
    assert colo.collect(handle) is handle.output  # collected once; a second collect returns the same output
    assert colo.sync_weights() == {"weight_sync_bytes": 8.0} and w.violations == []


def test_collect_refuses_rollouts_two_versions_behind():
    _, colo = _colo()
    colo.mark_stale(version=0)
    colo.sync_weights()
    handle = colo.rollout_async([[1]], _sampling(), step=2)
    colo.mark_stale(version=2)  # two optimizer steps before the rollouts were collected
    with pytest.raises(ResidencyError, match=r"collect refused: step 2's rollouts come from weight version 0, 2 "
                                             r"versions behind the trainer's 2 \(at most 1\)"):
        colo.collect(handle)
    restored = colo.adopt(step=5, weight_version=2, output="out")
    colo.mark_stale(version=3)
    assert colo.collect(restored) == "out"


def test_a_step_refuses_another_steps_rollouts():
    from rlctl.colocation import AsyncRollout
    from rlctl.loop import PhaseTimer, step_rollouts

    with pytest.raises(ResidencyError, match=r"step 3 was handed step 4's rollouts \(one-step-off order broken\)"):
        step_rollouts(None, None, None, 3, 0, PhaseTimer(), started=AsyncRollout(step=4, weight_version=2))


# ---------------------------------------------------------------------------------------------- config
SPLIT = ["trainer.placement.colocate_all=false", "generator.weight_sync_backend=gloo", "trainer.device=cpu",
         "generator.num_inference_engines=1"]


def test_one_step_off_is_refused_when_colocated_naming_both_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["trainer.algorithm.async_rollouts.one_step_off=true"], backend="hf")
    assert len(exc.value.errors) == 1
    err = exc.value.errors[0]
    assert err.startswith("trainer.algorithm.async_rollouts.one_step_off=true")
    assert "needs split placement: with trainer.placement.colocate_all=true the engines share" in err
    assert err.endswith("set trainer.placement.colocate_all=false or trainer.algorithm.async_rollouts.one_step_off=false")


def test_one_step_off_is_refused_with_filter_dynamic_sampling():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[*SPLIT, "trainer.algorithm.async_rollouts.one_step_off=true",
                               "trainer.algorithm.dynamic_sampling.type=filter"], backend="hf")
    assert [e.split(":")[0] for e in exc.value.errors] == ["trainer.algorithm.async_rollouts.one_step_off=true"]
    assert "cannot be combined with trainer.algorithm.dynamic_sampling.type=filter" in exc.value.errors[0]


def test_one_step_off_without_tis_warns_and_with_tis_is_quiet():
    loaded = load_config(overrides=[*SPLIT, "trainer.algorithm.async_rollouts.one_step_off=true"], backend="hf")
    assert loaded.cfg.trainer.algorithm.async_rollouts.one_step_off is True
    assert [w for w in loaded.warnings if w.startswith("trainer.algorithm.async_rollouts.one_step_off")] == [
        "trainer.algorithm.async_rollouts.one_step_off: trains each step on rollouts of the previous step's weights "
        "(one step off-policy) without a correction; set trainer.algorithm.off_policy_correction.tis_ratio_type=token "
        "to weight each token by min(pi_old / pi_rollout, token_tis_ratio_clip_high), or "
        "trainer.algorithm.use_rollout_logprobs=true to clip the ratio against the rollout policy itself"]
    quiet = load_config(overrides=[*SPLIT, "trainer.algorithm.async_rollouts.one_step_off=true",
                                   "trainer.algorithm.off_policy_correction.tis_ratio_type=token"], backend="hf")
    assert not [w for w in quiet.warnings if "one_step_off" in w]
    bypass = load_config(overrides=[*SPLIT, "trainer.algorithm.async_rollouts.one_step_off=true",
                                    "trainer.algorithm.use_rollout_logprobs=true"], backend="hf")
    assert not [w for w in bypass.warnings if "one_step_off" in w]
    assert load_config(backend="hf").cfg.trainer.algorithm.async_rollouts.one_step_off is False  # off by default


# ---------------------------------------------------------------------------------------------- through Ray
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_resume_through_ray_repeats_the_uninterrupted_run(tmp_path):
    """Split placement on CPU (1 trainer worker, 1 hf engine, gloo broadcast), one-step-off with token TIS: a run
    stopped by its wall-time limit after step 1 (its checkpoint holds step 2's rollouts, generated on the initial
    weights) and resumed gives the metrics of an uninterrupted 3-step run."""
    import ray

    from rlctl.job import train
    from rlctl.testing import build_tiny_llama, tiny_run_overrides

    tiny = str(build_tiny_llama(tmp_path / "tiny", seed=3))
    reward = str(Path(__file__).resolve().parents[1] / "fixtures" / "test_rewards.py") + ":even_token_fraction"

    def cfg(run: str, **extra):
        return load_config(overrides=tiny_run_overrides(tiny, tmp_path, run, 3, workers=1, reward_fn=reward, **{
            "trainer.placement.colocate_all": "false", "generator.num_inference_engines": 1,
            "generator.weight_sync_backend": "gloo", "trainer.algorithm.async_rollouts.one_step_off": "true",
            "trainer.algorithm.off_policy_correction.tis_ratio_type": "token", "trainer.logger": "tensorboard",
            **extra}), backend="hf", for_training=True)

    def rows(loaded) -> dict[int, dict]:
        lines = (Path(loaded.cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("timing/", "rollout/tokens_per_s", "generator/"))}
                for r in map(json.loads, lines) if r["step"] >= 1}

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        full = cfg("full")
        assert train(full)["last_step"] == 3
        part = cfg("part", **{"trainer.max_wall_time_s": 1e-6})
        assert train(part)["stopped_because"] == "max_wall_time_s"
        resumed = cfg("part", **{"trainer.resume_mode": "latest"})
        assert train(resumed)["last_step"] == 3
    finally:
        ray.shutdown()
    a, b = rows(full), rows(resumed)
    assert sorted(b) == [1, 2, 3]
    assert [a[s]["rollout/weight_version_lag"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert a[2]["policy/rollout_train_logprobs_abs_diff_mean"] > 1e-4  # step 2 really trained on older rollouts
    for step in (1, 2, 3):
        assert a[step] == b[step], step


def test_the_wait_for_in_flight_rollouts_at_a_checkpoint_counts_as_training_time(monkeypatch):
    """With a checkpoint every step, each step (but the last) waits for the next step's rollouts before saving. That
    wait is generation: timed as ``generate`` and counted in ``timing/train_time_total_s`` (the budget of
    ``trainer.max_train_time_s``), not hidden in ``timing/checkpoint``. Fake clock: a train step takes 4 s, a collect
    3 s -> totals 4 + 3, + 4 + 3, + 4 + 3, + 4 = 7, 14, 21, 25 (the last step starts no rollout)."""
    import types

    import rlctl.loop

    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    monkeypatch.setattr(rlctl.loop, "time", types.SimpleNamespace(perf_counter=clock, time=clock))
    train, collect = SplitTrainers.train_step, SplitGenerators.collect

    def timed_train(self, *a):
        now[0] += 4.0
        return train(self, *a)

    def timed_collect(self, handle):
        now[0] += 3.0
        return collect(self, handle)

    monkeypatch.setattr(SplitTrainers, "train_step", timed_train)
    monkeypatch.setattr(SplitGenerators, "collect", timed_collect)
    w, colo, logger, summary = _drive(_cfg("trainer.ckpt_interval=1"))
    assert summary["last_step"] == 4 and w.violations == []
    assert [logger.rows[s]["timing/train_time_total_s"] for s in (1, 2, 3, 4)] == [7.0, 14.0, 21.0, 25.0]
    assert [logger.rows[s]["timing/checkpoint"] for s in (1, 2, 3, 4)] == [0.0] * 4
