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


def test_figures_label_every_panel_separate_scales_and_keep_curves_visible():
    """Read back the figure objects: y labels on every panel, KL and entropy on different axes,
    acc_strict and format_rate (equal here: both 0) in different line styles and markers, and the legend
    of the timing panel outside its axes (it cannot cover timing/step)."""
    import matplotlib.pyplot as plt

    from rlctl.plot import build_figures

    rows = [{"step": s, "reward/mean": 0.2 * s, "reward/accuracy_strict": 0.0, "reward/accuracy_flexible": 0.1 * s,
             "reward/format_rate": 0.0, "policy/kl": 1e-3 * s, "policy/entropy": 2.0 - 0.1 * s,
             "timing/generate": 30.0, "timing/train": 20.0, "timing/step": 55.0} for s in (1, 2, 3)]
    figs = build_figures(rows)
    try:
        assert sorted(figs) == ["kl", "reward", "step_time"]  # no eval / response-length data: no figure

        def panels(name):
            return [(ax.get_ylabel(), [ln.get_label() for ln in ax.get_lines()]) for ax in figs[name].axes]

        assert panels("kl") == [("KL to the reference model", ["policy/kl"]),
                                ("entropy (nats / token)", ["policy/entropy"])]
        assert panels("reward") == [
            ("reward (mean over rollouts)", ["reward/mean"]),
            ("fraction of rollouts", ["reward/accuracy_strict", "reward/accuracy_flexible", "reward/format_rate"])]
        assert panels("step_time") == [("seconds", ["timing/generate", "timing/train", "timing/step"])]
        assert figs["step_time"].axes[0].get_xlabel() == "step" and figs["kl"].axes[1].get_xlabel() == "step"

        lines = {ln.get_label(): ln for ln in figs["reward"].axes[1].get_lines()}
        strict, fmt = lines["reward/accuracy_strict"], lines["reward/format_rate"]
        assert list(strict.get_ydata()) == list(fmt.get_ydata()) == [0.0, 0.0, 0.0]
        assert (strict.get_linestyle(), strict.get_marker()) != (fmt.get_linestyle(), fmt.get_marker())
        assert strict.get_marker() != fmt.get_marker() and strict.get_linestyle() != fmt.get_linestyle()
        assert strict.get_markerfacecolor() == fmt.get_markerfacecolor() == "none"  # hollow: both show
        assert strict.get_markersize() > fmt.get_markersize()

        fig = figs["step_time"]
        fig.canvas.draw()
        ax = fig.axes[0]
        legend_box = ax.get_legend().get_window_extent()
        axes_box = ax.get_window_extent()
        assert legend_box.x0 >= axes_box.x1  # entirely right of the plotting area
        assert fig.bbox.x1 >= legend_box.x1  # and still inside the image
    finally:
        for f in figs.values():
            plt.close(f)
