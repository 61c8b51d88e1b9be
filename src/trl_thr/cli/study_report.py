"""The report of a `trl-thr study` directory: `results.json`, `results.md` and plots, from its run records.

Per run (`run_metrics`): the evaluation's metrics (greedy accuracy, mean@n, Pass@K for every K, as fractions), the
final entropy (mean of TRL's logged `entropy` over the last `FINAL_STEPS` steps), and training averages over all
steps: `reward`, `grad_norm` (before clipping), `clipped_frac` (share of steps whose gradient norm exceeded
`max_grad_norm`; 0 with clipping off), `completions/mean_length` and every `thr/*` metric but the timings.

`results.json`:

- `design`: the study's arms (fields and the `thr_strategy`, signed `thr_p` and `max_grad_norm` they train with),
  seeds, reference arm, train and eval configs;
- `arms`: arm -> metric -> `{"mean", "ci95", "n", "values", "mde80"}` (`trl_thr.cli.study_stats.mean_interval`);
- `vs_<reference arm>`: arm -> metric -> the arm minus the reference arm, paired by seed (with `seeds`);
- `contrasts`: `"a - b"` -> metric -> a minus b, paired by seed, for the study's `contrasts`;
- `slopes`: metric -> the per-seed least-squares slope on the signed p over the arms of the longest dose line
  (arms that differ only in `thr_strategy`/`thr_p`, among the amplify strategies and `dominant-only` at p = 0), with
  `arms`, `per_seed`, `seeds`; `slope_lines`: every such line with two or more values of p;
- `runs`, `finished_runs`, `planned_runs`, `missing_runs`, `base` (the base model's metrics), `seconds`;
- `base_warning`: only where a preparation recipe's fine-tuning ended below its `sft_target` (`base.json`): by how
  much, in one line;
- `bases`: only where the runs started from more than one base model: fingerprint of its weights (`base_sha256`,
  or "not recorded") -> seeds.

Every interval is over seeds; `mde80` is given where an interval contains 0. Records of an earlier layout
(`runs/<run>.json`, with `train_config` but no `overrides`) are read too.
"""

import json
import math
from collections import Counter
from pathlib import Path

from ..files import write_json_atomically, write_text_atomically
from .study import read_record, read_study_file, run_name
from .study_stats import mean_interval, paired_difference, slope_interval

FINAL_STEPS = 10  # the final entropy is the mean over this many last logged steps
TRAINING_AVERAGES = ("reward", "grad_norm", "clipped_frac", "completions/mean_length")
THR_TIMINGS = ("thr/seconds", "thr/forward_seconds", "thr/own_forward")
PRIMARY = ("greedy_accuracy", "pass@1", "pass@32", "entropy")  # the slopes' plots and the compact tables
CURVES = (("reward", "reward (mean)"), ("entropy", "entropy (mean token)"), ("grad_norm", "gradient norm"),
          ("thr/kept_frac", "THR: fraction of tokens kept"), ("thr/entropy_overlap", "THR: dominant ∩ top-20 % entropy"),
          ("completions/mean_length", "completion length"))
DOSE_STRATEGIES = ("positive-amplify", "negative-amplify", "amplify", "dominant-only")


# ---- per run --------------------------------------------------------------------------------------------------------


def series(log_history: list[dict], key: str) -> dict[int, float]:
    """`{step: value}` of one logged key, without missing or NaN values."""
    return {e["step"]: float(e[key]) for e in log_history
            if isinstance(e.get(key), (int, float)) and not math.isnan(e[key]) and "step" in e}


def strategy_and_p(record: dict) -> tuple[str, float]:
    """The `thr_strategy` and signed p a run trained with (records of the earlier layout: from `train_config`)."""
    from ..thr import signed_p

    if "thr_strategy" in record:
        return record["thr_strategy"], record["thr_p"]
    config = record["train_config"]
    return config["thr_strategy"], signed_p(config["thr_strategy"], config.get("thr_p", 0.1))


def max_grad_norm(record: dict) -> float | None:
    return record.get("max_grad_norm", record["train_config"].get("max_grad_norm", 1.0))


def is_percent(metric: str) -> bool:
    """Evaluation metrics are fractions shown in %; training ones as they are."""
    name = metric.rsplit("/", 1)[-1] if not metric.startswith(("thr/", "completions/")) else metric
    return name == "greedy_accuracy" or name.startswith(("pass@", "mean@"))


def run_metrics(record: dict) -> dict[str, float]:
    """A run's metrics: the evaluation's, the final entropy and the training averages."""
    metrics = {k: v for k, v in record["metrics"].items()
               if isinstance(v, (int, float)) and not k.rsplit("/", 1)[-1] in ("problems", "ungradable")}
    history = record["log_history"]
    entropy = [value for _, value in sorted(series(history, "entropy").items())]
    if entropy:
        metrics["entropy"] = sum(entropy[-FINAL_STEPS:]) / len(entropy[-FINAL_STEPS:])
    keys = {k for entry in history for k in entry if k.startswith("thr/") and k not in THR_TIMINGS}
    for key in (*TRAINING_AVERAGES, *sorted(keys)):
        logged = list(series(history, "grad_norm" if key == "clipped_frac" else key).values())
        if key == "clipped_frac":
            limit = max_grad_norm(record)
            logged = [float(limit is not None and limit > 0 and v > limit) for v in logged]
        if logged:
            metrics[key] = sum(logged) / len(logged)
    return metrics


def metric_order(key: str) -> tuple:
    """Evaluation metrics first (greedy, mean@n, pass@K by K), then entropy, then training averages."""
    name = key.rsplit("/", 1)[-1]
    evaluation = is_percent(key)
    prefix = key.rsplit("/", 1)[0] if evaluation and "/" in key else ""
    k = int(name.split("@")[1]) if evaluation and "@" in name else 0
    return (not evaluation, prefix, key != "entropy", name != "greedy_accuracy", not name.startswith("mean@"), k, key)


# ---- the study ------------------------------------------------------------------------------------------------------


def load_records(root: Path) -> list[dict]:
    """Every finished run's record: `records/<run>.json`, or an earlier layout's `runs/<run>.json` and
    `runs/<run>/record.json`."""
    paths = (sorted((root / "records").glob("*.json")) or sorted((root / "runs").glob("*.json"))
             or sorted((root / "runs").glob("*/record.json")))
    return [read_record(path) for path in paths]


def read_design(root: Path) -> tuple[list[str], list[int], str | None, dict]:
    """`(arms, seeds, reference arm, design)` from `study.json` (or an earlier layout's `args`)."""
    study = read_study_file(root)
    if "design" in study:
        design = study["design"]
        return list(design["arms"]), study["seeds"], design.get("reference_arm"), design
    args = study["args"]
    return args["arms"], args["seeds"], "grpo" if "grpo" in args["arms"] else None, {"args": args}


def dose_lines(records: list[dict]) -> list[dict]:
    """Groups of arms that differ only in their p: `{"fixed": the other fields, "arms": {arm: p}}`, each with two or
    more values of p, longest first."""
    lines: dict[str, dict] = {}
    for record in records:
        strategy, p = strategy_and_p(record)
        if strategy not in DOSE_STRATEGIES:
            continue
        fixed = {k: v for k, v in record.get("overrides", {}).items() if k not in ("thr_strategy", "thr_p")}
        line = lines.setdefault(json.dumps(fixed, sort_keys=True, default=str), {"fixed": fixed, "arms": {}})
        line["arms"][record["arm"]] = p
    found = [line for line in lines.values() if len(set(line["arms"].values())) >= 2]
    return sorted(found, key=lambda line: -len(line["arms"]))


def line_slopes(records: list[dict], line: dict, metrics: list[str]) -> dict:
    """Per metric, the slope on p over `line`'s arms, per seed over the seeds that finished every arm of it."""
    by_seed: dict[int, dict[str, dict]] = {}
    for record in records:
        if record["arm"] in line["arms"]:
            by_seed.setdefault(record["seed"], {})[record["arm"]] = run_metrics(record)
    complete = {seed: runs for seed, runs in by_seed.items() if set(runs) == set(line["arms"])}
    slopes = {}
    for metric in metrics:
        points = {seed: [(line["arms"][arm], values[metric]) for arm, values in runs.items()]
                  for seed, runs in complete.items() if all(metric in values for values in runs.values())}
        entry = slope_interval(points)
        if entry is not None:
            slopes[metric] = {**entry, "arms": line["arms"]}
    return slopes


def summarize(root: Path) -> dict:
    """The report's content (see the module docstring)."""
    planned_arms, seeds, reference, design = read_design(root)
    records = load_records(root)
    by_arm: dict[str, list[dict]] = {}
    for record in records:
        by_arm.setdefault(record["arm"], []).append(record)
    arms = [a for a in planned_arms if a in by_arm] + sorted(set(by_arm) - set(planned_arms))
    metrics_of = {(r["arm"], r["seed"]): run_metrics(r) for r in records}
    keys = sorted({k for values in metrics_of.values() for k in values}, key=metric_order)
    planned = [run_name(a, s) for s in seeds for a in planned_arms]
    finished = sorted(run_name(r["arm"], r["seed"]) for r in records)
    result = {
        "design": {**design, "arms_resolved": {}, "seeds": seeds, "reference_arm": reference,
                   "final_entropy_steps": FINAL_STEPS},
        "arms": {}, "runs": len(records), "finished_runs": finished, "planned_runs": planned,
        "missing_runs": [name for name in planned if name not in finished], "seeds": {}, "seconds": {},
    }
    for arm in arms:
        runs = sorted(by_arm[arm], key=lambda r: r["seed"])
        strategy, p = strategy_and_p(runs[0])
        result["design"]["arms_resolved"][arm] = {"thr_strategy": strategy, "thr_p": p,
                                                  "max_grad_norm": max_grad_norm(runs[0])}
        result["seeds"][arm] = [r["seed"] for r in runs]
        result["arms"][arm] = {key: mean_interval(values) for key in keys
                               if (values := [metrics_of[arm, r["seed"]][key] for r in runs
                                              if key in metrics_of[arm, r["seed"]]])}
        result["seconds"][arm] = {"train": mean_interval([r["train_seconds"] for r in runs]),
                                  "eval": mean_interval([r["eval_seconds"] for r in runs])}
    def paired(arm: str, other: str) -> dict:
        values = {r["seed"]: metrics_of[arm, r["seed"]] for r in by_arm[arm]}
        others = {r["seed"]: metrics_of[other, r["seed"]] for r in by_arm[other]}
        return {key: difference for key in keys if (difference := paired_difference(
            {s: v[key] for s, v in values.items() if key in v},
            {s: v[key] for s, v in others.items() if key in v})) is not None}

    if reference is not None and reference in by_arm:
        result[f"vs_{reference}"] = {arm: paired(arm, reference) for arm in arms if arm != reference}
    result["contrasts"] = {f"{a} - {b}": paired(a, b) for a, b in design.get("contrasts", [])
                           if a in by_arm and b in by_arm}
    lines = dose_lines(records)
    result["slope_lines"] = [{**line, "slopes": line_slopes(records, line, keys)} for line in lines]
    result["slopes"] = result["slope_lines"][0]["slopes"] if lines else {}
    bases = base_seeds(records)
    if len(bases) > 1:
        result["bases"] = bases
    if (root / "base.json").exists():  # a preparation recipe's record of the base model
        from .study_recipes import sft_target_missed

        missed = sft_target_missed(read_record(root / "base.json"))
        if missed is not None:
            result["base_warning"] = missed
    for base_path in (root / "base-eval" / "base.json", root / "base-eval.json"):
        if base_path.exists():
            result["base"] = read_record(base_path)["metrics"]
            break
    return result


# ---- tables ---------------------------------------------------------------------------------------------------------


def fmt(entry: dict | None, percent: bool, signed: bool = False, mde: bool = True) -> str:
    """`mean ± half-width` (in points for a percent metric), with the MDE where the interval contains 0 (for
    differences and slopes: `mde`)."""
    if entry is None:
        return "-"
    scale = 100 if percent else 1
    sign = "+" if signed else ""
    digits = ".1f" if percent else ".3g"
    text = f"{scale * entry['mean']:{sign}{digits}}"
    if entry.get("ci95") == 0:  # every seed gave the same value: an MDE of 0 would read as a sharp measurement
        return text + " (no variance)"
    if entry.get("ci95") is not None:
        text += f" ± {scale * entry['ci95']:{digits}}"
    if mde and entry.get("mde80") is not None:
        text += f" (MDE {scale * entry['mde80']:{digits}})"
    return text


def compact_keys(result: dict) -> list[str]:
    keys = {k for values in result["arms"].values() for k in values}
    shown = [k for k in keys if k.rsplit("/", 1)[-1] in ("greedy_accuracy", "pass@1", "pass@2", "pass@4", "pass@8",
                                                         "pass@16", "pass@32", "pass@64", "pass@256")
             or k == "entropy" or k.rsplit("/", 1)[-1] == f"pass@{max_k(k, keys)}"]
    return sorted(set(shown), key=metric_order)


def max_k(key: str, keys) -> int:
    prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    ks = [int(k.rsplit("@", 1)[1]) for k in keys if k.startswith(prefix + "pass@") and k.count("/") == key.count("/")]
    return max(ks) if ks else 0


def arms_table(result: dict, keys: list[str]) -> list[str]:
    arms = list(result["arms"])
    has_base = "base" in result
    lines = ["| metric | " + ("base | " if has_base else "") + " | ".join(
        f"{arm} (n={len(result['seeds'][arm])})" for arm in arms) + " |",
        "|---|" + ("---|" if has_base else "") + "---|" * len(arms)]
    for key in keys:
        percent = is_percent(key)
        base = ""
        if has_base:
            base = (f"{100 * result['base'][key]:.1f} | " if percent else f"{result['base'][key]:.3g} | ") \
                if key in result["base"] else "- | "
        label = f"{key} (%)" if percent else key
        lines.append(f"| {label} | {base}" + " | ".join(fmt(result["arms"][a].get(key), percent, mde=False) for a in arms)
                     + " |")
    return lines


def base_seeds(records: list[dict]) -> dict[str, list]:
    """`{fingerprint of the base model's weights (or "not recorded"): the seeds of the runs that started from it}`."""
    bases: dict[str, set] = {}
    for record in records:
        bases.setdefault(record.get("base_sha256") or "not recorded", set()).add(record["seed"])
    return {base: sorted(seeds) for base, seeds in bases.items()}


def markdown(result: dict) -> str:
    """The report as markdown: each arm's mean ± 95 % interval, the paired differences with the reference arm, the
    slopes on p, and every metric."""
    if not result["arms"]:
        return "No finished runs yet.\n"
    lines = []
    if result["missing_runs"]:
        missing = result["missing_runs"]
        listed = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more (results.json lists them)"
                                            if len(missing) > 12 else "")
        lines.append(f"**Partial: {len(result['finished_runs'])} of {len(result['planned_runs'])} runs finished; "
                     f"missing: {listed}.**\n")
    if "base_warning" in result:
        lines.append(f"**Warning: {result['base_warning']} (base.json).**\n")
    if "bases" in result:
        listed = "; ".join(f"{base}: seeds {', '.join(map(str, seeds))}" for base, seeds in result["bases"].items())
        counts = Counter(seed for seeds in result["bases"].values() for seed in seeds)
        shared = sorted(seed for seed, count in counts.items() if count > 1)
        lines.append(f"**Runs started from {len(result['bases'])} base models (weights' sha256): {listed}.** "
                     + (f"Seeds {shared} mix bases: their paired differences compare different starting "
                        "points.\n" if shared else "Each seed's runs share one base, so paired differences hold.\n"))
    lines.append("Mean ± half-width of the 95 % t-interval over seeds; accuracies in %. For differences and slopes, "
                 "(MDE x) is the minimum detectable effect at 80 % power, given where the interval contains 0.\n")
    training = sorted({k for values in result["arms"].values() for k in values if not is_percent(k)
                       and k != "entropy"}, key=metric_order)
    lines += arms_table(result, compact_keys(result)) + [""] + arms_table(result, training) + [""]
    reference = result["design"].get("reference_arm")
    paired = result.get(f"vs_{reference}", {})
    if paired:
        keys = [k for k in compact_keys(result) if any(k in paired[a] for a in paired)]
        lines += [f"Each arm minus {reference}, paired by seed:", "",
                  "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for arm, values in paired.items():
            lines.append(f"| {arm} | " + " | ".join(fmt(values.get(k), is_percent(k), signed=True) for k in keys)
                         + " |")
        lines.append("")
    for name, values in result["contrasts"].items():
        keys = [k for k in compact_keys(result) if k in values]
        lines += [f"{name}, paired by seed:", "", "| metric | difference | seeds |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(values[k], is_percent(k), signed=True)} | {len(values[k]['seeds'])} |" for k in keys]
        lines.append("")
    for line in result["slope_lines"]:
        fixed = ", ".join(f"{k}={v}" for k, v in line["fixed"].items()) or "the study's train config"
        arms = ", ".join(f"{arm} (p={p:+g})" for arm, p in line["arms"].items())
        lines += [f"Slope per unit p over {arms}; other fields: {fixed}:", "",
                  "| metric | slope | seeds |", "|---|---|---|"]
        for key in compact_keys(result):
            if key in line["slopes"]:
                entry = line["slopes"][key]
                lines.append(f"| {key} | {fmt(entry, is_percent(key), signed=True)} | {len(entry['seeds'])} |")
        lines.append("")
    lines += ["All metrics:", ""] + arms_table(result, sorted(
        {k for values in result["arms"].values() for k in values}, key=metric_order))
    return "\n".join(lines) + "\n"


# ---- plots ----------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def arm_colours(result: dict) -> dict[str, str]:
    """One colour per arm, the same on every panel and plot of a study (in the order of its arms)."""
    plt = _pyplot()
    arms = list(result["arms"])
    cycle = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20").colors
    return {arm: matplotlib_hex(cycle[index % len(cycle)]) for index, arm in enumerate(arms)}


def matplotlib_hex(rgb) -> str:
    return "#" + "".join(f"{round(255 * channel):02x}" for channel in rgb[:3])


def plot_pass_at_k(result: dict, path: Path) -> None:
    plt = _pyplot()
    colours = arm_colours(result)
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, metrics in result["arms"].items():
        ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("pass@"))
        axis.errorbar(ks, [100 * metrics[f"pass@{k}"]["mean"] for k in ks],
                      yerr=[100 * (metrics[f"pass@{k}"]["ci95"] or 0) for k in ks], marker="o", markersize=3,
                      capsize=2, label=arm, color=colours[arm])
    if "base" in result:
        ks = sorted(int(k.split("@")[1]) for k in result["base"] if k.startswith("pass@"))
        axis.plot(ks, [100 * result["base"][f"pass@{k}"] for k in ks], linestyle=":", color="black", label="base")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("K")
    axis.set_ylabel("Pass@K (%)")
    axis.set_title("Pass@K: mean and 95 % interval over seeds")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_dose_response(records: list[dict], result: dict, path: Path) -> None:
    """Each primary metric against p on the longest dose line: one thin line per seed, the mean with its 95 %
    interval, and the reference arm's mean and interval as a band."""
    plt = _pyplot()
    line = result["slope_lines"][0]
    metrics = [m for m in PRIMARY if m in line["slopes"]]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6), squeeze=False)
    dose = [r for r in records if r["arm"] in line["arms"]]
    reference = result["design"].get("reference_arm")
    for axis, metric in zip(axes[0], metrics):
        scale = 100 if is_percent(metric) else 1
        for seed in sorted({r["seed"] for r in dose}):
            points = sorted((line["arms"][r["arm"]], run_metrics(r).get(metric)) for r in dose if r["seed"] == seed)
            points = [(p, v) for p, v in points if v is not None]
            axis.plot([p for p, _ in points], [scale * v for _, v in points], color="#90a4ae", alpha=0.5, lw=0.8)
        ps = sorted(set(line["arms"].values()))
        stats = {}
        for p in ps:
            values = [run_metrics(r)[metric] for r in dose if line["arms"][r["arm"]] == p and metric in run_metrics(r)]
            if values:
                stats[p] = mean_interval(values)
        axis.errorbar(list(stats), [scale * s["mean"] for s in stats.values()],
                      yerr=[scale * (s["ci95"] or 0) for s in stats.values()], color="#1565c0", marker="o",
                      capsize=3, lw=2, label="mean, 95 % interval")
        band = result["arms"].get(reference, {}).get(metric) if reference not in line["arms"] else None
        if band is not None:
            axis.axhline(scale * band["mean"], color="#555555", ls="--", lw=1, label=f"{reference} mean")
            if band["ci95"] is not None:
                axis.axhspan(scale * (band["mean"] - band["ci95"]), scale * (band["mean"] + band["ci95"]),
                             color="#555555", alpha=0.12)
        slope = line["slopes"][metric]
        title = metric + (" (%)" if is_percent(metric) else "")
        if slope["ci95"] is not None:
            title += (f"\nslope {scale * slope['mean']:+.2f} ± {scale * slope['ci95']:.2f} per unit p")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("p")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("Dose-response: metrics against p (thin lines: one seed each)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_curves(records: list[dict], result: dict, path: Path, smooth: int = 10) -> None:
    """Per arm the mean over seeds of each logged metric (moving average over `smooth` steps)."""
    plt = _pyplot()
    colours = arm_colours(result)
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    for axis, (key, title) in zip(axes.flat, CURVES):
        for arm in result["arms"]:
            runs = [run for r in records if r["arm"] == arm and (run := series(r["log_history"], key))]
            if not runs:  # e.g. no thr/* metric in a GRPO arm: the panel leaves the arm out, its colour stays its own
                continue
            steps = sorted(set.intersection(*(set(run) for run in runs)))
            mean = [sum(run[s] for run in runs) / len(runs) for s in steps]
            smoothed = [sum(mean[max(0, i - smooth + 1) : i + 1]) / len(mean[max(0, i - smooth + 1) : i + 1])
                        for i in range(len(mean))]
            # Markers where a line has too few points to be seen as one (a single logged step draws nothing else).
            axis.plot(steps, smoothed, label=arm, color=colours[arm], marker="o" if len(steps) < 20 else None,
                      markersize=3)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    figure.legend([Line2D([], [], color=colours[arm]) for arm in result["arms"]], list(result["arms"]),
                  loc="lower center", ncol=min(len(result["arms"]), 6), fontsize=8, frameon=False)
    figure.suptitle(f"Training curves: mean over seeds, moving average of {smooth} steps", fontsize=10)
    rows = -(-len(result["arms"]) // 6)
    figure.tight_layout(rect=(0, 0.03 * rows + 0.02, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(root: Path) -> dict:
    """Write `results.json`, `results.md` and the plots of the study in `root`; returns the results."""
    result = summarize(root)
    write_json_atomically(root / "results.json", result)
    write_text_atomically(root / "results.md", markdown(result))
    if result["arms"]:
        records = load_records(root)
        plot_pass_at_k(result, root / "pass_at_k.png")
        plot_curves(records, result, root / "curves.png")
        if result["slopes"]:
            plot_dose_response(records, result, root / "dose_response.png")
    return result
