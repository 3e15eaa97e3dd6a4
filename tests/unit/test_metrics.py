import builtins
import json

import pytest

from rlctl.metrics import RunLogger, write_text_atomic


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
