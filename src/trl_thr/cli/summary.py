"""The end of a training run: a closing summary and a plot of reward and THR metrics over steps."""

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

PLOTTED = (
    ("reward", "reward (mean)"),
    ("thr/kept_frac", "THR: fraction of tokens kept"),
    ("thr/mean_weight", "THR: mean token weight"),
    ("thr/pos_frac", "THR: fraction with THR > 0"),
    ("thr/abs_mean", "THR: mean |THR|"),
    ("thr/p", "THR: p"),
)


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


def summarize(log_history: list[dict], seconds: float, steps: int) -> dict:
    """Steps, time, reward at the start and the end, and the average of every logged `thr/*` metric.

    The start and end rewards average the first and last quarter of the logged steps (at least one), since a single
    step's reward is a handful of samples.
    """
    summary = {"steps": steps, "seconds": round(seconds, 1)}
    _, rewards = metric_series(log_history, "reward")
    if rewards:
        window = max(1, len(rewards) // 4)
        summary["reward_window"] = window
        summary["reward_start"] = sum(rewards[:window]) / window
        summary["reward_end"] = sum(rewards[-window:]) / window
    keys = sorted({key for entry in log_history for key in entry if key.startswith("thr/")})
    for key in keys:
        _, values = metric_series(log_history, key)
        if values:
            summary[key] = sum(values) / len(values)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"Trained {summary['steps']} steps in {summary['seconds']:.0f} s."]
    if "reward_start" in summary:
        window = summary["reward_window"]
        span = "step" if window == 1 else f"{window} steps"
        start, end = summary["reward_start"], summary["reward_end"]
        lines.append(f"Reward: {start:.3f} (first {span}) -> {end:.3f} (last {span})")
    thr = {k: v for k, v in summary.items() if k.startswith("thr/")}
    if thr:
        lines.append("THR averages: " + ", ".join(f"{k[4:]}={v:.3g}" for k, v in thr.items()))
    return "\n".join(lines)


def plot_metrics(log_history: list[dict], path: Path) -> Path | None:
    """A PNG with one panel per metric that was logged; `None` if none was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title, *metric_series(log_history, key)) for key, title in PLOTTED]
    panels = [panel for panel in panels if panel[2]]
    reward_parts = sorted({k for e in log_history for k in e if k.startswith("rewards/") and k.endswith("/mean")})
    if not panels:
        return None
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis, (key, title, steps, values) in zip(axes.flat, panels):
        axis.plot(steps, values, marker="o", markersize=3, label=key)
        if key == "reward":
            for part in reward_parts:
                part_steps, part_values = metric_series(log_history, part)
                axis.plot(part_steps, part_values, linestyle="--", label=part.split("/")[1])
            if reward_parts:
                axis.legend(fontsize=7)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class RunSummaryCallback(TrainerCallback):
    """Prints the closing summary and saves `thr_summary.json` and `thr_metrics.png` in `output_dir`."""

    def __init__(self, plot: bool = True):
        self.plot = plot
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
        (output_dir / "thr_summary.json").write_text(json.dumps(self.summary, indent=2))
        print("\n" + format_summary(self.summary))
        if self.plot:
            plotted = plot_metrics(state.log_history, output_dir / "thr_metrics.png")
            if plotted is not None:
                print(f"Plot: {plotted}")
