"""Tables and plots of a steering study (`run_study.py`): mean and 95 % interval over seeds per arm.

    python benchmarks/steering/summarize.py benchmarks/steering/cpu

Writes `<study>/results.json` (per arm: every metric's mean, 95 % t-interval and per-seed values, the base model's
metrics, which runs are finished), `<study>/results.md` (the tables docs/science.md quotes), `<study>/pass_at_k.png`
and `<study>/curves.png` (reward, entropy and the thr/* metrics over training steps, mean over seeds).
"""

import json
import math
import re
import sys
from pathlib import Path

# Two-sided 95 % Student t quantiles by degrees of freedom (n - 1 seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
CURVES = (("reward", "reward (mean)"), ("entropy", "entropy (mean token)"),
          ("thr/kept_frac", "THR: fraction of tokens kept"), ("thr/mean_weight", "THR: mean token weight"),
          ("thr/pos_frac", "THR: fraction with THR > 0"), ("completions/mean_length", "completion length"))
# Averaged over each run's steps: the curves, the gradient norm before clipping, and the fraction of clipped steps.
AVERAGED = tuple(key for key, _ in CURVES) + ("thr/groups_skipped_frac", "grad_norm", "clipped_frac")
ARM_COLORS = {"grpo": "#555555", "positive-amplify": "#2e7d32", "negative-amplify": "#c62828",
              "dominant-only": "#1565c0"}


def interval(values: list[float]) -> dict:
    """Mean and the 95 % t-interval half-width of the mean over seeds (`None` for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci95": T95.get(n - 1, 1.96) * sd / math.sqrt(n), "n": n, "values": values}


def series(log_history: list[dict], key: str) -> dict[int, float]:
    return {e["step"]: float(e[key]) for e in log_history
            if e.get(key) is not None and not (isinstance(e[key], float) and math.isnan(e[key]))}


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
    if not (data / "test.jsonl").exists():
        return None
    read = lambda name: [json.loads(line)["question"] for line in (data / name).read_text().splitlines()]  # noqa: E731
    test, seen = read("test.jsonl"), set(read("train.jsonl")) | set(read("sft.jsonl"))
    seen_facts = {arithmetic_fact(q) for q in seen}
    return {"test_questions": len(test), "test_questions_in_training": sum(q in seen for q in test),
            "test_facts_in_training": sum(arithmetic_fact(q) in seen_facts for q in test)}


def load_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/record.json"))]


def summarize(root: Path) -> dict:
    study = json.loads((root / "study.json").read_text())
    records = load_records(root)
    arms = [a for a in study["args"]["arms"] if any(r["arm"] == a for r in records)]
    metric_keys = [k for k in records[0]["metrics"] if k not in ("problems", "ungradable")] if records else []
    result = {"study": study, "arms": {}, "finished_runs": sorted(f"{r['arm']}-s{r['seed']}" for r in records),
              "planned_runs": [f"{a}-s{s}" for s in study["args"]["seeds"] for a in study["args"]["arms"]]}
    base_path = root / "base-eval" / "base.json"
    if base_path.exists():
        result["base"] = json.loads(base_path.read_text())["metrics"]
    base_record = root / "base.json"
    if base_record.exists():
        result["base_model"] = json.loads(base_record.read_text())
    for arm in arms:
        runs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in runs],
                 "metrics": {k: interval([r["metrics"][k] for r in runs]) for k in metric_keys},
                 "train_seconds": interval([r["train_seconds"] for r in runs]),
                 "eval_seconds": interval([r["eval_seconds"] for r in runs])}
        for key in AVERAGED:
            averages = []
            for r in runs:
                values = list(series(r["log_history"], "grad_norm" if key == "clipped_frac" else key).values())
                if key == "clipped_frac":  # steps whose gradient norm exceeded max_grad_norm (clipped to it)
                    limit = r["train_config"].get("max_grad_norm", 1.0)
                    values = [float(v > limit) for v in values]
                if values:
                    averages.append(sum(values) / len(values))
            if len(averages) == len(runs) and runs:
                entry.setdefault("training_averages", {})[key] = interval(averages)
        result["arms"][arm] = entry
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


COMPACT = ("greedy_accuracy", "pass@1", "pass@2", "pass@4", "pass@8", "pass@16")


def markdown(result: dict, keys: tuple[str, ...] | None = None) -> str:
    """The results table (mean ± 95 % half-width over seeds, in %), restricted to `keys` if given, and the
    training averages."""
    arms = list(result["arms"])
    if not arms:
        return "No finished runs yet."
    lines = []
    planned, finished = result["planned_runs"], result["finished_runs"]
    if len(finished) < len(planned):
        missing = sorted(set(planned) - set(finished))
        lines.append(f"**Partial: {len(finished)} of {len(planned)} runs finished; missing: {', '.join(missing)}.**\n")
    seeds = {arm: len(result["arms"][arm]["seeds"]) for arm in arms}
    header = "| metric (%) | " + ("base | " if "base" in result else "") + " | ".join(
        f"{arm} (n={seeds[arm]})" for arm in arms) + " |"
    lines += [header, "|---|" + ("---|" if "base" in result else "") + "---|" * len(arms)]
    keys = [k for k in result["arms"][arms[0]]["metrics"] if keys is None or k in keys]
    order = sorted(keys, key=lambda k: (k != "greedy_accuracy", not k.startswith("mean@"),
                                        int(k.split("@")[1]) if k.startswith("pass@") else 0))
    for key in order:
        base = f"{100 * result['base'][key]:.1f} | " if "base" in result and key in result["base"] else (
            "- | " if "base" in result else "")
        lines.append(f"| {key} | {base}" + " | ".join(fmt(result["arms"][a]["metrics"][key]) for a in arms) + " |")
    lines.append("")
    lines.append("| training average | " + " | ".join(arms) + " |")
    lines.append("|---|" + "---|" * len(arms))
    for key in AVERAGED:
        cells = [result["arms"][a].get("training_averages", {}).get(key) for a in arms]
        if any(cells):
            lines.append(f"| {key} | " + " | ".join("-" if c is None else fmt(c, percent=False) for c in cells) + " |")
    lines.append("| train seconds per run | " + " | ".join(
        fmt(result["arms"][a]["train_seconds"], percent=False) for a in arms) + " |")
    return "\n".join(lines)


def plot_pass_at_k(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, entry in result["arms"].items():
        ks = sorted(int(k.split("@")[1]) for k in entry["metrics"] if k.startswith("pass@"))
        means = [100 * entry["metrics"][f"pass@{k}"]["mean"] for k in ks]
        half = [100 * (entry["metrics"][f"pass@{k}"]["ci95"] or 0) for k in ks]
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


def plot_curves(root: Path, result: dict, path: Path, smooth: int = 10) -> None:
    """Per arm the mean over seeds of each logged metric (moving average over `smooth` steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(root)
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
    (root / "results.md").write_text(table + "\n\nAll K:\n\n" + markdown(result) + "\n")
    if result["arms"]:
        plot_pass_at_k(result, root / "pass_at_k.png")
        plot_curves(root, result, root / "curves.png")
    print(table)


if __name__ == "__main__":
    main()
