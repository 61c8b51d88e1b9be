import json

from trl_thr.cli.summary import format_summary, metric_series, plot_metrics, summarize

HISTORY = [
    {"step": 1, "reward": 0.0, "thr/kept_frac": 0.2, "thr/p": 0.1, "rewards/accuracy/mean": 0.0},
    {"step": 2, "reward": 0.5, "thr/kept_frac": float("nan"), "thr/p": 0.1},
    {"step": 3, "reward": 0.5, "thr/kept_frac": 0.4, "thr/p": 0.1},
    {"step": 4, "reward": 1.0, "thr/kept_frac": 0.3, "thr/p": 0.1, "rewards/accuracy/mean": 1.0},
    {"step": 4, "eval_loss": 0.3},
    {"step": 4, "train_runtime": 10.0},
]


def test_summary_averages_and_windows():
    summary = summarize(HISTORY, seconds=12.34, steps=4)
    assert summary["reward_start"] == 0.0 and summary["reward_end"] == 1.0 and summary["reward_window"] == 1
    assert abs(summary["thr/kept_frac"] - 0.3) < 1e-9  # NaN (all groups skipped) is left out
    assert metric_series(HISTORY, "thr/kept_frac") == ([1, 3, 4], [0.2, 0.4, 0.3])
    text = format_summary(summary)
    assert "Trained 4 steps in 12 s." in text and "0.000 (first step) -> 1.000 (last step)" in text
    assert "kept_frac=0.3" in text
    json.dumps(summary)


def test_plot_has_a_panel_per_logged_metric(tmp_path):
    path = plot_metrics(HISTORY, tmp_path / "plot.png")
    assert path.stat().st_size > 10_000
    assert plot_metrics([{"step": 1, "loss": 0.1}], tmp_path / "none.png") is None
