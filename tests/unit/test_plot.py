import json

import pytest

from rlctl.plot import plot_run, read_metrics


def test_plot_writes_pngs(tmp_path):
    rows = [{"step": 0, "eval/accuracy_strict": 0.1, "eval/accuracy_flexible": 0.2},
            {"step": 1, "reward/mean": 0.5, "response_length/mean": 40, "timing/step": 3.0, "policy/kl": 0.01},
            {"step": 2, "reward/mean": 0.7, "response_length/mean": 42, "timing/step": 2.5, "policy/kl": 0.02}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = plot_run(tmp_path)
    assert sorted(f.name for f in files) == ["eval_accuracy.png", "kl.png", "response_length.png", "reward.png",
                                             "step_time.png"]
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)


def test_plot_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_metrics(tmp_path)


def test_step_axis_has_whole_number_ticks(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    rows = [{"step": s, "reward/mean": 0.1 * s} for s in (1, 2, 3)]  # 3 steps: default ticks would be 1.0, 1.25, ...
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ticks = {}
    save = Figure.savefig

    def spy(fig, path, *a, **k):
        lo, hi = fig.axes[0].get_xlim()
        ticks[str(path)] = [t for t in fig.axes[0].get_xticks() if lo <= t <= hi]
        return save(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", spy)
    plot_run(tmp_path)
    (reward,) = ticks.values()
    assert reward == [1.0, 2.0, 3.0]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")  # one step
    ticks.clear()
    plot_run(tmp_path)
    assert list(ticks.values()) == [[1.0]]
    rows = [{"step": s, "reward/mean": 0.1} for s in range(1, 41)]  # many steps: whole numbers, not all of them
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ticks.clear()
    plot_run(tmp_path)
    (many,) = ticks.values()
    assert 2 < len(many) < 40 and all(t == int(t) for t in many)


def test_incomplete_last_line_is_skipped_and_empty_file_is_an_error(tmp_path):
    rows = [{"step": 1, "reward/mean": 0.5}, {"step": 2, "reward/mean": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: incomplete last line skipped"):
        assert read_metrics(tmp_path) == rows
    with pytest.warns(UserWarning):
        assert [f.name for f in plot_run(tmp_path)] == ["reward.png"]
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl has no rows to plot yet"):
        plot_run(tmp_path)
