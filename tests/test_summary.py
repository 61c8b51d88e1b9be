import json

from trl_thr.cli.summary import (SMOKE_RUN_NOTE, format_summary, metric_series, plot_metrics, plotted_panels,
                                 rolling, steps_without_learning_signal, summarize)

HISTORY = [
    {"step": 1, "reward": 0.0, "thr/kept_frac": 0.2, "thr/p": 0.1, "entropy": 1.5, "rewards/accuracy/mean": 0.0},
    {"step": 2, "reward": 0.5, "thr/kept_frac": float("nan"), "thr/p": 0.1, "entropy": 1.4},
    {"step": 3, "reward": 0.5, "thr/kept_frac": 0.4, "thr/p": 0.1, "entropy": 1.2},
    {"step": 4, "reward": 1.0, "thr/kept_frac": 0.3, "thr/p": 0.1, "entropy": 1.1, "rewards/accuracy/mean": 1.0},
    {"step": 4, "eval_loss": 0.3},
    {"step": 4, "train_runtime": 10.0},
]


def noisy_history(rewards):
    return [{"step": i + 1, "reward": r} for i, r in enumerate(rewards)]


def test_summary_averages_and_windows():
    summary = summarize(HISTORY, seconds=12.34, steps=4)
    assert summary["reward_start"] == 0.0 and summary["reward_end"] == 1.0 and summary["reward_window"] == 1
    assert summary["reward_change_within_noise"] is None  # one step per window: no spread to judge by
    assert abs(summary["thr/kept_frac"] - 0.3) < 1e-9  # NaN (all groups skipped) is left out
    assert metric_series(HISTORY, "thr/kept_frac") == ([1, 3, 4], [0.2, 0.4, 0.3])
    text = format_summary(summary)
    assert "Trained 4 steps in 12 s." in text and "Reward of the first step: 0.000; of the last step: 1.000." in text
    assert "±" not in text.split("Reward")[1].splitlines()[0]  # one step has no spread to show
    short = format_summary(summarize(HISTORY[:2], seconds=0.42, steps=2))
    assert short.startswith("Trained 2 steps in 0.4 s.")  # not "in 0 s"
    assert "too few to tell learning from sampling noise" in text
    assert "kept_frac=0.3" in text and SMOKE_RUN_NOTE not in text
    json.dumps(summary)


def test_reward_change_is_judged_against_its_spread():
    # The demo's case: 12 steps of one prompt each, the last three happen to be luckier.
    noisy = summarize(noisy_history([0.0, 0.125, 0.0, 0.5, 0.0, 0.25, 0.0, 0.375, 0.125, 0.5, 0.0, 0.5]), 1.0, 12)
    assert noisy["reward_window"] == 3 and noisy["reward_start"] == 0.125 / 3
    assert abs(noisy["reward_start_sd"] - 0.0722) < 1e-3 and abs(noisy["reward_end_sd"] - 0.2887) < 1e-3
    assert noisy["reward_change_within_noise"]
    text = format_summary(noisy, demo=True)
    assert "over the first 3 steps: 0.042 ± 0.072; over the last 3 steps: 0.333 ± 0.289." in text
    assert "within the step-to-step noise: it is no evidence of learning" in text
    assert "smoke run" in text and "https://github.com/trl-thr/trl-thr/blob/main/docs/science.md" in text
    steady = summarize(noisy_history([0.1, 0.12, 0.11, 0.5, 0.6, 0.7, 0.8, 0.81, 0.8]), 1.0, 9)
    assert steady["reward_window"] == 2 and steady["reward_change_within_noise"] is False
    assert "no evidence" not in format_summary(steady)


def test_rolling_mean_and_sd():
    means, sds = rolling([0.0, 1.0, 0.0, 1.0], window=2)
    assert means == [0.0, 0.5, 0.5, 0.5]
    assert sds[0] == 0.0 and abs(sds[1] - 0.7071) < 1e-4


def test_plot_panels_skip_a_constant_p_and_show_entropy(tmp_path):
    assert plotted_panels(HISTORY) == ["reward", "entropy", "thr/kept_frac"]  # p stays at 0.1: no panel
    scheduled = [{**entry, "thr/p": 0.1 * entry["step"]} for entry in HISTORY[:4]]
    assert "thr/p" in plotted_panels(scheduled)
    path = plot_metrics(HISTORY, tmp_path / "plot.png")
    assert path.stat().st_size > 10_000
    assert plot_metrics([{"step": 1, "loss": 0.1}], tmp_path / "none.png") is None


def test_steps_without_learning_signal_are_counted_over_logging_windows():
    # logged every 2 steps: the fraction of each window's generation batches that carried no signal
    history = [{"step": 2, "reward": 1.0, "frac_no_learning_signal": 1.0},
               {"step": 4, "reward": 1.0, "frac_no_learning_signal": 0.5},
               {"step": 6, "reward": 0.5, "frac_no_learning_signal": 0.0},
               {"step": 6, "train_runtime": 3.0}]
    assert steps_without_learning_signal(history) == 3
    assert steps_without_learning_signal(HISTORY) is None  # a trainer that logs no such metric
    summary = summarize(history, seconds=3.0, steps=6)
    assert summary["steps_without_learning_signal"] == 3
    assert "3 of 6 steps carried no learning signal (every advantage 0, or every completion masked)" in \
        format_summary(summary)
    quiet = summarize([{**entry, "frac_no_learning_signal": 0.0} for entry in history[:3]], seconds=3.0, steps=6)
    assert "learning signal" not in format_summary(quiet)
