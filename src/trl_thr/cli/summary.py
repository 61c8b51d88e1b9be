"""The end of a training run: a closing summary and a plot of reward and THR metrics over steps."""

import math
import time
from pathlib import Path

from transformers import TrainerCallback

from trl_thr.cli.errors import docs_url
from trl_thr.files import write_json_atomically

PLOTTED = (
    ("reward", "reward: per step (dots), rolling mean ± sd"),
    ("entropy", "policy entropy (mean per token)"),
    ("thr/kept_frac", "THR: fraction of tokens kept"),
    ("thr/mean_weight", "THR: mean token weight"),
    ("thr/pos_frac", "THR: fraction with THR > 0"),
    ("thr/abs_mean", "THR: mean |THR|"),
    ("thr/p", "THR: p"),
)
# Plotted only when it changes: a flat line at the configured value says nothing.
CONSTANT_UNLESS_SCHEDULED = ("thr/p",)
SMOKE_RUN_NOTE = ("This demo is a smoke run: it shows that generation, grading, THR and the update run on a real "
                  f"model, not that THR improves it. For evidence, see {docs_url('science.md')}.")


def metric_series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """`(steps, values)` of a logged metric, skipping entries without it and NaN (evaluation metrics are logged
    under other names, `eval_...`)."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def rolling(values: list[float], window: int) -> tuple[list[float], list[float]]:
    """Trailing rolling mean and sd of `values` over up to `window` steps (fewer at the start)."""
    stats = [mean_and_sd(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]
    return [m for m, _ in stats], [sd for _, sd in stats]


def reward_window(num_steps: int) -> int:
    """Steps averaged at the start and at the end: a quarter of the logged steps, at least one."""
    return max(1, num_steps // 4)


def steps_without_learning_signal(log_history: list[dict], key: str = "frac_no_learning_signal") -> int | None:
    """Optimizer steps whose generation batch carried no learning signal (every counted advantage 0), from the
    trainer's `frac_no_learning_signal` (a fraction per logging window, times the window's steps); `None` if the
    trainer logged none. With `key="thr/frac_no_positive"`: the steps whose positive set was empty."""
    total, previous_step, logged = 0.0, 0, False
    for entry in log_history:
        value = entry.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        total += float(value) * (entry["step"] - previous_step)
        previous_step, logged = entry["step"], True
    return round(total) if logged else None


def summarize(log_history: list[dict], seconds: float, steps: int) -> dict:
    """Steps, time, the reward at the start and the end with its spread, and the average of every `thr/*` metric.

    The start and end rewards are the mean ± sample sd of the per-step rewards over the first and the last quarter
    of the logged steps (at least one). A step's reward is a few prompts' completions, so it swings from step to
    step; `reward_change_within_noise` is true when the change is less than twice its standard error
    (`sqrt(sd_start² / w + sd_end² / w)`), and `None` when a window holds a single step (no spread to judge by).
    """
    summary = {"steps": steps, "seconds": round(seconds, 1)}
    _, rewards = metric_series(log_history, "reward")
    if rewards:
        window = reward_window(len(rewards))
        (start, start_sd), (end, end_sd) = mean_and_sd(rewards[:window]), mean_and_sd(rewards[-window:])
        standard_error = math.sqrt((start_sd**2 + end_sd**2) / window)
        summary.update(reward_window=window, reward_start=start, reward_start_sd=start_sd, reward_end=end,
                       reward_end_sd=end_sd,
                       reward_change_within_noise=None if window == 1 else abs(end - start) < 2 * standard_error)
    without_signal = steps_without_learning_signal(log_history)
    if without_signal is not None:
        summary["steps_without_learning_signal"] = without_signal
    without_positive = steps_without_learning_signal(log_history, "thr/frac_no_positive")
    if without_positive:
        summary["steps_without_thr"] = without_positive
    keys = sorted({key for entry in log_history for key in entry if key.startswith("thr/")})
    for key in keys:
        _, values = metric_series(log_history, key)
        if values:
            summary[key] = sum(values) / len(values)
    return summary


def format_summary(summary: dict, demo: bool = False) -> str:
    seconds = summary["seconds"]
    lines = [f"Trained {summary['steps']} step{'s' if summary['steps'] != 1 else ''} in "
             f"{seconds:.1f} s." if seconds < 10 else f"Trained {summary['steps']} steps in {seconds:.0f} s."]
    if "reward_start" in summary:
        window = summary["reward_window"]
        if window == 1:  # one step has no spread: no "± 0"
            lines.append(f"Reward of the first step: {summary['reward_start']:.3f}; of the last step: "
                         f"{summary['reward_end']:.3f}.")
        else:
            lines.append(f"Reward, mean ± sd over the first {window} steps: {summary['reward_start']:.3f} ± "
                         f"{summary['reward_start_sd']:.3f}; over the last {window} steps: "
                         f"{summary['reward_end']:.3f} ± {summary['reward_end_sd']:.3f}.")
        if summary["reward_change_within_noise"] is None:
            lines.append("One step at each end is too few to tell learning from sampling noise.")
        elif summary["reward_change_within_noise"]:
            lines.append("The change is within the step-to-step noise: it is no evidence of learning.")
    if summary.get("steps_without_learning_signal"):
        lines.append(f"{summary['steps_without_learning_signal']} of {summary['steps']} steps carried no learning "
                     "signal (every advantage 0, or every completion masked): see the warnings above.")
    if summary.get("steps_without_thr"):
        lines.append(f"In {summary['steps_without_thr']} of {summary['steps']} steps no completion reached "
                     "thr_positive_reward_threshold, so THR applied to no group and those updates were plain GRPO: "
                     "see the warnings above.")
    thr = {k: v for k, v in summary.items() if k.startswith("thr/")}
    if thr:
        lines.append("THR averages: " + ", ".join(f"{k[4:]}={v:.3g}" for k, v in thr.items()))
    if demo:
        lines.append(SMOKE_RUN_NOTE)
    return "\n".join(lines)


def plotted_panels(log_history: list[dict]) -> list[str]:
    """The metrics `plot_metrics` draws: those logged, less those in `CONSTANT_UNLESS_SCHEDULED` that never changed."""
    keys = []
    for key, _ in PLOTTED:
        _, values = metric_series(log_history, key)
        constant = bool(values) and max(values) - min(values) <= 1e-12 * max(1.0, abs(values[0]))
        if values and not (key in CONSTANT_UNLESS_SCHEDULED and constant):
            keys.append(key)
    return keys


def plot_metrics(log_history: list[dict], path: Path) -> Path | None:
    """A PNG with one panel per metric in `plotted_panels`; `None` if there is none.

    The reward panel shows each step's reward as a dot and the trailing rolling mean ± sd over `reward_window`
    steps as a line and band, so that step-to-step noise is not read as a trend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = dict(PLOTTED)
    keys = plotted_panels(log_history)
    if not keys:
        return None
    reward_parts = sorted({k for e in log_history for k in e if k.startswith("rewards/") and k.endswith("/mean")})
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        steps, values = metric_series(log_history, key)
        title = titles[key]
        if key == "reward":
            window = reward_window(len(values))
            means, sds = rolling(values, window)
            axis.plot(steps, values, linestyle="none", marker="o", markersize=3, alpha=0.5, label="per step")
            axis.plot(steps, means, label=f"rolling mean ({window} steps)")
            axis.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                              alpha=0.2, label="± sd")
            for part in reward_parts:
                part_steps, part_values = metric_series(log_history, part)
                axis.plot(part_steps, part_values, linestyle="--", linewidth=0.8, label=part.split("/")[1])
            axis.legend(fontsize=7)
            title = title.replace("rolling mean", f"rolling mean over {window}")
        else:
            axis.plot(steps, values, marker="o", markersize=3)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys) :]:
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class RunSummaryCallback(TrainerCallback):
    """Prints the closing summary and saves `thr_summary.json` and `thr_metrics.png` in `output_dir`.

    `demo`: the run is the embedded demo, and the summary says that it is a smoke run.
    """

    def __init__(self, plot: bool = True, demo: bool = False):
        self.plot = plot
        self.demo = demo
        self.started = None
        self.summary: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.summary = summarize(state.log_history, time.time() - self.started, state.global_step)
        write_json_atomically(output_dir / "thr_summary.json", self.summary, indent=2)
        print("\n" + format_summary(self.summary, demo=self.demo))
        if self.plot:
            plotted = plot_metrics(state.log_history, output_dir / "thr_metrics.png")
            if plotted is not None:
                print(f"Plot: {plotted}")
