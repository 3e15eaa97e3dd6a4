import os

import pytest

from rlctl.checkpoint import MARKER, Checkpointer, checkpoint_step, complete_checkpoints, latest_checkpoint, prune


def _ckpt(root, step, complete=True):
    p = root / f"global_step_{step}"
    (p / "policy").mkdir(parents=True)
    if complete:
        (p / MARKER).write_text("{}")
    return p


def test_latest_ignores_incomplete_and_temporary(tmp_path):
    _ckpt(tmp_path, 2)
    _ckpt(tmp_path, 10)
    _ckpt(tmp_path, 12, complete=False)  # killed after the rename? never: but a folder without the marker is skipped
    (tmp_path / ".tmp-global_step_14-123" / "policy").mkdir(parents=True)  # killed mid-write
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step_10"
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 10]


def test_prune_keeps_newest_and_removes_temporaries(tmp_path):
    for s in (1, 2, 3):
        _ckpt(tmp_path, s)
    (tmp_path / ".tmp-global_step_4-99").mkdir()
    deleted = prune(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == [".tmp-global_step_4-99", "global_step_1"]
    assert sorted(os.listdir(tmp_path)) == ["global_step_2", "global_step_3"]
    assert prune(tmp_path, keep=-1) == []


class _FakeTrainers:
    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, policy_dir, state_path, model_path, extra):
        policy_dir.mkdir(parents=True)
        (policy_dir / "model.safetensors").write_bytes(b"x")
        if self.fail:
            raise KeyboardInterrupt
        state_path.write_bytes(b"s")

    def load_checkpoint(self, policy_dir, state_path):
        return {"step": int(policy_dir.parent.name.split("_")[-1])}


def test_save_is_atomic_and_interrupted_save_is_not_latest(tmp_path):
    c = Checkpointer(tmp_path, "m", keep=-1, resume_mode="latest", resume_path=None)
    c.save(_FakeTrainers(), {"step": 1})
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(tmp_path, "m", keep=-1, resume_mode="latest", resume_path=None).save(_FakeTrainers(fail=True), {"step": 2})
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step_1"
    notes = []
    extra = Checkpointer(tmp_path, "m", keep=-1, resume_mode="latest", resume_path=None, notes=notes).restore(_FakeTrainers())
    assert extra == {"step": 1}
    assert notes == [f"resumed from {tmp_path / 'global_step_1'} (step 1)"]


def test_resume_modes(tmp_path):
    notes = []
    c = Checkpointer(tmp_path / "none-yet", "m", keep=-1, resume_mode="latest", resume_path=None, notes=notes)
    assert c.restore(_FakeTrainers()) is None
    assert "no checkpoint in" in notes[0] and "starting fresh" in notes[0]
    assert Checkpointer(tmp_path, "m", -1, "none", None).resolve_resume() is None
    with pytest.raises(FileNotFoundError, match="trainer.resume_path='/nope' is not a complete checkpoint"):
        Checkpointer(tmp_path, "m", -1, "from_path", "/nope").resolve_resume()
    p = _ckpt(tmp_path, 5)
    assert Checkpointer(tmp_path, "m", -1, "from_path", str(p)).resolve_resume() == p


def test_killed_between_marker_and_rename_is_not_latest(tmp_path):
    """The marker is written inside the temporary folder before the rename: a run killed between the
    two leaves a marked .tmp folder, which must not count (nor a file or odd name posing as a step)."""
    _ckpt(tmp_path, 3)
    tmp = tmp_path / ".tmp-global_step_4-77"
    (tmp / "policy").mkdir(parents=True)
    (tmp / MARKER).write_text("{}")
    (tmp_path / "global_step_5").write_text("not a folder")
    (tmp_path / "global_step_x6" / "policy").mkdir(parents=True)
    (tmp_path / "global_step_x6" / MARKER).write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step_3"


def test_interrupted_save_leaves_no_partial_folder_and_discard_is_per_process(tmp_path):
    c = Checkpointer(tmp_path, "m", keep=-1, resume_mode="latest", resume_path=None)
    with pytest.raises(KeyboardInterrupt):
        c.save(_FakeTrainers(fail=True), {"step": 1})
    assert os.listdir(tmp_path) == []
    mine = tmp_path / f".tmp-global_step_2-{os.getpid()}"  # as an actor still writing would leave it
    (mine / "policy").mkdir(parents=True)
    other = tmp_path / ".tmp-global_step_2-999999"  # another process's: not ours to delete
    other.mkdir()
    assert c.discard_partial() == [mine]
    assert sorted(os.listdir(tmp_path)) == [other.name]


def test_checkpoint_step_reads_the_marker_without_torch(tmp_path):
    d = tmp_path / "global_step_7"
    d.mkdir()
    assert checkpoint_step(d) is None  # no marker: not complete
    (d / MARKER).write_text('{"step": 9, "time": 1.0}')
    assert checkpoint_step(d) == 9  # the marker wins over the name
    (d / MARKER).write_text("not json")
    assert checkpoint_step(d) == 7  # an old or damaged marker: the folder name
    other = tmp_path / "renamed"
    other.mkdir()
    (other / MARKER).write_text("")
    assert checkpoint_step(other) is None
