"""Fixtures shared by the CPU unit tests."""

from __future__ import annotations

import pytest

# secrets and location variables a developer's shell may carry; tests must not see them
CLEARED_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_ADDRESS", "RLCTL_PRESETS_DIR",
               "RLCTL_SAMPLE_DATA")


@pytest.fixture
def gsm8k_home(tmp_path, monkeypatch):
    """HOME in tmp with the default GSM8K data files present (``~/data/gsm8k/*.parquet``), env cleared."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    d = tmp_path / "data" / "gsm8k"
    d.mkdir(parents=True)
    (d / "train.parquet").write_bytes(b"x")
    (d / "validation.parquet").write_bytes(b"x")
    return tmp_path
