"""What a user sees on the terminal around Ray: no "Token authentication is enabled" notice at each start, and an
engine that fails to start gives rlctl's one-line error, not a worker traceback printed first.

Runs a small script in a fresh interpreter (its own local Ray cluster, 1 CPU) and reads its stderr:
``python3 -m pytest -q tests/unit/test_ray_quiet.py``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlctl.job.cluster import TOKEN_AUTH_LOGGER, TOKEN_AUTH_NOTICE, quiet_token_auth_notice

SCRIPT = textwrap.dedent('''
    import sys, time
    import ray
    from rlctl.config import load_config
    from rlctl.job.actors import GeneratorWorker
    from rlctl.job.cluster import init_ray, shutdown_ray
    from rlctl.job.groups import ACTOR_LABELS, get_all
    from rlctl.job.entry import _describe_ray_error

    cfg = load_config(preset="gsm8k-cpu", backend="hf", overrides=["ray.num_cpus=1"]).cfg
    started = init_ray(cfg, "cpu")
    try:
        actor = ray.remote(GeneratorWorker).options(num_cpus=0).remote(
            "hf", {"model_path": sys.argv[1], "dtype": "float32", "device": "cpu", "seed": 1, "max_batch_size": 1},
            1, "generator-0")
        ACTOR_LABELS[actor._actor_id.hex()] = "generator-0"  # as build_groups names its actors
        try:
            get_all([actor.start.remote()])  # as build_groups starts its engines
            print("RESULT started")
        except Exception as e:  # noqa: BLE001
            print("RESULT " + _describe_ray_error(e))
        time.sleep(3)  # the driver's log monitor streams worker output once a second: give it time to print
    finally:
        shutdown_ray(started)
''')


def test_token_auth_notice_filter_drops_only_the_enabled_notice():
    quiet_token_auth_notice()
    quiet_token_auth_notice()  # idempotent: one filter
    log = logging.getLogger(TOKEN_AUTH_LOGGER)
    assert sum(type(f).__name__ == "_DropTokenAuthNotice" for f in log.filters) == 1

    class Keep(logging.Handler):  # on the logger itself: Ray's own logging setup may stop propagation to root
        def __init__(self):
            super().__init__(logging.WARNING)
            self.seen: list[str] = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    keep = Keep()
    log.addHandler(keep)
    try:
        log.warning(TOKEN_AUTH_NOTICE + ". Set RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    finally:
        log.removeHandler(keep)
    assert [m[:47] for m in keep.seen] == ["Token authentication is disabled for this Ray c"]


@pytest.mark.timeout(240)
def test_engine_start_failure_is_one_line_without_worker_traceback_or_token_notice(tmp_path):
    missing = tmp_path / "no-such-model"
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_AUTH_MODE", None)  # Ray's default (token authentication on, with its notice) is what users get
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(missing)], capture_output=True, text=True, timeout=200,
                       env=env, cwd=tmp_path)
    out, err = p.stdout, p.stderr
    assert p.returncode == 0, err[-3000:]
    result = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert len(result) == 1, out
    assert result[0].startswith("RESULT generator-0 failed; last error: OSError: "), result[0]
    assert str(missing) in result[0] or "no-such-model" in result[0], result[0]
    assert "Traceback" not in err, err[-3000:]
    assert "Exception raised in creation task" not in err, err[-3000:]
    assert TOKEN_AUTH_NOTICE not in err, err[-3000:]
