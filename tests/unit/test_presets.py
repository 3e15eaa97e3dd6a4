"""Every shipped preset loads, has a description, and resolves to the values its comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlctl.cli import app
from rlctl.config import LEAF_DEFAULTS, list_presets, load_config, presets_dir, to_dict

PRESETS = sorted(p.stem for p in presets_dir().glob("*.yaml"))


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RLCTL_PRESETS_DIR", raising=False)
    monkeypatch.delenv("RLCTL_SAMPLE_DATA", raising=False)
    return tmp_path


def test_presets_folder_has_the_three():
    assert {"ppo_base_config", "gsm8k", "gsm8k-cpu"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_is_described(name):
    loaded = load_config(preset=name)
    assert loaded.cfg.trainer.run_name == f"{name}-seed{loaded.cfg.trainer.seed}"
    desc = dict(list_presets())[name]
    assert desc and len(desc) < 140
    # the file uses only safe YAML and known keys (load_config would have raised otherwise)
    yaml.safe_load((presets_dir() / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("backend", ["sglang", "hf"])
def test_every_preset_with_either_backend(name, backend):
    over = ["trainer.device=auto"] if backend == "sglang" else []
    loaded = load_config(preset=name, backend=backend, overrides=over)
    assert loaded.cfg.generator.backend == backend


def test_ppo_base_config_equals_schema_defaults():
    base = load_config(preset="ppo_base_config")
    plain = load_config()
    a, b = to_dict(base.cfg), to_dict(plain.cfg)
    a["trainer"].pop("run_name"), b["trainer"].pop("run_name")
    assert a == b
    assert base.notes == []


def test_gsm8k_values():
    cfg = load_config(preset="gsm8k").cfg
    t, g = cfg.trainer, cfg.generator
    assert g.backend == "sglang" and g.async_engine is False
    assert t.policy.model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert g.n_samples_per_prompt == 5 and g.sampling_params.max_new_tokens == 1024
    assert t.placement.colocate_all and t.placement.policy_num_gpus_per_node == 1 and g.num_inference_engines == 1
    assert cfg.num_policy_workers == 1
    assert (t.train_batch_size, t.policy_mini_batch_size, t.micro_train_batch_size_per_gpu) == (64, 16, 8)
    assert t.max_prompt_length == 512 and t.logger == "tensorboard" and cfg.environment.env_class == "gsm8k"
    assert g.eval_sampling_params.temperature == 0.0 and g.eval_sampling_params.max_new_tokens == 1024


def test_gsm8k_gspo_values():
    loaded = load_config(preset="gsm8k-gspo")
    a, base = loaded.cfg.trainer.algorithm, load_config(preset="gsm8k").cfg
    assert (a.policy_loss_type, a.eps_clip_low, a.eps_clip_high, a.loss_reduction) == ("gspo", 3e-4, 4e-4, "sequence_mean")
    # everything else is gsm8k's
    a_all, b_all = to_dict(loaded.cfg), to_dict(base)
    for d in (a_all, b_all):
        d["trainer"].pop("run_name")
        for k in ("policy_loss_type", "eps_clip_low", "eps_clip_high", "loss_reduction"):
            d["trainer"]["algorithm"].pop(k)
    assert a_all == b_all
    assert loaded.notes == []


def test_gsm8k_cpu_values(home):
    loaded = load_config(preset="gsm8k-cpu")
    cfg = loaded.cfg
    t, g = cfg.trainer, cfg.generator
    import rlctl
    sample = Path(rlctl.__file__).parent / "data" / "gsm8k_sample"
    assert cfg.data.train_data == [str(sample / "train.parquet")]
    assert cfg.data.val_data == [str(sample / "validation.parquet")]
    assert g.backend == "hf" and t.device == "cpu"
    assert t.policy.model.path == f"{home}/models/smollm2-135m-instruct"
    assert (t.placement.policy_num_gpus_per_node, g.num_inference_engines, t.placement.colocate_all) == (1, 1, True)
    assert (t.train_batch_size, t.policy_mini_batch_size, g.n_samples_per_prompt) == (4, 2, 4)
    assert (t.micro_train_batch_size_per_gpu, t.micro_forward_batch_size_per_gpu) == (4, 8)
    assert g.sampling_params.max_new_tokens == 128 and t.max_steps == 2
    assert (t.eval_before_train, t.eval_interval, t.eval_batch_size) == (False, -1, 32)
    assert t.algorithm.use_kl_loss is False and t.gradient_checkpointing is False
    assert t.policy.optimizer_config.lr == 1e-6 and t.logger == "tensorboard" and t.max_ckpts_to_keep == 2
    assert t.log_path == f"{home}/rlctl_runs" and t.ckpt_path == f"{home}/ckpts/"  # as gsm8k and the seed
    assert loaded.notes == []
    # the only complaint is the model folder that `rlctl prepare-model smollm2` creates
    assert [w.split(":")[0] for w in loaded.warnings] == ["trainer.policy.model.path"]


def test_gsm8k_cpu_training_needs_the_model(home):
    from rlctl.config import ConfigError
    with pytest.raises(ConfigError, match="rlctl prepare-model smollm2"):
        load_config(preset="gsm8k-cpu", for_training=True)
    (home / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    if all(Path(p).is_file() for p in load_config(preset="gsm8k-cpu").cfg.data.train_data):
        load_config(preset="gsm8k-cpu", for_training=True)


def test_presets_command_lists_descriptions():
    res = CliRunner().invoke(app, ["presets"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for name, desc in list_presets():
        assert name in res.stdout
        assert desc.split()[0] in res.stdout


@pytest.mark.slow
def test_a_non_editable_install_ships_and_finds_the_presets(tmp_path):
    """The presets live in the repository's top-level presets/ folder; the wheel maps them into the package
    rlctl.presets. Build the wheel (no dependencies), unpack it as a plain install would, and list the presets
    from there in a fresh interpreter (the checkout is not on its path)."""
    import subprocess
    import sys
    import zipfile

    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(repo)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("rlctl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"rlctl/presets/{p.name}" for p in (repo / "presets").glob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert {f"rlctl/{p.relative_to(repo / 'rlctl')}" for p in (repo / "rlctl").rglob("*.py")} <= names  # every module
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; from rlctl.config import presets_dir, list_presets; "
            "print(presets_dir()); print(sorted(n for n, _ in list_presets()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    folder, listed = out.stdout.splitlines()
    assert folder == str(site / "rlctl" / "presets")
    assert eval(listed) == sorted(p.stem for p in (repo / "presets").glob("*.yaml"))  # noqa: S307 - our own print
