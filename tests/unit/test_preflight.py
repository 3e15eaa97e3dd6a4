"""The environment preflight (rlctl/preflight.py) of `rlctl train` / `rlctl eval`: GPU counting without
torch, the sglang package, the layout's GPU count, a checkpoint that already completes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlctl import preflight
from rlctl.config import load_config
from rlctl.testing import free_port


@pytest.fixture
def home(gsm8k_home):
    model = gsm8k_home / "models" / "smollm2-135m-instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return gsm8k_home


def fake_nvidia_smi(tmp_path: Path, monkeypatch, body: str) -> None:
    """Put an ``nvidia-smi`` shell script first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


SMI_TWO = 'echo "0, GPU-aaa, 81559"; echo "1, GPU-bbb, 81559"'  # --query-gpu=index,uuid,memory.total


# ------------------------------------------------------------------------------------------ GPU count


def test_gpu_count_from_nvidia_smi_and_cuda_visible_devices(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, SMI_TWO)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert preflight.physical_gpu_count() == 2
    assert preflight.visible_gpu_count() == 2
    for cvd, n in (("", 0), ("1", 1), ("0,1,2,3", 2), ("0,-1,1", 1), ("-1", 0), ("GPU-aaa", 1), ("GPU-bbb,0", 2), ("1,1", 1), ("GPU-zzz,0", 0),
                    ("MIG-5c1e0f2a-aaaa", 1), ("MIG-x,MIG-y", 2)):  # MIG instances: counted, not mapped
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
        assert preflight.visible_gpu_count() == n, cvd


def test_gpu_count_falls_back_to_proc_when_nvidia_smi_hangs_or_fails(tmp_path, monkeypatch):
    proc = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (proc / bus).mkdir(parents=True)
    monkeypatch.setattr(preflight, "PROC_GPUS", proc)
    fake_nvidia_smi(tmp_path, monkeypatch, "sleep 10")
    t0 = time.perf_counter()
    assert preflight.physical_gpu_count(timeout_s=0.5) == 3
    assert time.perf_counter() - t0 < 5
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert preflight.physical_gpu_count() == 3
    monkeypatch.setattr(preflight, "PROC_GPUS", tmp_path / "absent")
    assert preflight.physical_gpu_count() == 0


# ---------------------------------------------------------------------------------------- the checks


def _cfg(*overrides, preset="gsm8k-cpu", backend=None):
    return load_config(preset=preset, overrides=list(overrides), backend=backend).cfg


def test_cuda_without_gpu_names_the_key_and_the_fix(home, monkeypatch):
    monkeypatch.setattr(preflight, "sglang_installed", lambda: False)
    res = preflight.check(_cfg("trainer.device=cuda"), "train", gpu_count=lambda: 0)
    assert res.errors == [
        "trainer.device=cuda: this machine has no visible NVIDIA GPU (none found by nvidia-smi or in "
        "/proc/driver/nvidia); set trainer.device=cpu (with --backend hf, e.g. --preset gsm8k-cpu), or run on a "
        "GPU machine or a Ray cluster (--ray-address)"]
    # the hf backend on the CPU needs neither a GPU nor sglang, and does not even count GPUs
    res = preflight.check(_cfg(), "train", gpu_count=lambda: pytest.fail("no GPU count for device=cpu"))
    assert res.errors == [] and res.gpus is None


def test_sglang_missing_and_no_gpu_are_one_list(home, monkeypatch):
    monkeypatch.setattr(preflight, "sglang_installed", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    res = preflight.check(_cfg(preset="gsm8k", backend="sglang"), "eval", gpu_count=lambda: 0)
    assert len(res.errors) == 2
    assert res.errors[0].startswith("generator.backend=sglang: SGLang is not installed in this Python environment; "
                                    'install it with pip install "rlctl[sglang]"')
    assert res.errors[1].startswith("generator.backend=sglang: SGLang engines need a CUDA GPU and this machine has "
                                    "none (CUDA_VISIBLE_DEVICES='')")
    assert "/work/" not in " ".join(res.errors) and "site-packages" not in " ".join(res.errors)


@pytest.mark.parametrize("overrides, command, need", [
    # colocated: policy_num_nodes x policy_num_gpus_per_node (the engines share them)
    (["trainer.placement.policy_num_gpus_per_node=2", "generator.num_inference_engines=2"], "train", 2),
    # split: 2 policy GPUs + 3 engines x 1
    (["trainer.placement.colocate_all=false", "trainer.placement.policy_num_gpus_per_node=2",
      "generator.num_inference_engines=3", "generator.weight_sync_backend=nccl"], "train", 5),
    # tensor-parallel engines: colocated 2 engines x TP 2 share the 4 policy GPUs; split adds 2 x 2; eval 2 x 2
    (["trainer.placement.policy_num_gpus_per_node=4", "trainer.micro_train_batch_size_per_gpu=4",
      "generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2"], "train", 4),
    (["trainer.placement.colocate_all=false", "trainer.placement.policy_num_gpus_per_node=2",
      "generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2"], "train", 6),
    (["trainer.placement.colocate_all=false", "trainer.placement.policy_num_gpus_per_node=2",
      "generator.num_inference_engines=2", "generator.inference_engine_tensor_parallel_size=2"], "eval", 4),
    # eval reserves the engines only
    (["trainer.placement.colocate_all=false", "trainer.placement.policy_num_gpus_per_node=2",
      "generator.num_inference_engines=3"], "eval", 3),
])
def test_layout_needs_more_gpus_than_visible(home, monkeypatch, overrides, command, need):
    monkeypatch.setattr(preflight, "sglang_installed", lambda: True)
    cfg = _cfg(*overrides, preset="gsm8k", backend="sglang")
    assert preflight.gpus_needed(cfg, command)[0] == need
    assert preflight.check(cfg, command, gpu_count=lambda: need).errors == []
    (err,) = preflight.check(cfg, command, gpu_count=lambda: need - 1).errors
    assert err.startswith(f"the layout needs {need} GPUs (")
    assert f"but this machine has {need - 1}; " in err


def test_layout_message_names_the_keys(home, monkeypatch):
    monkeypatch.setattr(preflight, "sglang_installed", lambda: True)
    cfg = _cfg("trainer.placement.colocate_all=false", "trainer.placement.policy_num_gpus_per_node=2",
               "generator.num_inference_engines=3", preset="gsm8k", backend="sglang")
    (err,) = preflight.check(cfg, "train", gpu_count=lambda: 1).errors
    assert err == ("the layout needs 5 GPUs (trainer.placement.policy_num_nodes=1 x "
                   "trainer.placement.policy_num_gpus_per_node=2 for the policy + generator.num_inference_engines=3 x "
                   "generator.inference_engine_tensor_parallel_size=1 for the engines (split placement)) but this "
                   "machine has 1; lower trainer.placement.policy_num_gpus_per_node / policy_num_nodes or "
                   "generator.num_inference_engines, or pass --ray-address of a cluster with enough GPUs")
    # ray.num_gpus limits the local cluster below what is visible
    cfg = _cfg("ray.num_gpus=1", "trainer.placement.policy_num_gpus_per_node=2", "generator.num_inference_engines=2",
               preset="gsm8k", backend="sglang")
    (err,) = preflight.check(cfg, "train", gpu_count=lambda: 8).errors
    assert "but this machine has 1 (ray.num_gpus=1 of 8 visible); " in err


def test_a_failed_config_carries_what_the_preflight_may_read(home, monkeypatch):
    """ConfigError.cfg / .unsure: a config that failed only on this machine's files is the user's own (unsure None);
    otherwise the keys an error named (or replaced by its default) are unsure and the preflight skips them."""
    from rlctl.config import ConfigError

    monkeypatch.setattr(preflight, "sglang_installed", lambda: False)
    with pytest.raises(ConfigError) as exc:
        load_config(preset="gsm8k-cpu", overrides=["trainer.device=cuda", "data.train_data=[/nope.parquet]"],
                    for_training=True)
    assert exc.value.unsure is None and exc.value.cfg.trainer.device == "cuda"
    assert preflight.check(exc.value.cfg, "train", gpu_count=lambda: 0).errors[0].startswith("trainer.device=cuda: ")
    with pytest.raises(ConfigError) as exc:
        load_config(preset="gsm8k-cpu", overrides=["generator.backend=vllm", "trainer.device=cuda", "trainer.seed=x"])
    assert {"generator.backend", "trainer.seed"} <= exc.value.unsure and "trainer.device" not in exc.value.unsure
    res = preflight.check(exc.value.cfg, "train", gpu_count=lambda: 0, unsure=exc.value.unsure)
    assert [e.split(":")[0] for e in res.errors] == ["trainer.device=cuda"]  # the default backend is not checked
    # partial: no layout count (the layout's keys may be the broken ones), no checkpoint look-up
    assert preflight.check(exc.value.cfg, "train", gpu_count=lambda: 1, unsure=exc.value.unsure).errors == []
    with pytest.raises(ConfigError) as exc:
        load_config(preset="gsm8k", overrides=["trainer.device=auto", "trainer.seed=x"])
    res = preflight.check(exc.value.cfg, "eval", gpu_count=lambda: 0, unsure=exc.value.unsure)
    assert [e.split(";")[0] for e in res.errors] == [
        "generator.backend=sglang: SGLang is not installed in this Python environment",
        "generator.backend=sglang: SGLang engines need a CUDA GPU and this machine has none (none found by nvidia-smi "
        "or in /proc/driver/nvidia)"]


def test_gpu_checks_step_aside_for_a_ray_cluster(home, monkeypatch):
    monkeypatch.setattr(preflight, "sglang_installed", lambda: False)
    monkeypatch.setattr(preflight, "ray_address_problem", lambda address: None)  # as if the cluster answered
    no_count = lambda: pytest.fail("a cluster's GPUs are not counted locally")  # noqa: E731
    cfg = _cfg("trainer.device=cuda", "ray.address=10.0.0.1:6379")
    assert preflight.check(cfg, "train", gpu_count=no_count).errors == []
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    res = preflight.check(_cfg(preset="gsm8k", backend="sglang"), "train", gpu_count=no_count)
    assert [e.split(";")[0] for e in res.errors] == [  # the package is still needed on the driver's machine
        "generator.backend=sglang: SGLang is not installed in this Python environment"]


def test_a_ray_address_that_does_not_answer_is_one_message_not_minutes_of_retries(home):
    """A closed port: connection refused at once (ray.init would retry for minutes); auto / ray:// are Ray's to
    resolve."""
    import socket

    port = free_port()  # closed again once found: nothing listens there
    t0 = time.perf_counter()
    res = preflight.check(_cfg("trainer.device=cpu", f"ray.address=127.0.0.1:{port}"), "train")
    assert time.perf_counter() - t0 < 5
    assert len(res.errors) == 1 and res.errors[0].startswith(f"ray.address=127.0.0.1:{port}: no Ray cluster answers there")
    assert "`ray start --head`" in res.errors[0]
    assert preflight.ray_address_problem("auto") is None and preflight.ray_address_problem("ray://head:10001") is None
    with socket.socket() as srv:  # something listening: no problem
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        assert preflight.ray_address_problem(f"127.0.0.1:{srv.getsockname()[1]}") is None


# --------------------------------------------------------------------------------------- checkpoints


def _complete(ckpt_dir: Path, step: int) -> Path:
    d = ckpt_dir / f"global_step_{step}"
    d.mkdir(parents=True)
    (d / "COMPLETE").write_text(json.dumps({"step": step, "time": 0}))
    return d


def test_checkpoint_that_completes_the_run(home):
    cfg = _cfg()  # max_steps=2
    assert preflight.check(cfg, "train").finished is None  # no checkpoint yet
    (Path(cfg.ckpt_dir) / ".tmp-global_step_2-123").mkdir(parents=True)  # partial: ignored
    _complete(Path(cfg.ckpt_dir), 1)
    assert preflight.check(cfg, "train").finished is None
    d = _complete(Path(cfg.ckpt_dir), 2)
    assert preflight.check(cfg, "train").finished == (
        f"the checkpoint {d} (step 2) already completes this run's 2 steps: nothing to train (use a new "
        "trainer.run_name, trainer.resume_mode=none, or raise trainer.max_steps / trainer.epochs)")
    assert preflight.check(_cfg("trainer.max_steps=3"), "train").finished is None
    assert preflight.check(_cfg("trainer.resume_mode=none"), "train").finished is None
    assert preflight.check(cfg, "eval").finished is None


def test_checkpoint_against_epochs_reads_the_parquet_row_count(home):
    # the bundled sample has 64 training rows; train_batch_size 4 -> 16 steps per epoch, x 2 epochs = 32
    cfg = _cfg("trainer.max_steps=null", "trainer.epochs=2")
    assert preflight.max_total_steps(cfg) == 32
    _complete(Path(cfg.ckpt_dir), 31)
    assert preflight.check(cfg, "train").finished is None
    _complete(Path(cfg.ckpt_dir), 32)
    assert "(step 32) already completes this run's 32 steps" in preflight.check(cfg, "train").finished
    cfg = _cfg("trainer.resume_mode=from_path", f"trainer.resume_path={cfg.ckpt_dir}/global_step_31",
               "trainer.max_steps=31")
    assert "(step 31) already completes this run's 31 steps" in preflight.check(cfg, "train").finished


# ------------------------------------------------------------------------------- the command, for real


def test_train_cuda_on_a_cpu_machine_exits_2_fast_without_traceback_or_heavy_imports(home, tmp_path):
    """Acceptance: `rlctl train --preset gsm8k-cpu trainer.device=cuda` on a machine without a GPU (PATH
    without nvidia-smi, CUDA_VISIBLE_DEVICES empty) exits 2 with one message, imports no torch/ray, and
    writes no run folder."""
    probe = ("import sys, runpy\nsys.argv = ['rlctl', *sys.argv[1:]]\ntry:\n    runpy.run_module('rlctl', "
             "run_name='__main__')\nfinally:\n    print('HEAVY=' + ','.join(sorted({m.split('.')[0] for m in "
             "sys.modules} & {'torch', 'ray', 'sglang', 'transformers'})), file=sys.stderr)\n")
    env = {**os.environ, "HOME": str(home), "CUDA_VISIBLE_DEVICES": "", "PATH": os.path.dirname(sys.executable)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", probe, "train", "--preset", "gsm8k-cpu", "trainer.device=cuda"],
                         capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("rlctl train: this machine cannot run this configuration (1 problem):\n"
                                 "  - trainer.device=cuda: this machine has no visible NVIDIA GPU "
                                 "(CUDA_VISIBLE_DEVICES=''); set trainer.device=cpu"), res.stderr
    assert "Traceback" not in res.stderr and "HEAVY=\n" in res.stderr
    assert not (home / "rlctl_runs").exists() and not (home / "ckpts").exists()
    assert elapsed < 30  # ~1 s idle; loose for a busy shared machine (Ray's start alone took ~20 s)
