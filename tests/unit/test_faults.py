"""Process faults of a real ``python -m rlctl train`` run (tiny random Llama, CPU, 1 trainer + 1 ``hf``
generator through Ray), each run a subprocess in its own session / process group:

- SIGKILL of the whole process group after a checkpoint, then ``trainer.resume_mode=latest``: the
  resumed run's metrics equal an uninterrupted run's (timings and ``generator/*`` aside), the killed
  run's metric lines after its checkpoint are dropped, and a checkpoint killed mid-write is never
  picked up.
- SIGKILL of the generator or the trainer actor mid-run: exit 1 within 60 s naming the actor
  (``generator-0`` / ``trainer-0``) and its last error, no Python traceback.
- a trainer ``RuntimeError`` (``trainer.max_bad_steps`` non-finite steps in a row): a clear message,
  exit 1, the last good checkpoint intact.
- Ctrl-C (SIGINT to the driver): exit 130, no ``.tmp-*`` checkpoint folder, no ``*.tmp`` file; SIGTERM the same
  way with exit 143.

After every run no process of it is left: each run gets a unique ``RLCTL_FAULT_TAG`` environment
variable, which Ray's processes (GCS, raylet, workers) inherit, and ``/proc/*/environ`` is searched
for it (the same thing ``ps eww`` shows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rlctl.testing import build_tiny_llama, tiny_run_overrides

pytestmark = [pytest.mark.ray]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "test_rewards.py"
IGNORED = ("timing/", "rollout/tokens_per_s", "generator/")
FAULT_BOUND_S = 60.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny", seed=3))


def overrides(tiny: str, root: Path, run: str, max_steps: int, reward: str = "even_token_fraction", **extra) -> list[str]:
    return tiny_run_overrides(tiny, root, run, max_steps, reward_fn=f"{FIXTURES}:{reward}", **{
        "trainer.seed": 7, "trainer.project_name": "faults", "trainer.logger": "console", "ray.num_cpus": 2, **extra})


class Run:
    """One ``python -m rlctl train`` (or ``command``) subprocess in its own session, tagged for the survivor check."""

    def __init__(self, args: list[str], root: Path, name: str, env: dict | None = None, command: str = "train") -> None:
        self.tag = f"{name}-{uuid.uuid4().hex[:10]}"
        self.out = root / f"{name}.log"
        self.err_path = root / f"{name}.err"
        env = {**os.environ, "RLCTL_FAULT_TAG": self.tag, "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
               **(env or {})}
        env.pop("RAY_ADDRESS", None)
        with open(self.out, "wb") as so, open(self.err_path, "wb") as se:
            self.proc = subprocess.Popen([sys.executable, "-m", "rlctl", command, "--backend", "hf", *args],
                                         stdout=so, stderr=se, env=env, start_new_session=True,
                                         cwd=Path(__file__).resolve().parents[2])
        self.t0 = time.monotonic()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"run exited ({self.proc.returncode}) before {what}:\n{self.stderr[-4000:]}")
            time.sleep(0.05)
        self.kill_all()
        pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{self.stderr[-4000:]}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"run did not exit within {timeout} s:\n{self.stderr[-4000:]}")

    def processes(self) -> dict[int, str]:
        return tagged_processes(self.tag)

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def assert_no_survivors(self, grace: float = 20.0) -> float:
        """No process carrying this run's tag is left after ``grace`` s; returns how long it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < grace:
            left = self.processes()
            if not left:
                return time.monotonic() - t0
            time.sleep(0.2)
        left = self.processes()
        if left:
            self.kill_all()
            pytest.fail(f"processes of the run survived {grace} s: {left}")
        return time.monotonic() - t0


def tagged_processes(tag: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment holds ``RLCTL_FAULT_TAG=<tag>``."""
    needle = f"RLCTL_FAULT_TAG={tag}".encode()
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            stat = (d / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # zombie: dead, waiting to be reaped
                continue
            found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
    return found


def actor_pid(run: Run, cls: str) -> int:
    """PID of the run's Ray actor process of class ``cls`` (Ray titles it ``ray::<Class>[.<method>]``)."""
    pids = [pid for pid, cmd in run.processes().items() if cmd.startswith(f"ray::{cls}")]
    assert len(pids) == 1, (cls, run.processes())
    return pids[0]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(IGNORED)}


def steps_logged(run_dir: Path) -> list[int]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(ln)["step"] for ln in p.read_text().splitlines() if ln.strip().endswith("}")]


def assert_no_partial_files(ckpt_dir: Path, run_dir: Path) -> None:
    assert not list(ckpt_dir.glob(".tmp-*")), list(ckpt_dir.iterdir())
    assert not [p for p in run_dir.rglob("*.tmp")], list(run_dir.rglob("*"))


# ------------------------------------------------------------------------------------------ 1 SIGKILL
@pytest.mark.timeout(900)
@pytest.mark.parametrize("dynamic_sampling", [None, "filter"])
def test_sigkill_process_group_then_resume_matches_uninterrupted(tiny, tmp_path, dynamic_sampling):
    """Checkpoint every 2 steps; SIGKILL the whole group once step 3 is logged (after checkpoint 2,
    before checkpoint 4), resume, compare with an uninterrupted run of the same seed. With dynamic sampling
    ``filter`` about half the groups are flat, so the data position (saved in the checkpoint) runs ahead of
    step x train_batch_size and the resumed run must continue from it."""
    root = tmp_path
    common: dict = {"trainer.ckpt_interval": 2}
    if dynamic_sampling:
        common.update({"trainer.algorithm.dynamic_sampling.type": dynamic_sampling,
                       "trainer.algorithm.dynamic_sampling.max_sample_batches": 3,
                       "reward": "flat_for_odd_length_answers"})
    full = Run(overrides(tiny, root, "full", 4, **common), root, "full")
    killed = Run(overrides(tiny, root, "killed", 4, **common), root, "killed")
    run_dir, ckpt_dir = root / "runs" / "faults" / "killed", root / "ckpts" / "faults" / "killed"
    killed.wait_for(lambda: 3 in steps_logged(run_dir), 420, "step 3 of the run to be killed")
    os.killpg(killed.proc.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    assert killed.proc.wait(timeout=10) == -signal.SIGKILL
    left_after = killed.assert_no_survivors(grace=20)
    print(f"\n[faults] SIGKILL of the process group: all run processes gone {left_after:.1f} s after the kill; "
          f"run took {t_kill - killed.t0:.1f} s to step 3")
    assert (ckpt_dir / "global_step_2" / "COMPLETE").is_file()
    assert not (ckpt_dir / "global_step_4").exists()
    assert steps_logged(run_dir) == [1, 2, 3]  # step 3 is logged but not checkpointed: must be redone

    # checkpoints killed mid-write: a temporary folder (even with its marker) and a final-named folder
    # without COMPLETE are never picked as the latest
    tmp = ckpt_dir / ".tmp-global_step_4-999999"
    (tmp / "policy").mkdir(parents=True)
    (tmp / "COMPLETE").write_text("{}")
    (ckpt_dir / "global_step_3" / "policy").mkdir(parents=True)

    assert full.wait(600) == 0, full.stderr[-4000:]
    full.assert_no_survivors()

    resumed = Run(overrides(tiny, root, "killed", 4, **common, **{"trainer.resume_mode": "latest"}), root, "resumed")
    assert resumed.wait(600) == 0, resumed.stderr[-4000:]
    resumed.assert_no_survivors()
    assert "global_step_2 (step 2)" in " ".join(resumed.stderr.split()), resumed.stderr[-3000:]

    a = {r["step"]: r for r in metrics(root / "runs" / "faults" / "full")}
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the killed run's step-3 line was dropped, not duplicated
    b = {r["step"]: r for r in rows}
    for step in (1, 2, 3, 4):  # 1-2 from the killed run, 3-4 from the resumed one
        assert comparable(a[step]) == comparable(b[step]), step
    assert (ckpt_dir / "global_step_4" / "COMPLETE").is_file()
    assert not list(ckpt_dir.glob(".tmp-*"))  # the stale temporary folder was pruned by the next save
    if dynamic_sampling:  # the filter consumed more prompts than 2 per step at least once before the kill
        assert b[2]["data/prompts_consumed"] > 4.0 and b[4]["dynamic_sampling/sample_batches"] >= 1.0


# ------------------------------------------------------------------------------------------ 4 actors die
@pytest.mark.timeout(600)
@pytest.mark.parametrize("cls, label", [("GeneratorWorker", "generator-0"), ("TrainerWorker", "trainer-0")])
def test_actor_killed_mid_run_exits_nonzero_naming_it(tiny, tmp_path, cls, label):
    run = Run(overrides(tiny, tmp_path, "die", 30), tmp_path, f"die-{label}")
    ckpt_dir = tmp_path / "ckpts" / "faults" / "die"
    run.wait_for(lambda: (ckpt_dir / "global_step_1" / "COMPLETE").is_file(), 420, "checkpoint 1")
    os.kill(actor_pid(run, cls), signal.SIGKILL)
    t_fault = time.monotonic()
    rc = run.wait(FAULT_BOUND_S + 30)
    took = time.monotonic() - t_fault
    err = run.stderr
    print(f"\n[faults] {label} SIGKILLed: exit {rc} after {took:.1f} s")
    assert rc == 1, err[-4000:]
    assert took < FAULT_BOUND_S, took
    flat = " ".join(err.split())
    assert f"error: {label} died" in flat, err[-4000:]
    assert "last error:" in flat
    assert "Traceback" not in err, err[-4000:]
    run.assert_no_survivors()
    assert (ckpt_dir / "global_step_1" / "COMPLETE").is_file()
    assert_no_partial_files(ckpt_dir, tmp_path / "runs" / "faults" / "die")


@pytest.mark.timeout(600)
def test_trainer_runtime_error_is_a_clear_message_and_keeps_checkpoint(tiny, tmp_path):
    """Rewards turn NaN after step 1, so step 2's loss is NaN; trainer.max_bad_steps=1 makes the trainer
    raise RuntimeError inside its actor."""
    run = Run(overrides(tiny, tmp_path, "nan", 4, **{"trainer.max_bad_steps": 1,
                                                     "environment.reward.custom_reward_fn": f"{FIXTURES}:nan_after_first_step"}),
              tmp_path, "nan", env={"RLCTL_TEST_GOOD_CALLS": "8"})
    rc = run.wait(480)
    err = run.stderr
    flat = " ".join(err.split())
    assert rc == 1, err[-4000:]
    assert "error: trainer-0 failed" in flat and "RuntimeError: 1 optimizer steps in a row had a non-finite" in flat, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    run.assert_no_survivors()
    ckpt_dir = tmp_path / "ckpts" / "faults" / "nan"
    assert (ckpt_dir / "global_step_1" / "COMPLETE").is_file()
    assert (ckpt_dir / "global_step_1" / "policy" / "model.safetensors").is_file()
    assert not (ckpt_dir / "global_step_2").exists()
    assert_no_partial_files(ckpt_dir, tmp_path / "runs" / "faults" / "nan")


# ------------------------------------------------------------------------------------------ 4 Ctrl-C
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted:"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM):")], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_stops_cleanly(tiny, tmp_path, sig, code, said):
    """Ctrl-C, and SIGTERM (a scheduler's time limit, ``kill``, ``timeout``) the same way: a clean stop, no raw
    stack dump of Ray's failure signal handler."""
    run = Run(overrides(tiny, tmp_path, "intr", 30), tmp_path, "intr")
    ckpt_dir = tmp_path / "ckpts" / "faults" / "intr"
    run.wait_for(lambda: (ckpt_dir / "global_step_1" / "COMPLETE").is_file(), 420, "checkpoint 1")
    time.sleep(0.5)  # land inside step 2
    run.proc.send_signal(sig)
    t_int = time.monotonic()
    rc = run.wait(FAULT_BOUND_S + 30)
    took = time.monotonic() - t_int
    print(f"\n[faults] {sig.name}: exit {rc} after {took:.1f} s")
    err = run.stderr
    assert rc == code, err[-4000:]
    assert took < FAULT_BOUND_S
    assert said in err and "Traceback" not in err and "SIGTERM received at time" not in err, err[-4000:]
    run.assert_no_survivors()
    assert_no_partial_files(ckpt_dir, tmp_path / "runs" / "faults" / "intr")
    for d in ckpt_dir.glob("global_step_*"):
        assert (d / "COMPLETE").is_file(), d


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted: evaluation stopped"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM): evaluation stopped")],
                         ids=["ctrl_c", "sigterm"])
def test_eval_stops_cleanly(tiny, tmp_path, sig, code, said):
    """``rlctl eval`` stopped while its engine generates (long greedy answers of a random tiny model): one line,
    no traceback, no process left."""
    from rlctl.gsm8k import SAMPLE_DIR

    run = Run(["--model", tiny, f"data.val_data=['{SAMPLE_DIR}/validation.parquet']", "trainer.device=cpu",
               "ray.num_cpus=2", "generator.num_inference_engines=1", "trainer.placement.policy_num_gpus_per_node=1",
               "generator.eval_sampling_params.max_new_tokens=1500"],
              tmp_path, "evalstop",
              command="eval")
    # Ray titles a worker process after the task it runs: stop the run while the engine generates (a signal
    # during the actor's own start-up makes Ray print that worker's interrupted import, which is Ray's output)
    run.wait_for(lambda: any("GeneratorWorker.generate" in c for c in run.processes().values()), 180,
                 "the generator's generate task")
    run.proc.send_signal(sig)
    rc = run.wait(FAULT_BOUND_S)
    err = run.stderr
    assert rc == code, err[-4000:]
    assert said in err and "Traceback" not in err and "SIGTERM received at time" not in err, err[-4000:]
    run.assert_no_survivors()


# ------------------------------------------------------------------------------------------ 1b driver only
@pytest.mark.timeout(600)
def test_sigkill_of_the_driver_alone_leaves_no_ray_process(tiny, tmp_path):
    """``kill -9 <driver>`` (not its group): Ray's workers run in process groups of their own and its
    agents outlive the raylet, so rlctl's watchdog (``rlctl.job.cluster._start_reaper``) must sweep them."""
    run = Run(overrides(tiny, tmp_path, "drv", 30), tmp_path, "drv")
    ckpt_dir = tmp_path / "ckpts" / "faults" / "drv"
    run.wait_for(lambda: (ckpt_dir / "global_step_1" / "COMPLETE").is_file(), 420, "checkpoint 1")
    assert len(run.processes()) > 3  # driver, GCS, raylet, agents, workers
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.proc.wait(timeout=10) == -signal.SIGKILL
    took = run.assert_no_survivors(grace=20)
    print(f"\n[faults] SIGKILL of the driver alone: all run processes gone {took:.1f} s after the kill")


@pytest.mark.timeout(300)
def test_placement_timeout_is_one_message_without_traceback(tiny, tmp_path):
    """More engines than the cluster has CPUs for: ``rlctl eval`` (the same reservation as ``train``) exits 1 with
    the reservation message naming the keys, no traceback, no process left."""
    from rlctl.gsm8k import SAMPLE_DIR

    run = Run(["--model", tiny, f"data.val_data=['{SAMPLE_DIR}/validation.parquet']", "trainer.device=cpu",
               "ray.num_cpus=2", "ray.placement_group_timeout_s=2"], tmp_path, "pgtimeout", command="eval")
    rc = run.wait(240)
    err = " ".join(run.stderr.split())
    assert rc == 1, err[-4000:]
    assert "rlctl eval: Ray could not reserve 4 bundles {'CPU': 1} within 2.0 s" in err, err[-4000:]
    assert "raise ray.placement_group_timeout_s" in err and "Traceback" not in err, err[-4000:]
    run.assert_no_survivors()
