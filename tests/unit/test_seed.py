"""The seed design doc (shared/reference/sglang_backend_seed.rst) must work: its example command line
and its YAML file (tests/fixtures/sglang_gsm8k.yaml, copied verbatim) resolve to the values they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlctl.cli import app
from rlctl.config import load_config

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sglang_gsm8k.yaml"


def seed_overrides(home: str) -> list[str]:
    """The seed's command line after the shell ($HOME expanded, quotes removed)."""
    return [
        "trainer.algorithm.advantage_estimator=grpo",
        f"data.train_data=['{home}/data/gsm8k/train.parquet']",
        f"data.val_data=['{home}/data/gsm8k/validation.parquet']",
        "trainer.policy.model.path=Qwen/Qwen2.5-1.5B-Instruct",
        "trainer.placement.colocate_all=true",
        "trainer.strategy=fsdp",
        "generator.backend=sglang",
        "generator.run_engines_locally=true",
        "generator.async_engine=false",
        "generator.batched=true",
        "environment.env_class=gsm8k",
        "trainer.logger=wandb",
        "trainer.project_name=gsm8k_sglang",
    ]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    d = tmp_path / "data" / "gsm8k"
    d.mkdir(parents=True)
    (d / "train.parquet").write_bytes(b"x")
    (d / "validation.parquet").write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize("literal_home", [False, True], ids=["shell-expanded", "literal-$HOME"])
def test_seed_command_line_resolves(home, literal_home):
    h = "$HOME" if literal_home else str(home)
    loaded = load_config(overrides=seed_overrides(h))
    cfg = loaded.cfg
    assert cfg.trainer.algorithm.advantage_estimator == "grpo"
    assert cfg.data.train_data == [f"{home}/data/gsm8k/train.parquet"]
    assert cfg.data.val_data == [f"{home}/data/gsm8k/validation.parquet"]
    assert cfg.trainer.policy.model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert cfg.trainer.placement.colocate_all is True
    assert cfg.trainer.strategy == "fsdp2"
    assert cfg.generator.backend == "sglang"
    assert cfg.generator.run_engines_locally is True
    assert cfg.generator.async_engine is False
    assert cfg.generator.batched is True
    assert cfg.environment.env_class == "gsm8k"
    assert cfg.trainer.logger == "wandb"
    assert cfg.trainer.project_name == "gsm8k_sglang"
    assert cfg.trainer.run_name == "custom-seed42"
    assert cfg.run_dir == home / "rlctl_runs" / "gsm8k_sglang" / "custom-seed42"
    assert any("trainer.strategy" in n and "fsdp2" in n for n in loaded.notes)
    assert loaded.warnings == [] or all("wandb" in w for w in loaded.warnings)


def test_seed_command_line_via_check_config(home):
    res = CliRunner().invoke(app, ["check-config", "--format", "json", *seed_overrides(str(home))])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["trainer"]["strategy"] == "fsdp2"
    assert data["trainer"]["project_name"] == "gsm8k_sglang"
    assert data["generator"]["backend"] == "sglang"
    assert data["data"]["train_data"] == [f"{home}/data/gsm8k/train.parquet"]


def test_seed_yaml_resolves(home):
    loaded = load_config(config_file=FIXTURE)
    g, t = loaded.cfg.generator, loaded.cfg.trainer
    assert g.backend == "sglang" and g.async_engine is False
    assert g.num_inference_engines == 4 and g.inference_engine_tensor_parallel_size == 1
    assert t.placement.policy_num_gpus_per_node == 4  # from ppo_base_config: 4 x 1 engines == 4 workers
    assert g.model_dtype == "bfloat16" and g.run_engines_locally is True and g.batched is True
    assert g.weight_sync_backend == "nccl" and g.n_samples_per_prompt == 5
    sp = g.sampling_params
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k) == (1024, 1.0, 1.0, -1)
    assert g.eval_sampling_params.max_new_tokens == 1024
    assert t.policy.model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert t.strategy == "fsdp2"
    assert loaded.cfg.environment.env_class == "gsm8k"
    assert loaded.warnings == []
    notes = "\n".join(loaded.notes)
    assert "trainer.strategy: fsdp is an alias of fsdp2" in notes
    assert "generator.weight_sync_backend=nccl has no effect: while colocated" in notes and "CUDA IPC" in notes
    assert loaded.sources[0].startswith("preset ppo_base_config")


def test_seed_yaml_via_check_config_cli(home):
    res = CliRunner().invoke(app, ["check-config", "--config", str(FIXTURE)])
    assert res.exit_code == 0, res.output
    assert "num_inference_engines" in res.stdout
    assert "note: trainer.strategy" in res.stderr


def test_seed_yaml_with_seed_command_line(home):
    loaded = load_config(config_file=FIXTURE, overrides=seed_overrides(str(home)))
    assert loaded.cfg.trainer.project_name == "gsm8k_sglang"
    assert loaded.cfg.generator.num_inference_engines == 4


def test_derived_seeds_do_not_collide_across_steps_engines_and_requests():
    """The old arithmetic (step seed = base x 1_000_003 + step, request seed = step seed + i) made request j+1 of
    step s share a seed with request j of step s+1; SeedSequence-derived seeds are distinct over a whole grid."""
    from rlctl.generator import derive_seed
    from rlctl.loop import rollout_seed

    old = {(s, j): 42 * 1_000_003 + s + j for s in range(1, 4) for j in range(4)}
    assert old[(1, 1)] == old[(2, 0)]  # the collision this replaces
    seeds = [derive_seed(derive_seed(rollout_seed(42, s, k), e), j)
             for s in range(1, 21) for k in range(3) for e in range(4) for j in range(64)]
    assert len(set(seeds)) == len(seeds) == 20 * 3 * 4 * 64
    assert rollout_seed(42, 7, 0) == rollout_seed(42, 7, 0) != rollout_seed(43, 7, 0)
    assert all(0 <= s < 2**31 for s in seeds)
    with pytest.raises(ValueError, match="keys must be >= 0"):
        derive_seed(1, -2)
