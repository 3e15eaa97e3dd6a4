"""The whole GRPO job on CPU through Ray: 2 FSDP2 trainer workers over gloo + 2 ``hf`` generators.

A tiny random Llama and a reward that varies inside every group (fraction of even token ids) make
learning measurable in two steps. One Ray cluster is shared by all tests here (``ray_cluster``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlctl.config import load_config
from rlctl.testing import build_tiny_llama, tiny_run_overrides

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
REWARD = str(Path(__file__).resolve().parents[1] / "fixtures" / "test_rewards.py") + ":even_token_fraction"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, configure_logging=True, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", seed=3))


def _overrides(tiny: str, root: Path, run: str, max_steps: int, workers: int = 2, **extra) -> list[str]:
    return tiny_run_overrides(tiny, root, run, max_steps, workers=workers, reward_fn=REWARD, **{
        "generator.eval_sampling_params.max_new_tokens": 4, "trainer.eval_batch_size": 8,
        "trainer.logger": "tensorboard", **extra})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _even_mass(model_path: str, prompts: list[list[int]]) -> float:
    """Mean probability that the first response token has an even id."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        for p in prompts:
            probs = torch.softmax(m(input_ids=torch.tensor([p])).logits[0, -1], -1)
            total += probs[0::2].sum().item()
    return total / len(prompts)


def test_two_steps_learn_and_write_outputs(ray_cluster, tiny, tmp_path):
    from rlctl.job import train

    # 8 samples per prompt (the helper's 4 gave a gradient too noisy for a clear gain in 2 steps under some sampling
    # seeds: +0.005 even mass)
    loaded = load_config(preset=None, overrides=_overrides(tiny, tmp_path, "learn", 2, **{
        "generator.n_samples_per_prompt": 8}), backend="hf", for_training=True)
    import signal

    before = signal.getsignal(signal.SIGTERM)
    summary = train(loaded)
    assert signal.getsignal(signal.SIGTERM) is before  # SIGTERM stops a run cleanly only while it runs
    assert summary["last_step"] == 2
    run_dir = Path(loaded.cfg.run_dir)
    rows = _metrics(run_dir)
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["policy/grad_norm"] > 0
        assert 0.0 < r["reward/mean"] < 1.0
        # the hf generator and the FSDP2 trainer agree on the sampled tokens' log-probs (fp32)
        assert r["policy/rollout_train_logprobs_abs_diff_mean"] < 1e-4
        for phase in ("generate", "reward", "advantages", "logprobs", "train", "weight_sync", "checkpoint"):
            assert r[f"timing/{phase}"] >= 0.0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "versions.json").is_file()
    assert len((run_dir / "rollouts" / "step_1.jsonl").read_text().splitlines()) == 16  # 2 prompts x 8 samples
    assert list((run_dir / "tensorboard").iterdir())
    ckpt = Path(loaded.cfg.ckpt_dir) / "global_step_2"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "policy" / "model.safetensors").is_file()
    # learning, not just motion: the rewarded (even) tokens became more likely
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
               for q in ("What is 2+3?", "Natalia sold clips to 48 of her friends.", "A robe takes 2 bolts.")]
    before, after = _even_mass(tiny, prompts), _even_mass(str(ckpt / "policy"), prompts)
    assert after > before + 0.01, (before, after)


def test_resume_reproduces_uninterrupted_metrics(ray_cluster, tiny, tmp_path, capfd):
    from rlctl.job import train

    full = load_config(overrides=_overrides(tiny, tmp_path, "full", 3, workers=1), backend="hf", for_training=True)
    train(full)
    part = load_config(overrides=_overrides(tiny, tmp_path, "part", 2, workers=1), backend="hf", for_training=True)
    train(part)
    resumed = load_config(overrides=_overrides(tiny, tmp_path, "part", 3, workers=1, **{"trainer.resume_mode": "latest"}),
                          backend="hf", for_training=True)
    first_start = json.loads((Path(part.cfg.run_dir) / "versions.json").read_text())["time_utc"]
    summary = train(resumed)
    assert summary["last_step"] == 3
    versions = json.loads((Path(resumed.cfg.run_dir) / "versions.json").read_text())
    assert versions["time_utc"] == first_start and len(versions["resumed_utc"]) == 1  # the run's first start kept
    a = {r["step"]: r for r in _metrics(Path(full.cfg.run_dir))}
    b = {r["step"]: r for r in _metrics(Path(resumed.cfg.run_dir))}
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        ma = {k: v for k, v in a[step].items() if not k.startswith(("timing/", "rollout/tokens_per_s", "generator/"))}
        mb = {k: v for k, v in b[step].items() if not k.startswith(("timing/", "rollout/tokens_per_s", "generator/"))}
        assert ma == mb, step
    # trainer.max_train_time_s's running total survives the real checkpoint: step 3 (after the resume) adds its
    # own training seconds (timing/step without eval, log, checkpoint) to the total saved at step 2
    t3 = b[3]["timing/step"] - sum(b[3].get(f"timing/{p}", 0.0) for p in ("eval", "log", "checkpoint"))
    assert b[2]["timing/train_time_total_s"] > 0
    assert b[3]["timing/train_time_total_s"] == pytest.approx(b[2]["timing/train_time_total_s"] + t3, rel=1e-9)
    # the same command again: the latest checkpoint already completes the run -> a note, nothing trained
    capfd.readouterr()
    assert train(resumed)["last_step"] == 3
    import re

    # rich's log columns (time, file:line) may interleave wrapped lines: drop them before matching
    err = " ".join(w for w in capfd.readouterr().err.split()
                   if not re.fullmatch(r"\S+\.py:\d+|\[\d\d:\d\d:\d\d\]", w))
    assert "note: the checkpoint of step 3 already completes this run's 3 steps: nothing to train" in err
    assert "done: 3 steps (max_steps); metrics in" in err and "; checkpoint" in err


def test_split_placement_two_engines_get_the_weights(ray_cluster, tiny, tmp_path):
    """colocate_all=false, 2 FSDP2 trainer workers, 2 hf engines in their own actors: trainer rank 0
    broadcasts every bucket over a gloo weight-update group (the NCCL protocol of SGLang engines) while
    rank 1 takes part in gathering the full tensors, so after the first update both engines agree with
    the trainer's log-probs (a stale engine would not)."""
    from rlctl.job import train

    loaded = load_config(overrides=_overrides(tiny, tmp_path, "split", 2, workers=2, **{
        "trainer.placement.colocate_all": "false", "generator.num_inference_engines": 2,
        "generator.weight_sync_backend": "gloo",
        "trainer.eval_before_train": "true"}), backend="hf", for_training=True)
    assert train(loaded)["last_step"] == 2
    rows = {r["step"]: r for r in _metrics(Path(loaded.cfg.run_dir))}
    assert rows[2]["policy/rollout_train_logprobs_abs_diff_mean"] < 1e-4
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny)
    tied = m.config.tie_word_embeddings
    fp32_bytes = sum(p.numel() * 4 for n, p in m.named_parameters() if not (tied and n == "lm_head.weight"))
    assert rows[2]["generator/weight_sync_bytes"] == fp32_bytes  # every weight broadcast once, in fp32
    # eval before training and once after the last step (eval_interval=-1), on the 32-row sample
    assert [s for s in sorted(rows) if "eval/num_problems" in rows[s]] == [0, 2]
    assert rows[0]["eval/num_problems"] == 32.0 and rows[2]["eval/num_problems"] == 32.0


def test_eval_command_scores_the_validation_split(ray_cluster, tiny, tmp_path):
    from rlctl.job import evaluate

    loaded = load_config(overrides=_overrides(tiny, tmp_path, "eval", 1, workers=1), backend="hf")
    m = evaluate(loaded)
    assert m["eval/num_problems"] == 32.0  # the bundled validation sample
    assert m["eval/accuracy_strict"] == 0.0 and m["eval/accuracy_flexible"] == 0.0  # a random tiny model
    assert 0 < m["eval/response_length_mean"] <= 4  # eval max_new_tokens=4


@pytest.mark.parametrize("colocated", [True, False])
def test_failed_build_kills_the_actors_it_started(ray_cluster, tiny, tmp_path, colocated):
    """A model folder whose weights do not load: the actors fail while the groups are built; build_groups
    kills every actor it started and frees its placement group before raising (the caller has no group
    to shut down; on an external cluster nothing else would). Both layouts create the trainer rank's process
    while the engine builds (colocated, its model would load only after the engines), so both actors exist
    when the engine fails, and both are killed."""
    import shutil
    import time

    import ray

    from rlctl.job.cluster import build_groups
    from rlctl.job.groups import ACTOR_LABELS

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    loaded = load_config(overrides=_overrides(str(bad), tmp_path, "bad", 1, workers=1)
                         + ([] if colocated else ["trainer.placement.colocate_all=false", "generator.weight_sync_backend=gloo"]),
                         backend="hf")
    before = set(ACTOR_LABELS)
    with pytest.raises(ray.exceptions.RayError):
        build_groups(loaded.cfg, "cpu")
    started = set(ACTOR_LABELS) - before
    assert sorted(ACTOR_LABELS[a] for a in started) == ["generator-0", "trainer-0"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {a: ray._private.state.actors(a)["State"] for a in started}
        if set(states.values()) == {"DEAD"}:
            break
        time.sleep(0.5)
    assert set(states.values()) == {"DEAD"}, states
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def test_placement_group_timeout_names_the_keys(ray_cluster, tiny, tmp_path):
    from rlctl.job.cluster import build_groups

    loaded = load_config(overrides=_overrides(tiny, tmp_path, "pg", 1, workers=8, **{"ray.placement_group_timeout_s": 2, "trainer.micro_train_batch_size_per_gpu": 1}),
                         backend="hf")
    with pytest.raises(RuntimeError) as exc:
        build_groups(loaded.cfg, "cpu")
    msg = str(exc.value)
    assert "Ray could not reserve 8 bundles" in msg and "within 2.0 s" in msg
    for key in ("trainer.placement.policy_num_gpus_per_node", "generator.num_inference_engines", "ray.num_cpus",
                "ray.placement_group_timeout_s"):
        assert key in msg


def test_failed_start_leaves_no_run_folder_and_claims_no_checkpoint(ray_cluster, tiny, tmp_path, capsys):
    """An engine that cannot load its model: exit 1 with the actor named, no run folder (config.yaml,
    TensorBoard files) left behind, and no claim about checkpoints that do not exist."""
    import shutil

    from rlctl.job import train

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    loaded = load_config(overrides=_overrides(str(bad), tmp_path, "badstart", 1, workers=1), backend="hf")

    def host_handler(signum, frame):  # a host program's own SIGTERM handler: train() must hand it back
        pass

    import signal

    before = signal.signal(signal.SIGTERM, host_handler)
    try:
        with pytest.raises(SystemExit) as exc:
            train(loaded)
        assert signal.getsignal(signal.SIGTERM) is host_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert exc.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "error: generator-0" in err or "error: trainer-0" in err, err[-2000:]
    assert "no checkpoint was completed" in err and "are kept" not in err
    assert not Path(loaded.cfg.run_dir).exists()
