import builtins
import json
import os
from datetime import datetime, timezone

import pytest

from test_preflight import fake_nvidia_smi

from rlctl.metrics import RunLogger, keep_first_start, run_versions, write_text_atomic


def _logger(tmp_path, loggers=("console",)):
    return RunLogger(tmp_path / "run", "a: 1\n", list(loggers), project="p", run_name="r", redacted_config={"a": 1})


def test_metrics_jsonl_and_truncate_for_resume(tmp_path):
    lg = _logger(tmp_path)
    for s in (1, 2, 3):
        lg.log(s, {"reward/mean": s / 10, "x": float("nan")})
    lg.truncate_after(2)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0] == {"step": 1, "reward/mean": 0.1, "x": "nan"}
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 1\n"
    versions = json.loads((tmp_path / "run" / "versions.json").read_text())
    assert "torch" in versions["packages"] and "git_commit" in versions


def test_versions_json_names_the_gpu_and_utc_start_and_keeps_it_on_resume(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "0, GPU-aaa, 81559, NVIDIA H100 80GB HBM3"')
    first = run_versions(now=datetime(2026, 12, 7, 14, 43, 5, tzinfo=timezone.utc))
    assert first["time_utc"] == "2026-12-07T14:43:05Z" and "resumed_utc" not in first
    assert first["gpus"] == ["NVIDIA H100 80GB HBM3 (81559 MiB)"]
    again = keep_first_start(run_versions(now=datetime(2026, 12, 7, 15, 0, 0, tzinfo=timezone.utc)), first)
    assert again["time_utc"] == "2026-12-07T14:43:05Z" and again["resumed_utc"] == ["2026-12-07T15:00:00Z"]
    third = keep_first_start(run_versions(now=datetime(2026, 12, 7, 16, 0, 0, tzinfo=timezone.utc)), again)
    assert third["resumed_utc"] == ["2026-12-07T15:00:00Z", "2026-12-07T16:00:00Z"]


def test_reused_run_folder_is_a_new_start_unless_the_run_resumed(tmp_path, monkeypatch):
    """A folder reused without a resume (resume_mode=none, no checkpoint yet) gets this command's start; a resume
    (the loop calls mark_resumed after restoring a checkpoint) keeps the first start."""
    fake_nvidia_smi(tmp_path, monkeypatch, "exit 9")
    run = tmp_path / "run"
    run.mkdir()
    (run / "versions.json").write_text(json.dumps({"time_utc": "2026-01-01T00:00:00Z"}))
    lg = _logger(tmp_path)
    fresh = json.loads((run / "versions.json").read_text())
    assert fresh["time_utc"] != "2026-01-01T00:00:00Z" and "resumed_utc" not in fresh
    lg.mark_resumed()
    resumed = json.loads((run / "versions.json").read_text())
    assert resumed["time_utc"] == "2026-01-01T00:00:00Z" and resumed["resumed_utc"] == [fresh["time_utc"]]
    (run / "versions.json").write_text("{broken")  # an unreadable earlier file: nothing to keep
    lg2 = _logger(tmp_path)
    lg2.mark_resumed()
    assert "resumed_utc" not in json.loads((run / "versions.json").read_text())


def test_versions_json_without_a_gpu_lists_none(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, "exit 9")
    lg = _logger(tmp_path)
    versions = json.loads((lg.run_dir / "versions.json").read_text())
    assert versions["gpus"] == [] and versions["time_utc"].endswith("Z") and versions["python"].count(".") == 2


def test_rollout_dump(tmp_path):
    lg = _logger(tmp_path)
    lg.dump_rollouts(3, [{"prompt": [{"role": "user", "content": "q?"}], "answer": "4"}], ["#### 4"],
                     [{"reward": 1.0}], ["stop"])
    line = json.loads((tmp_path / "run" / "rollouts" / "step_3.jsonl").read_text())
    assert line == {"step": 3, "prompt": "q?", "response": "#### 4", "answer": "4", "reward": 1.0, "finish_reason": "stop"}


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match=r"trainer.logger=wandb needs the wandb package: pip install 'rlctl\[wandb\]'"):
        _logger(tmp_path, loggers=("wandb",))


def test_atomic_write_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    import os

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(tmp_path / "f.txt", "data")
    assert os.listdir(tmp_path) == []


STEP_METRICS = {"reward/mean": 0.1875, "reward/accuracy_strict": 0.0, "reward/accuracy_flexible": 0.0625,
                "response_length/mean": 127.5, "policy/grad_norm": 1.2345, "groups/zero_variance_fraction": 0.5,
                "timing/step": 62.31}
STEP_LINE = ("step 1: reward=0.1875  acc_strict=0  acc_flex=0.0625  resp_len=127.5 tok  grad_norm=1.234  "
             "flat_groups=0.5  step_time=62.31 s")


def test_step_line_in_a_pipe_is_one_unpadded_line_without_source_location(tmp_path, capsys):
    """log_console() on a non-terminal stderr: `[HH:MM:SS] step 1: ...` exactly, not padded to 4096
    columns, no `metrics.py:NNN` column."""
    import re

    from rlctl.metrics import log_console

    lg = RunLogger(tmp_path / "run", "a: 1\n", [], project="p", run_name="r", redacted_config={},
                   console=log_console())
    lg.log(1, STEP_METRICS)
    lg.console.log("note: a path [not markup] /x/y.py:12")
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert len(lines) == 3 and lines[2] == ""
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] " + re.escape(STEP_LINE), lines[0]), lines[0]
    assert lines[1].endswith("note: a path [not markup] /x/y.py:12")
    assert "metrics.py" not in err


def test_step_line_in_a_100_column_terminal_is_not_hard_wrapped(tmp_path):
    import io

    from rlctl.metrics import LogConsole

    out = io.StringIO()
    console = LogConsole(file=out, force_terminal=True, width=100, color_system=None, log_path=False)
    lg = RunLogger(tmp_path / "run", "a: 1\n", [], project="p", run_name="r", redacted_config={}, console=console)
    lg.log(1, STEP_METRICS)
    text = out.getvalue()
    assert len(STEP_LINE) + 11 > 100  # longer than the terminal: the terminal folds it, rich does not
    assert text.count("\n") == 1 and text.endswith(STEP_LINE + "\n") and ".py:" not in text
