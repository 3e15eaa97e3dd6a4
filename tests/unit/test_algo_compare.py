"""The algorithm comparison of issue 14 item 8 on CPU: every SETTING of ``scripts/gpu_algo_compare.sh`` validated
with ``rlctl check-config`` (its ``--check``: the exact command line of the device call), and
``benchmarks/algo_compare.py`` on two hand-written ``metrics.jsonl`` files (table numbers, plotted line data).

Test: ``pytest tests/unit/test_algo_compare.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_algo_compare.sh"


def _check(*args: str, best: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ALGO_BEST", "RLCTL_PRESETS_DIR", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    if best is not None:
        env["ALGO_BEST"] = best
    return subprocess.run(["bash", str(SCRIPT), "--check", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _algo(setting: str, best: str | None = None) -> tuple[dict, dict]:
    p = _check(setting, "7", "540", best=best)
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    t = cfg["trainer"]
    # every setting: the comparison's common keys, this seed, run name and wall limit, on preset gsm8k-h200
    assert (t["max_train_time_s"], t["eval_interval"], t["seed"], t["run_name"], t["max_wall_time_s"]) == \
        (600.0, 10, 7, f"cmp-{setting}-seed7", 540.0)
    assert (t["train_batch_size"], cfg["generator"]["n_samples_per_prompt"], t["eval_batch_size"]) == (32, 8, 1319)
    assert cfg["generator"]["backend"] == "sglang"
    return t["algorithm"], cfg


def test_baseline_is_the_preset():
    a, _ = _algo("baseline")
    assert (a["dynamic_sampling"]["type"], a["policy_loss_type"], a["off_policy_correction"]["tis_ratio_type"],
            a["eps_clip_low"], a["loss_reduction"], a["use_kl_loss"]) == (None, "regular", None, 0.2, "token_mean",
                                                                          False)


def test_filter_sets_dynamic_sampling_only():
    a, _ = _algo("filter")
    assert (a["dynamic_sampling"]["type"], a["dynamic_sampling"]["max_sample_batches"]) == ("filter", 30)
    assert (a["policy_loss_type"], a["off_policy_correction"]["tis_ratio_type"]) == ("regular", None)


def test_gspo_sets_what_the_gspo_preset_sets():
    a, _ = _algo("gspo")
    preset = yaml.safe_load((REPO / "presets" / "gsm8k-gspo.yaml").read_text())["trainer"]["algorithm"]
    assert preset == {"policy_loss_type": "gspo", "eps_clip_low": 3.0e-4, "eps_clip_high": 4.0e-4,
                      "loss_reduction": "sequence_mean"}
    assert {k: a[k] for k in preset} == preset
    assert a["dynamic_sampling"]["type"] is None


def test_tis_is_token_level_with_the_default_cap():
    a, _ = _algo("tis")
    assert a["off_policy_correction"] == {"tis_ratio_type": "token", "token_tis_ratio_clip_high": 2.0,
                                          "sequence_tis_ratio_clip_high": 5.0}
    assert a["policy_loss_type"] == "regular"


def test_rollout_lp_sets_use_rollout_logprobs_only():
    a, _ = _algo("rollout-lp")
    assert a["use_rollout_logprobs"] is True
    assert (a["off_policy_correction"]["tis_ratio_type"], a["policy_loss_type"], a["dynamic_sampling"]["type"]) == \
        (None, "regular", None)


def test_rollout_lp_with_tis_is_refused_by_check_config():
    p = _check("best", "1", "540", best="tis rollout-lp")
    assert p.returncode == 2
    assert "trainer.algorithm.use_rollout_logprobs=true: makes the engine's log-probs the old policy" in p.stderr


def test_best_combines_the_named_settings():
    a, _ = _algo("best", best="filter gspo tis")
    assert (a["dynamic_sampling"]["type"], a["policy_loss_type"], a["eps_clip_high"], a["loss_reduction"],
            a["off_policy_correction"]["tis_ratio_type"]) == ("filter", "gspo", 4.0e-4, "sequence_mean", "token")


@pytest.mark.parametrize("args,best,message", [
    (("best", "1", "540"), None, "gpu_algo_compare: BEST is empty: set BEST in scripts/gpu_algo_compare.sh"),
    (("best", "1", "540"), "filter baseline", "gpu_algo_compare: BEST names 'baseline'; use filter gspo tis rollout-lp"),
    (("dapo", "1", "540"), None, "gpu_algo_compare: unknown SETTING 'dapo'; use baseline filter gspo tis rollout-lp best"),
    (("tis", "1"), None, "usage: bash scripts/gpu_algo_compare.sh [--check] SETTING SEED WALL"),
])
def test_bad_arguments_exit_2_naming_the_fix(args, best, message):
    p = _check(*args, best=best)
    assert p.returncode == 2 and message in p.stderr


def test_a_bad_seed_is_caught_by_check_config():
    p = _check("tis", "one", "540")
    assert p.returncode != 0 and "trainer.seed" in p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------- benchmark
@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("algo_compare", REPO / "benchmarks" / "algo_compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["algo_compare"] = mod  # its dataclass looks its module up while being defined
    spec.loader.exec_module(mod)
    return mod


def _write(d: Path, rows: list[dict], config: str | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (d / "config.yaml").write_text(config)
    return d


@pytest.fixture
def two_runs(tmp_path):
    # a: a run with timing/train_time_total_s (named by its config.yaml); minutes 0, 1.0, 1.5
    a = _write(tmp_path / "a", [
        {"step": 0, "eval/accuracy_strict": 0.1, "eval/accuracy_flexible": 0.3, "timing/eval": 20.0},
        {"step": 1, "timing/train_time_total_s": 30.0, "timing/step": 30.0, "policy/skipped_steps": 0.0},
        {"step": 2, "timing/train_time_total_s": 60.0, "timing/step": 100.0, "timing/eval": 40.0,
         "policy/skipped_steps": 1.0, "eval/accuracy_strict": 0.2, "eval/accuracy_flexible": 0.4},
        {"step": 3, "timing/train_time_total_s": 90.0, "timing/step": 130.0, "timing/eval": 40.0,
         "eval/accuracy_strict": 0.15, "eval/accuracy_flexible": 0.45},
    ], config="trainer:\n  seed: 1\n  run_name: cmp-baseline-seed1\n")
    # b: an older run without the total: 50 - 2 (log) = 48 s, then 80 - 20 (eval) - 12 (checkpoint) = 48 s
    b = _write(tmp_path / "cmp-filter-seed1", [
        {"step": 0, "eval/accuracy_strict": 0.0, "eval/accuracy_flexible": 0.2},
        {"step": 1, "timing/step": 50.0, "timing/log": 2.0},
        {"step": 2, "timing/step": 80.0, "timing/eval": 20.0, "timing/checkpoint": 12.0,
         "eval/accuracy_strict": 0.25, "eval/accuracy_flexible": 0.5},
    ])
    return a, b


def test_table_and_plot_of_two_runs(bench, two_runs, tmp_path, capsys):
    assert bench.main([str(p) for p in two_runs] + ["--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "compare.md").read_text()
    assert md.splitlines()[2:] == [
        "| cmp-baseline-seed1 | 3 | 1.50 | 0.200 | 0.150 | 0.450 | 0.450 | 3 | 1 |",
        "| cmp-filter-seed1 | 2 | 1.60 | 0.250 | 0.250 | 0.500 | 0.500 | 2 | 0 |",
    ]
    assert md in capsys.readouterr().out
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000

    fig = bench.build_figure([bench.load_run(p) for p in two_runs])
    strict, flexible = fig.axes[0], fig.axes[1]
    got = {ax.get_title(): [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()]
           for ax in (strict, flexible)}
    assert got == {
        "strict accuracy (#### N)": [("cmp-baseline-seed1", [0.0, 1.0, 1.5], [0.1, 0.2, 0.15]),
                                     ("cmp-filter-seed1", [0.0, 1.6], [0.0, 0.25])],
        "flexible accuracy (last number)": [("cmp-baseline-seed1", [0.0, 1.0, 1.5], [0.3, 0.4, 0.45]),
                                            ("cmp-filter-seed1", [0.0, 1.6], [0.2, 0.5])],
    }
    assert strict.get_xlabel() == "minutes of training (no eval, no checkpoint)"


def test_the_fallback_leaves_out_the_loops_non_training_phases(bench):
    from rlctl.loop import NOT_TRAINING

    assert bench.NOT_TRAINING == NOT_TRAINING


def test_a_run_without_eval_is_an_error(bench, tmp_path):
    d = _write(tmp_path / "r", [{"step": 1, "timing/step": 3.0}])
    with pytest.raises(ValueError, match="r: no row has eval/accuracy_strict: nothing to compare"):
        bench.load_run(d)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        bench.load_run(tmp_path / "missing")
