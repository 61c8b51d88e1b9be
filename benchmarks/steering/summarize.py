"""Tables, slopes and plots of a steering study (`run_study.py`): mean and 95 % interval over seeds per arm.

    python benchmarks/steering/summarize.py benchmarks/steering/dose

Reads one record per run (`runs/<run>/record.json` as `run_study.py` writes them, or `runs/<run>.json` as committed)
and writes:

- `results.json`: `{"design": {"arms", "seeds", ...}, "arms": {arm: {metric: {"mean", "ci95", "n", "values"}}},
  "slopes": {metric: {"mean", "ci95_low", "ci95_high", "mde80", "per_seed", "seeds"}}, "vs_grpo": {arm: {metric:
  ...}}, "runs": N, ...}`. Metrics are the evaluation's (`greedy_accuracy`, `pass@1` ... `pass@n`, fractions) and
  `entropy`, the mean of TRL's logged rollout entropy over the last `FINAL_STEPS` training steps. A slope is the
  least-squares slope of a metric on the signed `p` over the arms whose strategy reads `p` (and `dominant-only`,
  which is `p = 0`), computed per seed over the seeds that finished all of them;
- `results.md` (the tables docs/science.md quotes), `pass_at_k.png`, `curves.png` (reward, entropy and the thr/*
  metrics over training), and `dose_response.png` (each slope metric against `p`, per seed and mean with its
  95 % interval) when the study has arms at two or more values of `p`.
"""

import json
import math
import re
import sys
from pathlib import Path

# Two-sided 95 % and one-sided 80 % Student t quantiles by degrees of freedom; beyond the table, the normal ones.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042}
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879,
       11: 0.876, 12: 0.873, 13: 0.870, 14: 0.868, 15: 0.866, 16: 0.865, 17: 0.863, 18: 0.862, 19: 0.861, 20: 0.860,
       25: 0.856, 30: 0.854}
FINAL_STEPS = 10  # the final entropy is averaged over this many last training steps
SLOPE_METRICS = ("greedy_accuracy", "pass@1", "pass@32", "entropy")  # the primary analysis
CURVES = (("reward", "reward (mean)"), ("entropy", "entropy (mean token)"),
          ("thr/kept_frac", "THR: fraction of tokens kept"), ("thr/mean_weight", "THR: mean token weight"),
          ("thr/pos_frac", "THR: fraction with THR > 0"), ("completions/mean_length", "completion length"))
# Averaged over each run's steps: the curves, the gradient norm before clipping, and the fraction of clipped steps.
AVERAGED = tuple(key for key, _ in CURVES) + ("thr/groups_skipped_frac", "grad_norm", "clipped_frac")
ARM_COLORS = {"grpo": "#555555", "positive-amplify": "#2e7d32", "negative-amplify": "#c62828",
              "dominant-only": "#1565c0"}


def t_quantile(table: dict[int, float], dof: int, normal: float) -> float:
    """The quantile at `dof` degrees of freedom; between tabulated values the next lower one (conservative)."""
    below = [d for d in table if d <= dof]
    return table[max(below)] if dof <= max(table) else normal


def interval(values: list[float]) -> dict:
    """Mean and the 95 % t-interval half-width of the mean over seeds (`None` for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci95": t_quantile(T975, n - 1, 1.960) * sd / math.sqrt(n), "n": n, "values": values}


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through `(xs, ys)`."""
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - x_mean) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("a slope needs at least two distinct values of p.")
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / spread


def series(log_history: list[dict], key: str) -> dict[int, float]:
    return {e["step"]: float(e[key]) for e in log_history
            if e.get(key) is not None and not (isinstance(e[key], float) and math.isnan(e[key]))}


def arm_p(record: dict) -> float | None:
    """The signed `p` a run's token weights used (0 for `dominant-only`); `None` for GRPO, NTHR and other arms
    outside the dose-response line."""
    from trl_thr.thr import STRATEGIES_USING_P, signed_p

    config = record["train_config"]
    strategy = config["thr_strategy"]
    if strategy in STRATEGIES_USING_P or strategy == "dominant-only":
        return signed_p(strategy, config["thr_p"])
    return None


def run_metrics(record: dict) -> dict[str, float]:
    """The evaluation's metrics of a run (fractions) and its final training entropy."""
    metrics = {k: v for k, v in record["metrics"].items() if k not in ("problems", "ungradable")}
    entropy = list(series(record["log_history"], "entropy").items())
    if entropy:
        last = [value for _, value in sorted(entropy)[-FINAL_STEPS:]]
        metrics["entropy"] = sum(last) / len(last)
    return metrics


def metric_order(key: str) -> tuple:
    return (key != "greedy_accuracy", key == "entropy", not key.startswith("mean@"),
            int(key.split("@")[1]) if "@" in key else 0)


def arithmetic_fact(question: str) -> tuple | None:
    """`(operation, a, b)` of a question written by `run_study.fact_question`, or `None`."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    if len(numbers) != 2:
        return None
    for marker, operation in ((" + ", "add"), ("gets", "add"), (" - ", "sub"), ("gives away", "sub"), (" * ", "mul")):
        if marker in question:
            return operation, *numbers
    return None


def data_overlap(root: Path) -> dict | None:
    """How held-out the test split is: test questions (and their arithmetic facts) that occur in training data."""
    data = root / "data"
    if not all((data / name).exists() for name in ("test.jsonl", "train.jsonl", "sft.jsonl")):
        return None
    read = lambda name: [json.loads(line)["question"] for line in (data / name).read_text().splitlines()]  # noqa: E731
    test, seen = read("test.jsonl"), set(read("train.jsonl")) | set(read("sft.jsonl"))
    seen_facts = {arithmetic_fact(q) for q in seen}
    return {"test_questions": len(test), "test_questions_in_training": sum(q in seen for q in test),
            "test_facts_in_training": sum(arithmetic_fact(q) in seen_facts for q in test)}


def load_records(root: Path) -> list[dict]:
    """Every finished run's record, in the working layout (`runs/<run>/record.json`) or the committed one."""
    paths = sorted((root / "runs").glob("*/record.json")) or sorted((root / "runs").glob("*.json"))
    return [json.loads(p.read_text()) for p in paths]


def dose_slopes(records: list[dict], metrics: tuple[str, ...] = SLOPE_METRICS) -> dict:
    """Per metric: the per-seed least-squares slopes on `p` over the dose arms, their mean, 95 % t-interval and
    the minimum detectable slope at 80 % power (two-sided 5 %). Only seeds that finished every dose arm count."""
    dose = [r for r in records if arm_p(r) is not None]
    arms = sorted({r["arm"] for r in dose})
    if len({arm_p(r) for r in dose}) < 2:
        return {}
    by_seed: dict[int, list[dict]] = {}
    for record in dose:
        by_seed.setdefault(record["seed"], []).append(record)
    seeds = sorted(seed for seed, runs in by_seed.items() if sorted(r["arm"] for r in runs) == arms)
    slopes = {}
    for metric in metrics:
        per_seed = []
        for seed in seeds:
            runs = [(arm_p(r), run_metrics(r).get(metric)) for r in by_seed[seed]]
            if any(value is None for _, value in runs):
                break
            per_seed.append(least_squares_slope([p for p, _ in runs], [value for _, value in runs]))
        else:
            if not per_seed:
                continue
            stat = interval(per_seed)
            half = stat["ci95"]
            entry = {"mean": stat["mean"], "per_seed": per_seed, "seeds": seeds,
                     "ci95_low": None if half is None else stat["mean"] - half,
                     "ci95_high": None if half is None else stat["mean"] + half, "mde80": None}
            if half is not None:
                standard_error = half / t_quantile(T975, len(per_seed) - 1, 1.960)
                entry["mde80"] = (t_quantile(T975, len(per_seed) - 1, 1.960)
                                  + t_quantile(T80, len(per_seed) - 1, 0.842)) * standard_error
            slopes[metric] = entry
    return slopes


def paired_with_grpo(records: list[dict], metrics: list[str]) -> dict:
    """Per arm and metric: the arm minus GRPO, paired by seed (seeds where both finished)."""
    grpo = {r["seed"]: run_metrics(r) for r in records if r["arm"] == "grpo"}
    result = {}
    for arm in dict.fromkeys(r["arm"] for r in records if r["arm"] != "grpo"):
        runs = {r["seed"]: run_metrics(r) for r in records if r["arm"] == arm and r["seed"] in grpo}
        if runs:
            result[arm] = {m: {**interval([runs[s][m] - grpo[s][m] for s in sorted(runs)]), "seeds": sorted(runs)}
                           for m in metrics if all(m in runs[s] and m in grpo[s] for s in runs)}
    return result


def summarize(root: Path) -> dict:
    study = json.loads((root / "study.json").read_text())
    records = load_records(root)
    planned_arms, planned_seeds = study["args"]["arms"], study["args"]["seeds"]
    arms = [a for a in planned_arms if any(r["arm"] == a for r in records)]
    metric_keys = sorted(run_metrics(records[0]), key=metric_order) if records else []
    result = {
        "design": {"arms": planned_arms, "seeds": planned_seeds, "arm_p": {}, "slope_metrics": list(SLOPE_METRICS),
                   "final_entropy_steps": FINAL_STEPS, **{k: v for k, v in study["args"].items()
                                                          if k not in ("arms", "seeds")}},
        "arms": {}, "slopes": dose_slopes(records), "vs_grpo": paired_with_grpo(records, metric_keys),
        "runs": len(records), "finished_runs": sorted(f"{r['arm']}-s{r['seed']}" for r in records),
        "planned_runs": [f"{a}-s{s}" for s in planned_seeds for a in planned_arms],
        "seeds": {}, "training_averages": {}, "seconds": {},
    }
    for record in records:
        result["design"]["arm_p"][record["arm"]] = arm_p(record)
    for base_path in (root / "base-eval" / "base.json", root / "base-eval.json"):  # working, committed layout
        if base_path.exists():
            result["base"] = json.loads(base_path.read_text())["metrics"]
            break
    base_record = root / "base.json"
    if base_record.exists():
        result["base_model"] = json.loads(base_record.read_text())
    for arm in arms:
        runs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        values = [run_metrics(r) for r in runs]
        result["arms"][arm] = {k: interval([v[k] for v in values]) for k in metric_keys if all(k in v for v in values)}
        result["seeds"][arm] = [r["seed"] for r in runs]
        result["seconds"][arm] = {"train": interval([r["train_seconds"] for r in runs]),
                                  "eval": interval([r["eval_seconds"] for r in runs])}
        averages = {}
        for key in AVERAGED:
            per_run = []
            for r in runs:
                logged = list(series(r["log_history"], "grad_norm" if key == "clipped_frac" else key).values())
                if key == "clipped_frac":  # steps whose gradient norm exceeded max_grad_norm (clipped to it)
                    limit = r["train_config"].get("max_grad_norm", 1.0)
                    logged = [float(v > limit) for v in logged]
                if logged:
                    per_run.append(sum(logged) / len(logged))
            if per_run and len(per_run) == len(runs):
                averages[key] = interval(per_run)
        result["training_averages"][arm] = averages
    result["data_overlap"] = data_overlap(root)
    result["sources"] = sorted({(r.get("source_commit"), r.get("source_sha256")) for r in records})
    return result


def fmt(stat: dict, percent: bool = True) -> str:
    scale = 100 if percent else 1
    if stat["ci95"] is None:
        return f"{scale * stat['mean']:.1f}" if percent else f"{stat['mean']:.3g}"
    if percent:
        return f"{scale * stat['mean']:.1f} ± {scale * stat['ci95']:.1f}"
    return f"{stat['mean']:.3g} ± {stat['ci95']:.2g}"


COMPACT = ("greedy_accuracy", "pass@1", "pass@2", "pass@4", "pass@8", "pass@16", "pass@32", "entropy")


def is_percent(metric: str) -> bool:
    return metric != "entropy"


def markdown(result: dict, keys: tuple[str, ...] | None = None) -> str:
    """The results table (mean ± 95 % half-width over seeds; accuracies in %), restricted to `keys` if given, and
    the training averages."""
    arms = list(result["arms"])
    if not arms:
        return "No finished runs yet."
    lines = []
    planned, finished = result["planned_runs"], result["finished_runs"]
    if len(finished) < len(planned):
        missing = sorted(set(planned) - set(finished))
        lines.append(f"**Partial: {len(finished)} of {len(planned)} runs finished; missing: {', '.join(missing)}.**\n")
    has_base = "base" in result
    header = "| metric | " + ("base | " if has_base else "") + " | ".join(
        f"{arm} (n={len(result['seeds'][arm])})" for arm in arms) + " |"
    lines += [header, "|---|" + ("---|" if has_base else "") + "---|" * len(arms)]
    order = [k for k in result["arms"][arms[0]] if keys is None or k in keys]
    for key in sorted(order, key=metric_order):
        percent = is_percent(key)
        base = ""
        if has_base:
            base = f"{100 * result['base'][key]:.1f} | " if key in result["base"] else "- | "
        label = f"{key} (%)" if percent else key
        lines.append(f"| {label} | {base}" + " | ".join(
            fmt(result["arms"][a][key], percent) if key in result["arms"][a] else "-" for a in arms) + " |")
    lines.append("")
    lines.append("| training average | " + " | ".join(arms) + " |")
    lines.append("|---|" + "---|" * len(arms))
    for key in AVERAGED:
        cells = [result["training_averages"][a].get(key) for a in arms]
        if any(cells):
            lines.append(f"| {key} | " + " | ".join("-" if c is None else fmt(c, percent=False) for c in cells) + " |")
    lines.append("| train seconds per run | " + " | ".join(
        fmt(result["seconds"][a]["train"], percent=False) for a in arms) + " |")
    return "\n".join(lines)


def slopes_markdown(result: dict) -> str:
    """The primary analysis: mean slope per unit of p with its interval and minimum detectable effect, and each
    arm minus GRPO."""
    slopes = result["slopes"]
    if not slopes:
        return ""
    lines = ["| metric | slope per unit p (mean) | 95 % interval | seeds | minimum detectable slope (80 % power) |",
             "|---|---|---|---|---|"]
    for metric in SLOPE_METRICS:
        if metric not in slopes:
            continue
        entry, scale = slopes[metric], 100 if is_percent(metric) else 1
        unit, digits = (" points", 2) if is_percent(metric) else ("", 4)
        low, high, mde = entry["ci95_low"], entry["ci95_high"], entry["mde80"]
        span = "-" if low is None else f"[{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
        lines.append(f"| {metric} | {scale * entry['mean']:+.{digits}f}{unit} | {span} | {len(entry['per_seed'])} | "
                     + ("-" if mde is None else f"±{scale * mde:.{digits}f}{unit}") + " |")
    arms = [a for a in result["vs_grpo"] if result["vs_grpo"][a]]
    if arms:
        lines += ["", "| arm minus GRPO, paired by seed | " + " | ".join(SLOPE_METRICS) + " |",
                  "|---|" + "---|" * len(SLOPE_METRICS)]
        for arm in arms:
            cells = []
            for metric in SLOPE_METRICS:
                stat = result["vs_grpo"][arm].get(metric)
                if stat is None:
                    cells.append("-")
                elif is_percent(metric):
                    cells.append(f"{100 * stat['mean']:+.1f}" + ("" if stat["ci95"] is None
                                                                  else f" ± {100 * stat['ci95']:.1f}"))
                else:
                    cells.append(f"{stat['mean']:+.4f}" + ("" if stat["ci95"] is None else f" ± {stat['ci95']:.4f}"))
            lines.append(f"| {arm} (n={result['vs_grpo'][arm][SLOPE_METRICS[0]]['n']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pass_at_k(result: dict, path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, metrics in result["arms"].items():
        ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("pass@"))
        means = [100 * metrics[f"pass@{k}"]["mean"] for k in ks]
        half = [100 * (metrics[f"pass@{k}"]["ci95"] or 0) for k in ks]
        axis.errorbar(ks, means, yerr=half, marker="o", markersize=3, capsize=2, label=f"{arm}",
                      color=ARM_COLORS.get(arm))
    if "base" in result:
        ks = sorted(int(k.split("@")[1]) for k in result["base"] if k.startswith("pass@"))
        axis.plot(ks, [100 * result["base"][f"pass@{k}"] for k in ks], linestyle=":", color="black", label="base")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("K")
    axis.set_ylabel("Pass@K (%), held-out split")
    axis.set_title("Pass@K: mean and 95 % interval over seeds")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_dose_response(records: list[dict], result: dict, path: Path) -> None:
    """Each slope metric against p: one thin line per seed, the mean over seeds with its 95 % interval, and
    GRPO's mean and interval as a band."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(SLOPE_METRICS), figsize=(4 * len(SLOPE_METRICS), 3.6))
    dose = [r for r in records if arm_p(r) is not None]
    ps = sorted({arm_p(r) for r in dose})
    for axis, metric in zip(axes, SLOPE_METRICS):
        scale = 100 if is_percent(metric) else 1
        for seed in sorted({r["seed"] for r in dose}):
            points = sorted((arm_p(r), run_metrics(r).get(metric)) for r in dose if r["seed"] == seed)
            points = [(p, v) for p, v in points if v is not None]
            axis.plot([p for p, _ in points], [scale * v for _, v in points], color="#90a4ae", alpha=0.5, lw=0.8)
        stats = {}
        for p in ps:
            values = [run_metrics(r)[metric] for r in dose if arm_p(r) == p and metric in run_metrics(r)]
            if values:
                stats[p] = interval(values)
        axis.errorbar(list(stats), [scale * s["mean"] for s in stats.values()],
                      yerr=[scale * (s["ci95"] or 0) for s in stats.values()], color="#1565c0", marker="o",
                      capsize=3, lw=2, label="amplify: mean, 95 % interval")
        grpo = result["arms"].get("grpo", {}).get(metric)
        if grpo is not None:
            axis.axhline(scale * grpo["mean"], color="#555555", ls="--", lw=1, label="GRPO mean")
            if grpo["ci95"] is not None:
                axis.axhspan(scale * (grpo["mean"] - grpo["ci95"]), scale * (grpo["mean"] + grpo["ci95"]),
                             color="#555555", alpha=0.12)
        slope = result["slopes"].get(metric)
        title = metric + (" (%)" if is_percent(metric) else "")
        if slope is not None and slope["ci95_low"] is not None:
            title += f"\nslope {scale * slope['mean']:+.2f} [{scale * slope['ci95_low']:+.2f}, " \
                     f"{scale * slope['ci95_high']:+.2f}] per unit p"
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("p")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Dose-response: held-out metrics and final entropy against p (thin lines: one seed each)",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_curves(records: list[dict], result: dict, path: Path, smooth: int = 10) -> None:
    """Per arm the mean over seeds of each logged metric (moving average over `smooth` steps)."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    for axis, (key, title) in zip(axes.flat, CURVES):
        for arm in result["arms"]:
            runs = [series(r["log_history"], key) for r in records if r["arm"] == arm]
            runs = [run for run in runs if run]
            if not runs:
                continue
            steps = sorted(set.intersection(*(set(run) for run in runs)))
            mean = [sum(run[s] for run in runs) / len(runs) for s in steps]
            smoothed = [sum(mean[max(0, i - smooth + 1) : i + 1]) / len(mean[max(0, i - smooth + 1) : i + 1])
                        for i in range(len(mean))]
            axis.plot(steps, smoothed, label=arm, color=ARM_COLORS.get(arm))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=8)
    figure.suptitle(f"Training curves: mean over seeds, moving average of {smooth} steps", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0])
    result = summarize(root)
    (root / "results.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown(result, COMPACT)
    slopes = slopes_markdown(result)
    (root / "results.md").write_text(table + ("\n\nSlopes on p:\n\n" + slopes if slopes else "")
                                     + "\n\nAll K:\n\n" + markdown(result) + "\n")
    if result["arms"]:
        records = load_records(root)
        plot_pass_at_k(result, root / "pass_at_k.png")
        plot_curves(records, result, root / "curves.png")
        if result["slopes"]:
            plot_dose_response(records, result, root / "dose_response.png")
    print(table + ("\n\n" + slopes if slopes else ""))


if __name__ == "__main__":
    main()
