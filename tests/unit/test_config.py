"""Schema, rules, precedence, override coercion, safe YAML, preset names and redaction (rlctl/config.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from rlctl import config as C
from rlctl.config import ConfigError, RunConfig, load_config, redact, to_dict


@pytest.fixture(autouse=True)
def home(gsm8k_home):
    return gsm8k_home


def errors_of(**kw) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(**kw)
    return exc.value.errors


def one_error(*overrides: str, **kw) -> str:
    errs = errors_of(overrides=list(overrides), **kw)
    assert len(errs) == 1, errs
    return errs[0]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ------------------------------------------------------------------------------------------ defaults


def test_defaults_mirror_skyrl(home):
    cfg = load_config().cfg
    t, a, g = cfg.trainer, cfg.trainer.algorithm, cfg.generator
    assert cfg.data.train_data == [f"{home}/data/gsm8k/train.parquet"]
    assert t.strategy == "fsdp2" and t.policy.model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    oc = t.policy.optimizer_config
    assert (oc.lr, oc.adam_betas, oc.weight_decay, oc.max_grad_norm, oc.offload_after_step, oc.num_warmup_steps) == (
        1e-6, [0.9, 0.999], 0.01, 1.0, True, 0)
    assert t.policy.fsdp_config.cpu_offload is False and t.ref.fsdp_config.cpu_offload is True
    p = t.placement
    assert (p.colocate_all, p.colocate_policy_ref, p.policy_num_nodes, p.policy_num_gpus_per_node) == (True, True, 1, 4)
    assert (a.advantage_estimator, a.grpo_norm_by_std, a.eps_clip_low, a.eps_clip_high) == ("grpo", True, 0.2, 0.2)
    assert (a.policy_loss_type, a.clip_ratio_c, a.loss_reduction) == ("regular", 3.0, "token_mean")
    assert (a.use_kl_loss, a.kl_loss_coef, a.kl_estimator_type) == (True, 0.001, "k3")
    assert (a.use_entropy_loss, a.entropy_loss_coef, a.zero_variance_filter) == (False, 0.01, False)
    assert (t.seed, t.epochs, t.train_batch_size, t.policy_mini_batch_size) == (42, 1, 1024, 256)
    assert (t.micro_train_batch_size_per_gpu, t.micro_forward_batch_size_per_gpu, t.max_prompt_length) == (1, 1, 512)
    assert (t.eval_before_train, t.eval_interval, t.eval_batch_size, t.ckpt_interval) == (True, 5, 1024, 10)
    assert t.ckpt_path == f"{home}/ckpts/" and t.max_ckpts_to_keep == -1 and t.resume_mode == "latest"
    assert t.log_path == f"{home}/rlctl_runs" and t.logger == "tensorboard" and t.project_name == "skyrl"
    assert (t.max_steps, t.max_wall_time_s, t.max_bad_steps, t.rollout_dump_interval, t.device) == (None, None, 3, 1, "auto")
    assert (g.backend, g.async_engine, g.batched, g.run_engines_locally) == ("sglang", False, True, True)
    assert (g.num_inference_engines, g.inference_engine_tensor_parallel_size, g.model_dtype) == (4, 1, "bfloat16")
    assert (g.weight_sync_backend, g.weight_sync_bucket_mb, g.n_samples_per_prompt, g.gpu_memory_utilization) == ("nccl", 512, 5, 0.8)
    sp, ev = g.sampling_params, g.eval_sampling_params
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.stop_token_ids) == (1024, 1.0, 1.0, -1, 0.0, None)
    assert (ev.max_new_tokens, ev.temperature) == (1024, 0.0)
    assert g.sglang.attention_backend == "triton" and g.sglang.enable_memory_saver is True and g.hf.max_batch_size == 64
    r = cfg.environment.reward
    assert (cfg.environment.env_class, r.method, r.correct_score, r.format_score, r.custom_reward_fn) == ("gsm8k", "strict", 1.0, 0.0, None)
    assert (cfg.ray.address, cfg.ray.include_dashboard, cfg.ray.dashboard_host, cfg.ray.placement_group_timeout_s) == (
        None, False, "127.0.0.1", 120.0)


def test_properties(home):
    cfg = load_config(overrides=["trainer.project_name=p", "trainer.run_name=r", "trainer.ckpt_path=~/ck"]).cfg
    assert cfg.run_dir == home / "rlctl_runs" / "p" / "r"
    assert cfg.ckpt_dir == home / "ck" / "p" / "r"
    assert cfg.num_policy_workers == 4


def test_run_name_default_is_deterministic(home):
    assert load_config().cfg.trainer.run_name == "custom-seed42"
    assert load_config(preset="gsm8k", overrides=["trainer.seed=7"]).cfg.trainer.run_name == "gsm8k-seed7"
    assert load_config(preset="gsm8k").cfg.run_dir == load_config(preset="gsm8k").cfg.run_dir


def test_config_is_frozen():
    cfg = load_config().cfg
    with pytest.raises(Exception):
        cfg.trainer.seed = 3  # type: ignore[misc]


def test_to_dict_roundtrips():
    cfg = load_config(overrides=["trainer.seed=5"]).cfg
    d = to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert RunConfig.model_validate(d) == cfg


# ----------------------------------------------------------------------------------- paths and data


def test_env_vars_and_tilde_expanded(home, monkeypatch):
    monkeypatch.setenv("MYDATA", "/srv/d")
    cfg = load_config(overrides=["data.train_data=['$MYDATA/a.parquet','${MYDATA}/b.parquet','~/c.parquet']"]).cfg
    assert cfg.data.train_data == ["/srv/d/a.parquet", "/srv/d/b.parquet", f"{home}/c.parquet"]


def test_rlctl_sample_data_defaults_to_bundled_sample(monkeypatch):
    cfg = load_config(overrides=["data.val_data=${RLCTL_SAMPLE_DATA}/validation.parquet"]).cfg
    import rlctl
    assert cfg.data.val_data == [str(Path(rlctl.__file__).parent / "data" / "gsm8k_sample" / "validation.parquet")]
    monkeypatch.setenv("RLCTL_SAMPLE_DATA", "/elsewhere")
    assert load_config(overrides=["data.val_data=${RLCTL_SAMPLE_DATA}/v.parquet"]).cfg.data.val_data == ["/elsewhere/v.parquet"]


def test_missing_data_is_warning_in_check_and_error_for_training(home):
    over = ["data.train_data=['/nope/train.parquet']"]
    loaded = load_config(overrides=over)
    assert loaded.warnings == ["data.train_data[0]: file /nope/train.parquet does not exist; run `rlctl prepare-data gsm8k` or fix the path"]
    err = one_error(*over, for_training=True)
    assert err.startswith("data.train_data[0]=/nope/train.parquet: file does not exist")


def test_local_model_path_missing(home):
    over = ["trainer.policy.model.path=~/models/none"]
    assert "local model folder" in load_config(overrides=over).warnings[0]
    assert one_error(*over, for_training=True).endswith(
        "local model folder does not exist; point it at a folder with a Hugging Face model (config.json + weights) "
        "or give a hub name like Qwen/Qwen2.5-1.5B-Instruct")
    # a SmolLM2 folder: rlctl can write it
    assert f"run `rlctl prepare-model smollm2 --output-dir {home}/models/smollm2-x`" in one_error(
        "trainer.policy.model.path=~/models/smollm2-x", for_training=True)
    # hub names are fine even for training
    load_config(overrides=["trainer.policy.model.path=Qwen/Qwen2.5-1.5B-Instruct"], for_training=True)
    load_config(overrides=["trainer.policy.model.path=gpt2"], for_training=True)


# ------------------------------------------------------------------------------------------- precedence


def test_precedence_chain(home, tmp_path, monkeypatch):
    pdir = tmp_path / "presets"
    pdir.mkdir()
    write(pdir, "base.yaml", """
        trainer: {seed: 1, epochs: 2, project_name: base}
        generator: {n_samples_per_prompt: 8}
    """)
    write(pdir, "child.yaml", """
        # description: child
        defaults: [base]
        trainer: {seed: 2, eval_interval: 7}
    """)
    cfgfile = write(tmp_path, "run.yaml", """
        trainer: {seed: 3, eval_batch_size: 99}
        data: {train_data: [a.parquet, b.parquet]}
    """)
    monkeypatch.setenv("RLCTL_PRESETS_DIR", str(pdir))
    t = load_config(preset="child").cfg.trainer
    assert (t.seed, t.epochs, t.eval_interval, t.project_name) == (2, 2, 7, "base")
    loaded = load_config(preset="child", config_file=cfgfile)
    t = loaded.cfg.trainer
    assert (t.seed, t.epochs, t.eval_interval, t.eval_batch_size) == (3, 2, 7, 99)
    loaded = load_config(preset="child", config_file=cfgfile, overrides=["trainer.seed=4", "data.train_data=[c.parquet]"], backend="hf")
    assert loaded.cfg.trainer.seed == 4
    assert loaded.cfg.data.train_data == ["c.parquet"]  # lists replace, not merge
    assert loaded.cfg.generator.n_samples_per_prompt == 8  # deep merge kept the preset's sibling keys
    assert loaded.cfg.generator.backend == "hf"
    assert loaded.cfg.trainer.run_name == "child-seed4"
    assert [s.split(" ")[0] for s in loaded.sources] == ["preset", "preset", str(cfgfile), "override", "override", "--backend"]


def test_backend_flag_beats_override(home):
    assert load_config(overrides=["generator.backend=sglang"], backend="hf").cfg.generator.backend == "hf"


def test_config_file_defaults_resolve_in_presets_folder(home, tmp_path):
    f = write(tmp_path, "c.yaml", "defaults: [gsm8k]\ntrainer: {seed: 9}\n")
    cfg = load_config(config_file=f).cfg
    assert cfg.trainer.train_batch_size == 64 and cfg.trainer.seed == 9 and cfg.trainer.run_name == "custom-seed9"


def test_defaults_cycle_is_error(tmp_path, monkeypatch):
    write(tmp_path, "a.yaml", "defaults: [b]\n")
    write(tmp_path, "b.yaml", "defaults: [a]\n")
    monkeypatch.setenv("RLCTL_PRESETS_DIR", str(tmp_path))
    assert "defaults cycle: a -> b -> a" in one_error(preset="a")


# ------------------------------------------------------------------------------------ override parsing


@pytest.mark.parametrize("override,path,value", [
    ("trainer.run_name=0123", "trainer.run_name", "0123"),
    ("trainer.project_name=2024", "trainer.project_name", "2024"),
    ("trainer.policy.model.path=Qwen/Qwen2.5-1.5B-Instruct", "trainer.policy.model.path", "Qwen/Qwen2.5-1.5B-Instruct"),
    ("trainer.logger=wandb", "trainer.logger", "wandb"),
    ("trainer.logger='wandb'", "trainer.logger", "wandb"),
    ("trainer.logger=[wandb,console]", "trainer.logger", ["wandb", "console"]),
    ("data.train_data=['a.parquet','b.parquet']", "data.train_data", ["a.parquet", "b.parquet"]),
    ("data.train_data=a.parquet", "data.train_data", ["a.parquet"]),
    ("trainer.seed=7", "trainer.seed", 7),
    ("trainer.policy.optimizer_config.lr=3e-6", "trainer.policy.optimizer_config.lr", 3e-6),
    ("trainer.policy.optimizer_config.lr=1", "trainer.policy.optimizer_config.lr", 1.0),
    ("trainer.max_steps=null", "trainer.max_steps", None),
    ("trainer.resume_mode=null", "trainer.resume_mode", "none"),
    ("trainer.resume_mode=none", "trainer.resume_mode", "none"),
    ("trainer.run_name=null", "trainer.run_name", "custom-seed42"),
    ("trainer.eval_before_train=false", "trainer.eval_before_train", False),
    ("generator.sampling_params.stop_token_ids=[2, 7]", "generator.sampling_params.stop_token_ids", [2, 7]),
    ("environment.reward.custom_reward_fn=my_mod:score", "environment.reward.custom_reward_fn", "my_mod:score"),
    ("+trainer.seed=8", "trainer.seed", 8),
    ("generator.sampling_params={temperature: 0.5}", "generator.sampling_params.temperature", 0.5),
])
def test_override_coercion(override, path, value):
    cfg = load_config(overrides=[override]).cfg
    assert C._value_at(cfg, path) == value


def test_override_applies_in_order():
    assert load_config(overrides=["trainer.seed=1", "trainer.seed=2"]).cfg.trainer.seed == 2


def test_malformed_override():
    assert one_error("trainer.seed") == "override 'trainer.seed': expected key=value, e.g. trainer.seed=1"
    assert "is not a dotted key path" in one_error("trainer..seed=1")


def test_unknown_override_key_with_suggestion():
    err = one_error("trainer.seeed=1")
    assert err == "trainer.seeed=1: unknown key; did you mean trainer.seed?; remove or rename it"
    assert "did you mean trainer.policy.optimizer_config.lr?" in one_error("trainer.lr=1e-6")
    assert "did you mean generator.n_samples_per_prompt?" in one_error("generator.n_sample_per_prompt=2")


def test_unknown_key_in_file_names_file(tmp_path):
    f = write(tmp_path, "c.yaml", "trainer:\n  sed: 1\n")
    err = one_error(config_file=f)
    assert err == f"trainer.sed=1: unknown key; did you mean trainer.seed?; remove or rename it [{f}:2]"


def test_empty_section_and_empty_file(tmp_path):
    assert load_config(config_file=write(tmp_path, "e.yaml", "")).cfg.trainer.seed == 42
    assert load_config(config_file=write(tmp_path, "s.yaml", "trainer:\n")).cfg.trainer.seed == 42


# ------------------------------------------------------------------------------------------ safe YAML


def test_python_object_tag_refused(tmp_path):
    f = write(tmp_path, "evil.yaml", "trainer:\n  seed: !!python/object/apply:os.system ['echo hi']\n")
    err = one_error(config_file=f)
    assert err.startswith(f"{f}:2: ") and "!!python/object" in err and "safe_load" in err


def test_python_object_tag_refused_in_override():
    assert "refused" in one_error("trainer.seed=!!python/object/apply:os.system ['echo']")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = write(tmp_path, "bad.yaml", "trainer:\n  seed: 1\n  epochs: [1, 2\n")
    err = one_error(config_file=f)
    assert err.startswith(f"{f}:") and "invalid YAML" in err


def test_yaml_top_level_must_be_mapping(tmp_path):
    assert "top level must be a mapping" in one_error(config_file=write(tmp_path, "l.yaml", "- 1\n- 2\n"))


def test_missing_config_file(tmp_path):
    assert one_error(config_file=tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: file not found"


# ------------------------------------------------------------------------------------------ preset names


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "..", "a/b", "/etc/passwd", "x y", ""])
def test_preset_path_traversal_refused(name):
    err = one_error(preset=name)
    assert err.startswith("--preset: preset name") and "invalid" in err


def test_preset_symlink_outside_refused(tmp_path, monkeypatch):
    pdir = tmp_path / "p"
    pdir.mkdir()
    outside = write(tmp_path, "secret.yaml", "trainer: {seed: 1}\n")
    (pdir / "link.yaml").symlink_to(outside)
    monkeypatch.setenv("RLCTL_PRESETS_DIR", str(pdir))
    assert "outside the presets folder" in one_error(preset="link")


def test_unknown_preset_suggests():
    err = one_error(preset="gsm8kcpu")
    assert "not found" in err and "did you mean 'gsm8k-cpu'?" in err


# ----------------------------------------------------------------------------------------------- rules


def test_async_engine_error():
    assert one_error("generator.async_engine=true").startswith(
        "generator.async_engine=true: SGLang engines in rlctl run synchronously") 
    assert "set generator.async_engine=false" in one_error("generator.async_engine=true")
    assert "set generator.async_engine=false" in one_error("generator.async_engine=true", backend="hf")


def test_vllm_backend_error():
    err = one_error("generator.backend=vllm")
    assert err.startswith("generator.backend=vllm: rlctl runs sglang or hf")


def test_sglang_on_cpu_says_auto_needs_a_gpu_machine_and_names_vllm():
    err = one_error(preset="gsm8k-cpu", backend="sglang")
    assert err.startswith("trainer.device=cpu: SGLang needs CUDA GPUs; use --backend hf (generator.backend=hf) for CPU "
                          "runs; on a GPU machine set trainer.device=auto (or cuda) instead [preset gsm8k-cpu")
    errs = errors_of(preset="gsm8k-cpu", backend="vllm")
    assert errs[0].startswith("generator.backend=vllm: rlctl runs sglang or hf, not vLLM")
    assert errs[1].startswith("trainer.device=cpu: generator.backend=vllm is checked as sglang, rlctl's GPU engine; "
                              "SGLang needs CUDA GPUs; use --backend hf")


def test_remote_engines_error():
    assert "remote inference engines are not supported; set generator.run_engines_locally=true" in one_error(
        "generator.run_engines_locally=false")


def test_strategy_alias_note_and_bad_strategy():
    loaded = load_config(overrides=["trainer.strategy=fsdp"])
    assert loaded.cfg.trainer.strategy == "fsdp2" and "trainer.strategy: fsdp is an alias of fsdp2" in loaded.notes[0]
    assert one_error("trainer.strategy=deepspeed").startswith("trainer.strategy=deepspeed: must be one of 'fsdp2'")


def test_tensor_parallel_alias():
    loaded = load_config(overrides=["generator.tensor_parallel_size=1"])
    assert loaded.cfg.generator.inference_engine_tensor_parallel_size == 1
    assert any("generator.tensor_parallel_size: alias of generator.inference_engine_tensor_parallel_size" in n for n in loaded.notes)
    # the alias reaches the canonical key, whose rules then apply (a colocated TP 2 engine on nodes of 3 GPUs)
    err = one_error("generator.tensor_parallel_size=2", "trainer.placement.policy_num_nodes=2",
                    "trainer.placement.policy_num_gpus_per_node=3", "generator.num_inference_engines=3",
                    "trainer.train_batch_size=12", "trainer.policy_mini_batch_size=6", "trainer.eval_batch_size=12")
    assert err.startswith("generator.inference_engine_tensor_parallel_size=2: must divide "
                          "trainer.placement.policy_num_gpus_per_node (3)")
    assert err.endswith("[command line, as generator.tensor_parallel_size]")  # the name the user typed, not the preset


def test_alias_error_names_the_file_that_set_the_alias(tmp_path):
    f = write(tmp_path, "tp.yaml", "generator:\n  tensor_parallel_size: 2\n")
    errs = errors_of(preset="gsm8k", config_file=f, backend="hf")
    assert errs[0].startswith("generator.inference_engine_tensor_parallel_size=2: the hf generator has no tensor parallelism")
    assert errs[0].endswith(f"[{f}:2, as generator.tensor_parallel_size]")


def test_translated_key_errors_name_the_key_the_user_wrote():
    # multi-key rules name the alias too, not a key the user never typed (gsm8k: 1 GPU, 1 engine)
    errs = errors_of(preset="gsm8k", overrides=["generator.tensor_parallel_size=2"])
    assert errs[0].endswith("[generator.inference_engine_tensor_parallel_size: command line, as generator.tensor_parallel_size; "
                            "trainer.placement.policy_num_gpus_per_node: preset gsm8k]")
    assert errs[1].startswith("generator.num_inference_engines=1: colocated layout needs")
    assert "generator.inference_engine_tensor_parallel_size: command line, as generator.tensor_parallel_size;" in errs[1]
    # every translated name: a bad value reported on the rlctl key names the command line, not the preset's line
    err = one_error("generator.sampling_params.max_generate_length=0", preset="gsm8k-cpu")
    assert err.startswith("generator.sampling_params.max_new_tokens=0: must be >= 1")
    assert err.endswith("[command line, as generator.sampling_params.max_generate_length]")


def test_multi_key_rule_names_the_source_of_each_key(tmp_path):
    f = write(tmp_path, "layer.yaml", "generator:\n  n_samples_per_prompt: 3\n")
    errs = errors_of(preset="gsm8k-cpu", config_file=f, overrides=["trainer.train_batch_size=5"])
    assert errs[0].endswith("[trainer.policy_mini_batch_size: preset gsm8k-cpu; trainer.train_batch_size: command line]")
    assert errs[1].endswith("[trainer.micro_train_batch_size_per_gpu: preset gsm8k-cpu; trainer.policy_mini_batch_size: "
                            f"preset gsm8k-cpu; generator.n_samples_per_prompt: {f}:2]")


def test_config_defaults_do_not_reapply_the_presets_base(tmp_path):
    """--preset gsm8k composes ppo_base_config; a SkyRL-style file listing it again must not undo gsm8k."""
    f = write(tmp_path, "skyrl.yaml", "defaults:\n  - ppo_base_config\ntrainer:\n  seed: 3\n")
    loaded = load_config(preset="gsm8k", config_file=f)
    gsm8k = load_config(preset="gsm8k").cfg
    assert loaded.cfg.trainer.seed == 3
    assert loaded.cfg.trainer.train_batch_size == gsm8k.trainer.train_batch_size == 64
    assert loaded.cfg.trainer.project_name == "gsm8k"
    assert loaded.notes[0] == (f"preset ppo_base_config is listed in the defaults of {f} but was already composed by "
                               "--preset gsm8k; applied once, at its first place")
    # without --preset the file's defaults apply as before
    assert load_config(config_file=f).cfg.trainer.train_batch_size == 1024


def test_duplicate_yaml_key_is_an_error_with_lines(tmp_path):
    f = write(tmp_path, "dup.yaml", "trainer:\n  seed: 1\n  epochs: 2\n  seed: 2\n")
    assert errors_of(config_file=f) == [f"{f}:4: duplicate key 'seed' (first on line 2); give each key once"]
    # a YAML merge key may repeat a key on purpose: the explicit one wins
    assert C.safe_load("base: &b\n  seed: 1\ntrainer:\n  <<: *b\n  seed: 2\n") == {"base": {"seed": 1}, "trainer": {"seed": 2}}


def test_unknown_key_in_a_file_names_its_line(tmp_path):
    f = write(tmp_path, "typo.yaml", "trainer:\n  seed: 1\n  polcy:\n    model: {path: x}\n  epochz: 3\n")
    assert errors_of(config_file=f) == [
        f"trainer.polcy.model.path=x: unknown key trainer.polcy; did you mean trainer.policy.model.path?; "
        f"remove or rename it [{f}:3]",
        f"trainer.epochz=3: unknown key; did you mean trainer.epochs?; remove or rename it [{f}:5]"]


def test_unknown_key_and_type_error_name_their_file_line_the_same_way(tmp_path, monkeypatch):
    """One source format for every error from a --config / preset line: ' [file:line]' at the end."""
    f = write(tmp_path, "mix.yaml", "trainer:\n  seed: x\n  foo: 1\n")
    assert errors_of(config_file=f) == [f"trainer.foo=1: unknown key; remove or rename it [{f}:3]",
                                        f"trainer.seed=x: expected an integer; the default is 42 [{f}:2]"]
    monkeypatch.setenv("RLCTL_PRESETS_DIR", str(tmp_path))
    write(tmp_path, "mine.yaml", "trainer:\n  seed: x\n  foo: 1\n")
    assert errors_of(preset="mine") == [
        f"trainer.foo=1: unknown key; remove or rename it [preset mine ({tmp_path / 'mine.yaml'}:3)]",
        f"trainer.seed=x: expected an integer; the default is 42 [preset mine ({tmp_path / 'mine.yaml'}:2)]"]


def test_quoted_number_in_yaml_says_remove_the_quotes(tmp_path):
    f = write(tmp_path, "q.yaml", 'trainer:\n  train_batch_size: "5"\n')
    errs = errors_of(preset="gsm8k", config_file=f)
    assert errs == [f'trainer.train_batch_size=5: expected an integer, got the string "5" (quoted in YAML?); remove '
                    f'the quotes; preset gsm8k sets 64 [{f}:2]']  # the value the bad one replaced
    f = write(tmp_path, "b.yaml", 'trainer:\n  placement:\n    colocate_all: "false"\n')
    assert errs_of_file(f) == [f'trainer.placement.colocate_all=false: expected true or false, got the string "false" '
                               f'(quoted in YAML?); remove the quotes; the default is true [{f}:3]']  # the preset keeps the default
    # a word is not a quoted number: no such hint
    assert one_error("trainer.seed=x") == "trainer.seed=x: expected an integer; the default is 42"


def errs_of_file(f):
    return errors_of(preset="gsm8k", config_file=f)
    err = one_error("generator.tensor_parallel_size=2", "generator.inference_engine_tensor_parallel_size=1")
    assert err.startswith("generator.tensor_parallel_size=2: conflicts with generator.inference_engine_tensor_parallel_size=1")


def test_vllm_name_in_a_later_layer_wins_over_the_presets_sglang_name(tmp_path):
    """gsm8k-cpu sets max_new_tokens=128; a file or override with the vLLM name is a later layer: it wins."""
    f = write(tmp_path, "vl.yaml", "generator:\n  sampling_params:\n    max_generate_length: 64\n")
    for kw in ({"config_file": f}, {"overrides": ["generator.sampling_params.max_generate_length=64"]}):
        loaded = load_config(preset="gsm8k-cpu", **kw)
        assert loaded.cfg.generator.sampling_params.max_new_tokens == 64, kw
    # the canonical name in a later layer wins over the vLLM name in the file, with a note
    loaded = load_config(config_file=f, overrides=["generator.sampling_params.max_new_tokens=32"])
    assert loaded.cfg.generator.sampling_params.max_new_tokens == 32
    assert ("generator.sampling_params.max_generate_length is ignored: generator.sampling_params.max_new_tokens=32 "
            "is set in a later layer (override 'generator.sampling_params.max_new_tokens=32')") in loaded.notes


def test_max_generate_length_translation_and_conflict():
    loaded = load_config(overrides=["generator.sampling_params.max_generate_length=256"])
    assert loaded.cfg.generator.sampling_params.max_new_tokens == 256
    assert loaded.cfg.generator.eval_sampling_params.max_new_tokens == 256
    assert ("generator.sampling_params.max_generate_length is the vLLM name; using "
            "generator.sampling_params.max_new_tokens=256") in loaded.notes
    err = one_error("generator.sampling_params.max_generate_length=256", "generator.sampling_params.max_new_tokens=128")
    assert "conflicts with generator.sampling_params.max_new_tokens=128" in err


def test_eval_max_new_tokens_follows_train_unless_set():
    g = load_config(overrides=["generator.sampling_params.max_new_tokens=300"]).cfg.generator
    assert g.eval_sampling_params.max_new_tokens == 300
    g = load_config(overrides=["generator.sampling_params.max_new_tokens=300",
                               "generator.eval_sampling_params.max_new_tokens=50"]).cfg.generator
    assert g.eval_sampling_params.max_new_tokens == 50


@pytest.mark.parametrize("override,fragment", [
    ("generator.sampling_params.min_tokens=1", "generator.sampling_params.min_tokens=1: SGLang does not support min_tokens"),
    ("generator.sampling_params.include_stop_str_in_output=true",
     "generator.sampling_params.include_stop_str_in_output=true: SGLang does not support include_stop_str_in_output"),
    ("generator.sampling_params.stop=['</s>']", "use generator.sampling_params.stop_token_ids=[...]"),
    ("generator.sampling_params.top_p=0", "generator.sampling_params.top_p=0: must be > 0"),
    ("generator.sampling_params.top_p=1.5", "generator.sampling_params.top_p=1.5: must be <= 1"),
    ("generator.sampling_params.top_k=0", "generator.sampling_params.top_k=0: must be -1 (no top-k cut) or >= 1"),
    ("generator.sampling_params.top_k=-2", "must be -1 (no top-k cut) or >= 1"),
    ("generator.sampling_params.temperature=-0.1", "generator.sampling_params.temperature=-0.1: must be >= 0"),
    ("generator.eval_sampling_params.top_p=2", "generator.eval_sampling_params.top_p=2: must be <= 1"),
    ("generator.sampling_params.max_new_tokens=0", "generator.sampling_params.max_new_tokens=0: must be >= 1"),
    ("generator.sampling_params.max_new_tokens=null", "generator.sampling_params.max_new_tokens=null: expected an integer"),
    ("generator.gpu_memory_utilization=1.0", "generator.gpu_memory_utilization=1.0: must be < 1"),
    ("generator.gpu_memory_utilization=0", "must be > 0"),
    ("generator.weight_sync_bucket_mb=0", "generator.weight_sync_bucket_mb=0: must be > 0"),
    ("generator.model_dtype=fp8", "generator.model_dtype=fp8: must be one of 'bfloat16', 'float16' or 'float32'"),
    ("generator.n_samples_per_prompt=1", "GRPO compares samples of the same prompt, it needs at least 2"),
    ("trainer.algorithm.advantage_estimator=gae",
     "trainer.algorithm.advantage_estimator=gae: must be one of 'grpo', 'rloo' or 'reinforce++'"),
    ("trainer.algorithm.policy_loss_type=gpo", "trainer.algorithm.policy_loss_type=gpo: must be one of 'regular', 'dual_clip' or 'gspo'"),
    ("trainer.algorithm.loss_reduction=sum", "must be one of 'token_mean', 'sequence_mean' or 'seq_mean_token_sum_norm'"),
    ("trainer.algorithm.kl_estimator_type=k4", "must be one of 'k1', 'k2', 'k3' or 'abs'"),
    ("trainer.algorithm.clip_ratio_c=1", "trainer.algorithm.clip_ratio_c=1: must be > 1"),
    ("environment.env_class=math", "environment.env_class=math: must be one of 'gsm8k'"),
    ("environment.reward.method=exact", "must be one of 'strict' or 'flexible'"),
    ("environment.reward.custom_reward_fn=nocolon", 'must be "module:function" or "path/to/file.py:function"'),
    ("environment.reward.custom_reward_fn=a-b:f", "module part must be a dotted Python name"),
    ("trainer.resume_mode=from_path", "trainer.resume_mode=from_path: needs trainer.resume_path=<checkpoint folder>"),
    ("trainer.resume_mode=sometimes", "must be one of 'none', 'latest' or 'from_path'"),
    ("trainer.eval_interval=0", "trainer.eval_interval=0: must be a positive number of steps or -1 (disabled)"),
    ("trainer.max_ckpts_to_keep=0", "must be -1 (keep all) or a positive count"),
    ("trainer.logger=mlflow", "trainer.logger=mlflow: must be one of wandb, tensorboard, console"),
    ("trainer.logger=[tensorboard,tensorboard]", "without repeats"),
    ("trainer.run_name=a/b", "trainer.run_name=a/b: must be a folder name: letters, digits and _ . + = @ , - only "
                             "(no '/'); the default is <preset>-seed<seed>, here custom-seed42"),
    ("trainer.project_name=..", "must be a folder name"),
    ("trainer.device=tpu", "must be one of 'auto', 'cpu' or 'cuda'"),
    ("trainer.device=cpu", "trainer.device=cpu: SGLang needs CUDA GPUs; use --backend hf (generator.backend=hf)"),
    ("trainer.policy.optimizer_config.lr=0", "trainer.policy.optimizer_config.lr=0: must be > 0"),
    ("trainer.policy.optimizer_config.adam_betas=[0.9]", "must be two numbers [beta1, beta2]"),
    ("trainer.policy.fsdp_config.fsdp_size=3", "trainer.policy.fsdp_config.fsdp_size=3: must be -1 (all 4 policy workers) or a divisor of 4"),
    ("trainer.policy.fsdp_config.fsdp_size=0", "must be -1 (all 4 policy workers) or a divisor of 4"),
    ("generator.sglang.enable_memory_saver=false", "colocated engines must release their GPU memory"),
    ("generator.sglang.attention_backend=fa4", "must be one of"),
    ("trainer.seed=1.5", "trainer.seed=1.5: expected an integer; the default is 42"),
    ("trainer.eval_before_train=yes please", "trainer.eval_before_train=\"yes please\": expected true or false"),
    ("trainer.train_batch_size=abc", "trainer.train_batch_size=abc: expected an integer"),
    ("trainer.policy_mini_batch_size=.inf", "expected an integer"),
    ("trainer.policy.optimizer_config.lr=.nan", "expected a finite number"),
    ("trainer=5", "trainer=5: expected a mapping of keys"),
])
def test_rule_errors(override, fragment):
    assert fragment in one_error(override)


def test_advantage_estimators():
    assert one_error("generator.n_samples_per_prompt=1", "trainer.algorithm.advantage_estimator=rloo") == (
        "generator.n_samples_per_prompt=1: RLOO's baseline is the mean reward of the other samples of the same prompt, "
        "it needs at least 2; e.g. generator.n_samples_per_prompt=5 (or trainer.algorithm.advantage_estimator=reinforce++)")
    # REINFORCE++ whitens over the batch: one sample per prompt is fine
    cfg = load_config(overrides=["generator.n_samples_per_prompt=1", "trainer.policy_mini_batch_size=4",
                                 "trainer.algorithm.advantage_estimator=reinforce++"]).cfg
    assert cfg.trainer.algorithm.advantage_estimator == "reinforce++"
    assert load_config(overrides=["trainer.algorithm.advantage_estimator=rloo",
                                  "trainer.algorithm.grpo_norm_by_std=false"]).notes == [
        "trainer.algorithm.grpo_norm_by_std=false has no effect: only used with trainer.algorithm.advantage_estimator=grpo"]


def test_off_policy_correction_and_skyrl_older_names():
    A = "trainer.algorithm."
    O = A + "off_policy_correction."
    loaded = load_config(overrides=[A + "use_tis=true", A + "tis_imp_ratio_cap=3.0"])
    opc = loaded.cfg.trainer.algorithm.off_policy_correction
    assert (opc.tis_ratio_type, opc.token_tis_ratio_clip_high, opc.sequence_tis_ratio_clip_high) == ("token", 3.0, 5.0)
    assert loaded.notes == [f"{A}use_tis=true: SkyRL's older name; using {O}tis_ratio_type=token",
                            f"{A}tis_imp_ratio_cap: SkyRL's older name; using {O}token_tis_ratio_clip_high=3.0"]
    # the old "off" values are neutral
    loaded = load_config(overrides=[A + "use_tis=false", A + "tis_imp_ratio_cap=-1"])
    assert loaded.cfg.trainer.algorithm.off_policy_correction.tis_ratio_type is None
    assert loaded.notes == [f"{A}use_tis=false has no effect: neutral value", f"{A}tis_imp_ratio_cap=-1 has no effect: neutral value"]
    assert one_error(A + "tis_imp_ratio_cap=0") == (
        f"{A}tis_imp_ratio_cap=0: expected a positive cap or -1 (unset); or set {O}token_tis_ratio_clip_high")
    assert one_error(A + "use_tis=1") == f"{A}use_tis=1: expected true or false"
    assert one_error(A + "use_tis=true", O + "tis_ratio_type=sequence") == (
        f"{A}use_tis=true: conflicts with {O}tis_ratio_type=sequence; give only {O}tis_ratio_type")
    assert one_error(O + "tis_ratio_type=tok") == f"{O}tis_ratio_type=tok: must be one of 'token' or 'sequence'; the default is null"
    assert one_error(O + "sequence_tis_ratio_clip_high=0") == f"{O}sequence_tis_ratio_clip_high=0: must be > 0.0; the default is 5.0"
    assert note_list(O + "sequence_tis_ratio_clip_high=4", O + "tis_ratio_type=token") == [
        f"{O}sequence_tis_ratio_clip_high=4.0 has no effect: only used with {O}tis_ratio_type=sequence"]
    # truncated sampling makes the sampled distribution differ from the policy's: a warning while TIS is on
    w = load_config(overrides=[O + "tis_ratio_type=token", "generator.sampling_params.top_p=0.9",
                               "generator.sampling_params.top_k=50", "generator.sampling_params.min_p=0.1"]).warnings
    assert [x.split(":")[0] for x in w] == [f"generator.sampling_params.{k}" for k in ("top_p", "top_k", "min_p")]
    assert w[0] == ("generator.sampling_params.top_p: 0.9 truncates the distribution the engine samples from, so it is "
                    f"not the policy's: {O}tis_ratio_type=token corrects only the engine/trainer log-prob mismatch, not "
                    "the truncation; use the neutral value for unbiased TIS")
    assert load_config(overrides=["generator.sampling_params.top_p=0.9"]).warnings == []


def test_overlong_buffer():
    B = "trainer.algorithm.overlong_buffer."
    cfg = load_config(overrides=[B + "len=256", B + "penalty_factor=0.5"]).cfg
    assert (cfg.trainer.algorithm.overlong_buffer.len, cfg.trainer.algorithm.overlong_buffer.penalty_factor) == (256, 0.5)
    assert one_error(B + "len=2000") == (f"{B}len=2000: must be at most generator.sampling_params.max_new_tokens=1024 "
                                         "(the penalty ramps over the last len tokens before that limit)")
    assert one_error(B + "len=0") == f"{B}len=0: must be >= 1; the default is null"
    assert one_error(B + "penalty_factor=-1") == f"{B}penalty_factor=-1: must be >= 0.0; the default is 1.0"
    assert note_list(B + "penalty_factor=2") == [f"{B}penalty_factor=2.0 has no effect: {B}len is null (off)"]


def test_dynamic_sampling():
    D = "trainer.algorithm.dynamic_sampling."
    ds = load_config(overrides=[D + "type=filter", D + "max_sample_batches=5"]).cfg.trainer.algorithm.dynamic_sampling
    assert (ds.type, ds.max_sample_batches, ds.min_replace_ratio) == ("filter", 5, 0.3)
    # one sample per prompt is fine for reinforce++, but never informative for dynamic sampling
    assert one_error(D + "type=filter", "generator.n_samples_per_prompt=1", "trainer.policy_mini_batch_size=4",
                     "trainer.algorithm.advantage_estimator=reinforce++") == (
        f"{D}type=filter: needs generator.n_samples_per_prompt >= 2 (got 1): a group of one sample never has reward "
        f"variance, so no group would ever be informative; raise generator.n_samples_per_prompt or set {D}type=null")
    assert one_error(D + "type=drop") == f"{D}type=drop: must be one of 'filter' or 'replace'; the default is null"
    assert one_error(D + "max_sample_batches=0") == f"{D}max_sample_batches=0: must be >= 1; the default is 30"
    assert one_error(D + "min_replace_ratio=1.5") == f"{D}min_replace_ratio=1.5: must be <= 1.0; the default is 0.3"
    assert note_list(D + "type=replace", D + "max_sample_batches=3") == [
        f"{D}max_sample_batches=3 has no effect: only used with {D}type=filter"]
    assert note_list(D + "min_replace_ratio=0.5") == [f"{D}min_replace_ratio=0.5 has no effect: only used with {D}type=replace"]


def test_lr_scheduler():
    O = "trainer.policy.optimizer_config."
    oc = load_config().cfg.trainer.policy.optimizer_config
    assert (oc.scheduler, oc.num_warmup_steps) == ("constant_with_warmup", 0)
    oc = load_config(overrides=[O + "scheduler=cosine_with_warmup", O + "num_warmup_steps=10",
                                "trainer.max_steps=100"]).cfg.trainer.policy.optimizer_config
    assert (oc.scheduler, oc.num_warmup_steps) == ("cosine_with_warmup", 10)
    assert one_error(O + "scheduler=cosine") == (
        f"{O}scheduler=cosine: decays the learning rate to 0 over the run, so it needs trainer.max_steps (the horizon); "
        "set trainer.max_steps or use constant_with_warmup")
    assert one_error(O + "scheduler=step").startswith(f"{O}scheduler=step: must be one of 'constant_with_warmup', 'constant'")
    assert one_error(O + "num_warmup_steps=-1") == f"{O}num_warmup_steps=-1: must be >= 0; the default is 0"
    # 1024 / 256 = 4 optimizer steps per training step
    w = load_config(overrides=[O + "num_warmup_steps=8", "trainer.max_steps=2"]).warnings
    assert w == [f"{O}num_warmup_steps: 8 optimizer steps of warmup >= the run's 8 optimizer steps (trainer.max_steps=2 x 4 "
                 f"per step): the learning rate never reaches {O}lr"]
    assert note_list(O + "scheduler=constant", O + "num_warmup_steps=5") == [
        f"{O}num_warmup_steps=5 has no effect: {O}scheduler=constant has no warmup (use constant_with_warmup)"]


def test_sampled_eval():
    g = load_config(overrides=["generator.eval_n_samples_per_prompt=4", "generator.eval_sampling_params.temperature=0.6"]).cfg.generator
    assert (g.eval_n_samples_per_prompt, g.eval_sampling_params.temperature) == (4, 0.6)
    assert load_config().cfg.generator.eval_n_samples_per_prompt == 1
    assert one_error("generator.eval_n_samples_per_prompt=0") == "generator.eval_n_samples_per_prompt=0: must be >= 1; the default is 1"
    assert load_config(overrides=["generator.eval_n_samples_per_prompt=4"]).warnings == [
        "generator.eval_n_samples_per_prompt: 4 greedy samples (generator.eval_sampling_params.temperature=0) are identical, "
        "so pass@k equals pass@1; set generator.eval_sampling_params.temperature, e.g. 0.6 or 1.0"]


def test_stop_string_error_for_hf_too():
    assert "use generator.sampling_params.stop_token_ids" in one_error("generator.sampling_params.stop=x", "trainer.device=cpu", backend="hf")


def test_batch_size_rules_name_sequence_counts():
    err = one_error("trainer.train_batch_size=100", "trainer.policy_mini_batch_size=40", "trainer.micro_train_batch_size_per_gpu=1")
    # suggestions: multiples of 40 around 100, and divisors d of 100 whose d x 5 sequences split over
    # micro 1 x 4 workers (d a multiple of 4): 4, 20, 100 -- each suggestion passes every batch rule
    assert err.startswith("trainer.policy_mini_batch_size=40: trainer.train_batch_size=100 prompts must be a multiple of "
                          "trainer.policy_mini_batch_size=40 prompts; set trainer.train_batch_size to a multiple of 40 "
                          "(e.g. 80 or 120), or trainer.policy_mini_batch_size to a divisor of 100 that also fits the "
                          "micro-batches (e.g. 4, 20, 100)")
    for fix in (["trainer.train_batch_size=80"], ["trainer.train_batch_size=120"], ["trainer.policy_mini_batch_size=4"],
                ["trainer.policy_mini_batch_size=20"]):
        load_config(overrides=["trainer.train_batch_size=100", "trainer.policy_mini_batch_size=40",
                               "trainer.micro_train_batch_size_per_gpu=1", *fix])
    err = one_error("trainer.train_batch_size=64", "trainer.policy_mini_batch_size=16", "generator.n_samples_per_prompt=5",
                    "trainer.micro_train_batch_size_per_gpu=3")
    assert "= 80 sequences must split evenly into trainer.micro_train_batch_size_per_gpu=3 x 4 policy workers = 12 sequences" in err
    # 80 = 4 workers x m x k for m in {1, 2, 4, 5, 10, 20}; the three closest to 3 (ties: smaller first)
    assert err.endswith("(e.g. trainer.micro_train_batch_size_per_gpu=1 or 2 or 4)")
    # valid: 16 prompts x 5 = 80 sequences = 4 workers x micro 4 x 5 accumulation steps
    load_config(overrides=["trainer.train_batch_size=64", "trainer.policy_mini_batch_size=16", "trainer.micro_train_batch_size_per_gpu=4"])


def test_colocated_layout_error_names_all_three_keys():
    err = one_error("generator.num_inference_engines=2")
    for key in ("generator.num_inference_engines", "generator.inference_engine_tensor_parallel_size",
                "trainer.placement.policy_num_nodes", "policy_num_gpus_per_node"):
        assert key in err
    assert "(2) x generator.inference_engine_tensor_parallel_size (1) = 2" in err and "(1 x 4 = 4)" in err
    # valid layouts (2 SGLang engines of TP 2 on the 4 GPUs; a split engine of TP 1)
    load_config(overrides=["generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2"])
    load_config(overrides=["generator.num_inference_engines=1", "trainer.placement.colocate_all=false"], backend="hf")


def test_tensor_parallel_engines():
    # SGLang: 2 engines x TP 2 colocated on 4 GPUs is valid, with a note that it has not run on GPUs yet
    loaded = load_config(overrides=["generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2"])
    assert loaded.cfg.generator.inference_engine_tensor_parallel_size == 2
    assert ("generator.inference_engine_tensor_parallel_size: 2: tensor-parallel SGLang engines are coded and tested on "
            "CPU with fakes but have not run on GPUs yet") in loaded.notes
    # ... and split placement: 1 engine of TP 4 beside the 4 policy GPUs
    load_config(overrides=["trainer.placement.colocate_all=false", "generator.num_inference_engines=1",
                           "generator.inference_engine_tensor_parallel_size=4"])
    # the engines must cover the trainer's GPUs exactly (1 x 2 != 4)
    err = one_error("generator.num_inference_engines=1", "generator.inference_engine_tensor_parallel_size=2")
    assert "generator.num_inference_engines (1) x generator.inference_engine_tensor_parallel_size (2) = 2" in err
    # an engine never spans nodes: 2 nodes x 3 GPUs, 3 engines x TP 2 covers the 6 GPUs, but not node by node
    err = one_error("trainer.placement.policy_num_nodes=2", "trainer.placement.policy_num_gpus_per_node=3",
                    "generator.num_inference_engines=3", "generator.inference_engine_tensor_parallel_size=2",
                    "trainer.train_batch_size=12", "trainer.policy_mini_batch_size=6", "trainer.eval_batch_size=12")
    assert err.startswith("generator.inference_engine_tensor_parallel_size=2: must divide "
                          "trainer.placement.policy_num_gpus_per_node (3)")
    # hf: refused with the way out
    err = one_error("generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2",
                    "trainer.device=cpu", backend="hf")
    assert err.startswith("generator.inference_engine_tensor_parallel_size=2: the hf generator has no tensor "
                          "parallelism (each engine is one process on one device); use 1, or generator.backend=sglang")


def test_all_errors_in_one_message():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["generator.async_engine=true", "trainer.seed=x", "trainer.nope=1",
                               "generator.sampling_params.min_tokens=3", "generator.sampling_params.top_p=7"])
    errs = exc.value.errors
    assert len(errs) == 5
    assert str(exc.value) == "\n".join(errs)
    for key in ("generator.async_engine", "trainer.seed", "trainer.nope", "min_tokens", "top_p"):
        assert sum(line.startswith(key) or key in line.split("=")[0] for line in errs) == 1, key


# ---------------------------------------------------------------------------------------------- notes


def note_list(*overrides: str, **kw) -> list[str]:
    return load_config(overrides=list(overrides), **kw).notes


def test_no_effect_notes_only_for_explicit_keys():
    assert note_list("trainer.algorithm.use_kl_loss=false") == []
    notes = note_list("trainer.algorithm.use_kl_loss=false", "trainer.algorithm.kl_loss_coef=0.1",
                      "trainer.ref.fsdp_config.cpu_offload=false")
    assert "trainer.algorithm.kl_loss_coef=0.1 has no effect: trainer.algorithm.use_kl_loss=false" in notes
    assert any(n.startswith("trainer.ref.fsdp_config.cpu_offload=false has no effect") for n in notes)
    assert len(notes) == len(set(n.split("=")[0] for n in notes)), "one note per key"
    assert note_list("trainer.algorithm.clip_ratio_c=2") == [
        "trainer.algorithm.clip_ratio_c=2.0 has no effect: only used with trainer.algorithm.policy_loss_type=dual_clip"]
    assert note_list("trainer.algorithm.clip_ratio_c=2", "trainer.algorithm.policy_loss_type=dual_clip") == []
    assert note_list("trainer.resume_path=/x")[0].startswith("trainer.resume_path=/x has no effect")
    assert note_list("generator.batched=false")[0].startswith("generator.batched=false has no effect")
    assert note_list("trainer.placement.colocate_policy_ref=false")[0].startswith("trainer.placement.colocate_policy_ref=false has no effect")
    assert note_list("trainer.placement.ref_num_gpus_per_node=2")[0].startswith("trainer.placement.ref_num_gpus_per_node=2 has no effect")
    assert note_list("trainer.algorithm.entropy_loss_coef=0.1")[0].startswith("trainer.algorithm.entropy_loss_coef=0.1 has no effect")
    assert note_list("generator.max_input_length=512") == []
    assert note_list("generator.max_input_length=1000")[0].startswith("generator.max_input_length=1000 has no effect")


def test_backend_specific_blocks_notes():
    notes = note_list("generator.sglang.disable_cuda_graph=true", "trainer.device=cpu", backend="hf")
    assert "generator.sglang.disable_cuda_graph=true has no effect: only used with generator.backend=sglang" in notes
    notes = note_list("generator.hf.max_batch_size=8")
    assert "generator.hf.max_batch_size=8 has no effect: only used with generator.backend=hf" in notes


def test_weight_sync_note_when_colocated():
    notes = note_list("generator.weight_sync_backend=nccl")
    assert any("CUDA IPC" in n and n.startswith("generator.weight_sync_backend") for n in notes)
    hf_notes = load_config(overrides=["generator.weight_sync_backend=gloo", "trainer.device=cpu",
                                      "generator.weight_sync_timeout_s=10"], backend="hf").notes
    assert ("generator.weight_sync_timeout_s=10.0 has no effect: colocated hf generators get the weights through "
            "Ray's object store") in hf_notes


def test_presets_with_default_values_are_not_explicit():
    # ppo_base_config writes every default out: no notes at all
    loaded = load_config(preset="ppo_base_config")
    assert loaded.notes == []
    assert "trainer.seed" not in loaded.explicit


def test_greedy_training_warning():
    w = load_config(overrides=["generator.sampling_params.temperature=0"]).warnings
    assert any(x.startswith("generator.sampling_params.temperature: 0 is greedy") for x in w)


def test_wandb_missing_is_warning_then_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    assert any("wandb is not installed" in w for w in load_config(overrides=["trainer.logger=wandb"]).warnings)
    assert "wandb is not installed" in one_error("trainer.logger=wandb", for_training=True)


def test_custom_reward_file_checked(tmp_path):
    over = [f"environment.reward.custom_reward_fn={tmp_path}/r.py:score"]
    assert "does not exist" in load_config(overrides=over).warnings[0]
    assert "does not exist" in one_error(*over, for_training=True)
    (tmp_path / "r.py").write_text("def score(**kw): return 1.0\n")
    load_config(overrides=over, for_training=True)


# ------------------------------------------------------------------------------------------- redaction


def test_secret_key_detection():
    for k in ("hf_token", "wandb_api_key", "password", "secret", "api_key", "client_secret", "accessToken", "HF_TOKEN",
              "db-password-file", "authorization", "bearer_token", "db_pwd", "key", "apiKey", "apikey",
              "aws_access_key", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "ssh_private_key", "privateKey",
              "signing_key", "encryption_key", "secret_key", "wandb_key", "openai_key", "hf_key", "anthropic_key",
              "foo_key"):
        assert C.is_secret_key(k), k
    for k in ("max_new_tokens", "stop_token_ids", "tokenizer", "keyboard", "monkey", "num_keys", "key_path_len",
              "answer_key", "sort_key", "prompt_key", "reward_key", "input_key", "dedup_key", "primaryKey"):
        assert not C.is_secret_key(k), k


def test_unknown_key_ending_in_key_shows_its_value_unless_it_is_a_secret():
    """A column-name key such as answer_key / sort_key is echoed with its value; *_api_key, wandb_key and keys
    whose first word is unknown stay redacted."""
    errs = errors_of(overrides=["environment.reward.answer_key=x", "trainer.wandb_key=sk-secret123", "trainer.sort_key=len",
                                "trainer.aws_access_key=AKIA123", "trainer.key=k1"])
    text = "\n".join(errs)
    assert "environment.reward.answer_key=x: unknown key" in text and "trainer.sort_key=len: unknown key" in text
    assert f"trainer.wandb_key={C.REDACTED}: unknown key" in text and "sk-secret123" not in text
    assert f"trainer.aws_access_key={C.REDACTED}: unknown key" in text and f"trainer.key={C.REDACTED}: unknown key" in text
    assert "AKIA123" not in text and "k1" not in text


def test_redact_keys_env_values_and_urls(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wk-123456789")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    d = {"wandb_api_key": "x", "nested": {"hf_token": "y", "password": None, "max_new_tokens": 5, "stop_token_ids": [2]},
         "note": "key is wk-123456789 and hf_abcdefgh", "lst": ["hf_abcdefgh"],
         "addr": "https://user:pa55@host:8265"}
    r = redact(d)
    assert r["wandb_api_key"] == C.REDACTED and r["nested"]["hf_token"] == C.REDACTED
    assert r["nested"]["max_new_tokens"] == 5 and r["nested"]["stop_token_ids"] == [2]
    assert r["note"] == f"key is {C.REDACTED} and {C.REDACTED}" and r["lst"] == [C.REDACTED]
    assert r["addr"] == f"https://user:{C.REDACTED}@host:8265"
    # a password holding '@', an empty user name, several URLs in one text; no credentials: unchanged
    assert redact("https://u:PA@SS5@host/x") == f"https://u:{C.REDACTED}@host/x"
    assert redact("redis://:PASS8@head:6379") == f"redis://:{C.REDACTED}@head:6379"
    assert redact("ray://u:pw@h:1 and https://a:b@c/d") == f"ray://u:{C.REDACTED}@h:1 and https://a:{C.REDACTED}@c/d"
    assert redact("http://host:8265/x") == "http://host:8265/x"
    assert d["wandb_api_key"] == "x"  # copy, not in place


def test_env_secret_never_in_config_output_or_errors(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekret-wandb-value")
    loaded = load_config(overrides=["trainer.project_name=sekret-wandb-value"])
    assert "sekret-wandb-value" not in json.dumps(redact(to_dict(loaded.cfg)))
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["trainer.bogus=sekret-wandb-value"])
    assert "sekret-wandb-value" not in str(exc.value) and C.REDACTED in str(exc.value)


def test_unknown_secret_keys_are_redacted_in_errors(tmp_path):
    errs = errors_of(overrides=["generator.hf_token=supersecret", "trainer.wandb_api_key=xyz1"])
    assert errs == [f"generator.hf_token={C.REDACTED}: unknown key; remove or rename it",
                    f"trainer.wandb_api_key={C.REDACTED}: unknown key; remove or rename it"]
    f = write(tmp_path, "s.yaml", "hf_token: abc123\ngenerator:\n  api_key: def456\n")
    text = " ".join(errors_of(config_file=f))
    assert "abc123" not in text and "def456" not in text and text.count(C.REDACTED) == 2


def test_secrets_inside_mappings_and_bad_overrides_are_redacted(tmp_path):
    f = write(tmp_path, "leak.yaml", "wandb: {project: demo, api_key: SEKRET1}\nsecrets: {github: SEKRET2}\n")
    text = " ".join(errors_of(config_file=f))
    assert "SEKRET" not in text
    assert f'wandb={{"project": "demo", "api_key": "{C.REDACTED}"}}: unknown key' in text
    assert f"secrets.github={C.REDACTED}: unknown key secrets" in text
    errs = errors_of(overrides=["foo.api_key=[unclosed", "trainer.seed={a: 1, a: 2}"])
    assert errs[0].startswith(f"foo.api_key: override value '{C.REDACTED}' is not valid YAML")
    assert errs[1] == "trainer.seed: override value '{a: 1, a: 2}' has a duplicate key 'a'"


def test_bare_equals_key_is_a_string():
    assert C.safe_load("a: {=: 1}") == {"a": {"=": 1}}


def test_type_error_names_the_value_the_bad_one_replaced():
    # three overrides of one key: the layer under the last one is the middle override, not the preset
    errs = errors_of(preset="gsm8k", overrides=["trainer.train_batch_size=abc", "trainer.train_batch_size=16",
                                                 "trainer.train_batch_size=abc"])
    assert errs == ["trainer.train_batch_size=abc: expected an integer; override 'trainer.train_batch_size=16' sets 16"]
    # "1.5" is a number but not an integer: no "remove the quotes" hint
    assert one_error("trainer.train_batch_size='1.5'") == "trainer.train_batch_size=1.5: expected an integer; the default is 1024"


def test_override_labels_redact_secret_values():
    loaded = load_config(overrides=["ray.address=ray://u:pw123@host:10001", "trainer.seed=3"])
    assert loaded.sources == ["override 'ray.address=ray://u:***REDACTED***@host:10001'", "override 'trainer.seed=3'"]
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["hf_token"])  # not key=value
    assert str(exc.value).endswith("override 'hf_token': expected key=value, e.g. trainer.seed=1")


def test_split_placement_with_sglang_validates_and_needs_nccl():
    # 4 policy GPUs + 2 engines on their own GPUs: no equality rule between the two when split
    cfg = load_config(overrides=["trainer.placement.colocate_all=false", "generator.num_inference_engines=2"]).cfg
    assert (cfg.trainer.placement.colocate_all, cfg.generator.weight_sync_backend) == (False, "nccl")
    assert cfg.generator.weight_sync_timeout_s == 300.0
    err = one_error("trainer.placement.colocate_all=false", "generator.weight_sync_backend=gloo")
    assert err == ("generator.weight_sync_backend=gloo: SGLang engines receive split-placement weights over NCCL "
                   "(GPU to GPU); set generator.weight_sync_backend=nccl")
    err = one_error("trainer.placement.colocate_all=false", "trainer.device=cpu", "generator.num_inference_engines=1",
                    backend="hf")
    assert err.startswith("generator.weight_sync_backend=nccl: NCCL needs CUDA GPUs; with trainer.device=cpu")
    assert err.endswith("set generator.weight_sync_backend=gloo")
    ok = load_config(overrides=["trainer.placement.colocate_all=false", "trainer.device=cpu",
                                "generator.weight_sync_backend=gloo", "generator.weight_sync_timeout_s=30"], backend="hf")
    assert ok.notes == [] and ok.cfg.generator.weight_sync_timeout_s == 30.0


def test_typo_in_a_section_echoes_the_typed_path_and_suggests_the_whole_key():
    assert one_error("trainer.polcy.model.path=x") == (
        "trainer.polcy.model.path=x: unknown key trainer.polcy; did you mean trainer.policy.model.path?; "
        "remove or rename it")
    # the corrected section has no such leaf: suggest the section only
    assert one_error("trainer.polcy.modl.path=x") == (
        "trainer.polcy.modl.path=x: unknown key trainer.polcy; did you mean trainer.policy?; remove or rename it")


def test_names_from_other_trainers_get_a_suggestion():
    hint = "unknown key; did you mean trainer.policy.optimizer_config.lr?; remove or rename it"
    assert one_error("trainer.learning_rate=1e-6").endswith(hint)
    assert one_error("trainer.policy.optimizer_config.learning_rate=1e-6").endswith(hint)
    assert "did you mean generator.n_samples_per_prompt?" in one_error("generator.num_generations=8")


# ------------------------------------------------------------------ packed / token-budget micro-batches


def test_packing_keys_defaults_alias_and_errors():
    t = load_config().cfg.trainer
    assert (t.remove_microbatch_padding, t.max_tokens_per_microbatch) == (False, None)
    loaded = load_config(overrides=["trainer.use_sample_packing=true"])
    assert loaded.cfg.trainer.remove_microbatch_padding is True
    assert ("trainer.use_sample_packing: alias of trainer.remove_microbatch_padding; using "
            "trainer.remove_microbatch_padding=true") in loaded.notes
    assert one_error("trainer.use_sample_packing=true", "trainer.remove_microbatch_padding=false") == (
        "trainer.use_sample_packing=true: conflicts with trainer.remove_microbatch_padding=false; "
        "trainer.use_sample_packing is an alias, give only trainer.remove_microbatch_padding")
    assert one_error("trainer.use_sample_packing=3").startswith("trainer.use_sample_packing=3: expected true or false")
    assert one_error("trainer.max_tokens_per_microbatch=0").startswith("trainer.max_tokens_per_microbatch=0: must be >= 1")
    assert load_config(overrides=["trainer.max_tokens_per_microbatch=null"]).cfg.trainer.max_tokens_per_microbatch is None


def test_token_budget_replaces_the_micro_batch_sequence_counts():
    loaded = load_config(overrides=["trainer.max_tokens_per_microbatch=1000", "trainer.micro_train_batch_size_per_gpu=4"])
    assert loaded.cfg.trainer.max_tokens_per_microbatch == 1000
    assert ("trainer.micro_train_batch_size_per_gpu=4 has no effect: micro-batches are filled up to "
            "trainer.max_tokens_per_microbatch=1000 tokens") in loaded.notes
    # defaults: max_prompt_length 512 + max_new_tokens 1024 = 1536 > 1000
    assert loaded.warnings == ["trainer.max_tokens_per_microbatch: 1000 tokens is less than trainer.max_prompt_length + "
                               "generator.sampling_params.max_new_tokens = 1536: a longer sequence runs alone in its "
                               "micro-batch (more, smaller forward passes)"]
    assert load_config(overrides=["trainer.max_tokens_per_microbatch=1536"]).warnings == []
    # 1 prompt x 5 samples cannot be split over 4 workers; the micro-batch size is no longer part of the rule
    err = one_error("trainer.max_tokens_per_microbatch=4096", "trainer.policy_mini_batch_size=1")
    assert err.startswith("trainer.policy_mini_batch_size=1: a mini-batch of trainer.policy_mini_batch_size=1 prompts x "
                          "generator.n_samples_per_prompt=5 = 5 sequences must split evenly over the 4 policy workers")
    # micro_train_batch_size_per_gpu=3 does not divide 1280 / 4 sequences, but is unused with a token budget
    assert load_config(overrides=["trainer.max_tokens_per_microbatch=4096", "trainer.micro_train_batch_size_per_gpu=3"])


def test_bad_run_name_states_the_real_default_not_null():
    """The schema's run_name default is null, filled at load time with <preset>-seed<seed>: the message says so."""
    err = one_error("trainer.run_name=a/b", "trainer.seed=7", preset="gsm8k-cpu")
    assert err.endswith("(no '/'); the default is <preset>-seed<seed>, here gsm8k-cpu-seed7"), err
    assert "null" not in err


def test_tensor_parallel_size_must_divide_the_models_attention_heads(tmp_path):
    """SmolLM2-135M has 9 query / 3 key-value heads: TP 2 cannot split them (SGLang would fail at engine start)."""
    model = tmp_path / "smol"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 9, "num_key_value_heads": 3}))
    err = one_error("generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2",
                    f"trainer.policy.model.path={model}")
    assert err.startswith("generator.inference_engine_tensor_parallel_size=2: the model's attention heads (9 query, "
                          f"3 key/value in {model / 'config.json'}) do not split over 2 ranks"), err
    # 12 query / 2 key-value heads (Qwen2.5-1.5B) at TP 4: the key/value heads are replicated, 2 ranks each
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 2}))
    load_config(overrides=["generator.num_inference_engines=1", "generator.inference_engine_tensor_parallel_size=4",
                           f"trainer.policy.model.path={model}"])
    # ... but 3 key/value heads neither divide nor are divided by 2
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 3}))
    assert "do not split over 2 ranks" in one_error("generator.num_inference_engines=2",
                                                    "generator.inference_engine_tensor_parallel_size=2",
                                                    f"trainer.policy.model.path={model}")
    # 14 / 2 heads (Qwen2.5-0.5B) split over 2 ranks
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 14, "num_key_value_heads": 2}))
    load_config(overrides=["generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2",
                           f"trainer.policy.model.path={model}"])
