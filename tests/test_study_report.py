"""The report of a study (`trl_thr.cli.study_report`) on fixture records whose values are known: intervals, paired
differences with the reference arm, slopes on p, minimum detectable effects, a missing run and a single seed."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from trl_thr.cli import study_report
from trl_thr.cli.study import run_name

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"grpo": {"thr_strategy": "none"}, "amplify:-0.5": {"thr_strategy": "amplify", "thr_p": -0.5},
        "amplify:0": {"thr_strategy": "amplify", "thr_p": 0.0}, "amplify:0.5": {"thr_strategy": "amplify", "thr_p": 0.5},
        "entropy20": {"thr_strategy": "none", "top_entropy_quantile": 0.2}}
GREEDY = {  # greedy accuracy by seed and arm: hand-chosen, so that every statistic below can be worked out
    0: {"grpo": 0.40, "amplify:-0.5": 0.30, "amplify:0": 0.40, "amplify:0.5": 0.50, "entropy20": 0.45},
    1: {"grpo": 0.50, "amplify:-0.5": 0.45, "amplify:0": 0.50, "amplify:0.5": 0.55, "entropy20": 0.50},
    2: {"grpo": 0.30, "amplify:-0.5": 0.30, "amplify:0": 0.35, "amplify:0.5": 0.40, "entropy20": 0.40},
}


def record(arm, seed, greedy, max_grad_norm=1.0):
    strategy = ARMS[arm]["thr_strategy"]
    p = ARMS[arm].get("thr_p", 0.0) if strategy == "amplify" else 0.0
    history = [{"step": s, "entropy": 0.1 * s, "reward": 0.5, "grad_norm": 0.5 if s % 2 else 2.0,
                **({"thr/kept_frac": 0.2, "thr/seconds": 9.0} if strategy != "none" else {})} for s in range(1, 13)]
    return {"arm": arm, "seed": seed, "overrides": ARMS[arm], "thr_strategy": strategy, "thr_p": p,
            "max_grad_norm": max_grad_norm, "train_config": {}, "train_seconds": 10.0, "eval_seconds": 2.0,
            "metrics": {"problems": 20, "ungradable": 0, "greedy_accuracy": greedy, "pass@1": greedy / 2,
                        "pass@2": greedy},
            "log_history": history}


def write_study(root: Path, records, seeds=(0, 1, 2), reference="grpo"):
    (root / "records").mkdir(parents=True)
    design = {"train": {}, "arms": ARMS, "evals": {"": {}}, "prepare": None, "reference_arm": reference,
              "contrasts": [["amplify:0.5", "amplify:-0.5"]]}
    (root / "study.json").write_text(json.dumps({"design": design, "seeds": list(seeds)}))
    for r in records:
        (root / "records" / f"{run_name(r['arm'], r['seed'])}.json").write_text(json.dumps(r))


def fixture(root, drop=()):
    records = [record(arm, seed, value) for seed, arms in GREEDY.items() for arm, value in arms.items()
               if (arm, seed) not in drop]
    write_study(root, records)
    return study_report.summarize(root)


def test_a_run_metrics_are_its_evaluation_final_entropy_and_training_averages():
    metrics = study_report.run_metrics(record("amplify:0.5", 0, 0.5))
    assert metrics["greedy_accuracy"] == 0.5 and "problems" not in metrics and "ungradable" not in metrics
    assert metrics["entropy"] == pytest.approx(0.1 * (3 + 12) / 2)  # steps 3..12, the last 10
    assert metrics["grad_norm"] == pytest.approx(1.25)
    assert metrics["clipped_frac"] == pytest.approx(0.5)  # 2.0 > 1.0 on even steps
    assert metrics["thr/kept_frac"] == pytest.approx(0.2) and "thr/seconds" not in metrics
    assert study_report.run_metrics(record("grpo", 0, 0.4, max_grad_norm=0))["clipped_frac"] == 0  # clipping off
    assert study_report.run_metrics(record("grpo", 0, 0.4, max_grad_norm=None))["clipped_frac"] == 0


def test_arm_intervals_by_hand(tmp_path):
    result = fixture(tmp_path)
    grpo = result["arms"]["grpo"]["greedy_accuracy"]
    # 0.4, 0.5, 0.3: mean 0.4, sd 0.1, t(0.975, 2) = 4.3027
    assert grpo["mean"] == pytest.approx(0.4) and grpo["n"] == 3
    assert grpo["ci95"] == pytest.approx(4.30265 * 0.1 / math.sqrt(3), rel=1e-5)
    assert result["seeds"]["grpo"] == [0, 1, 2]
    assert result["missing_runs"] == [] and result["runs"] == 15


def test_paired_differences_with_the_reference_by_hand(tmp_path):
    result = fixture(tmp_path)
    entropy20 = result["vs_grpo"]["entropy20"]["greedy_accuracy"]
    # entropy20 - grpo: 0.05, 0.00, 0.10: mean 0.05, sd 0.05, interval contains 0
    assert entropy20["values"] == pytest.approx([0.05, 0.0, 0.10])
    assert entropy20["ci95"] == pytest.approx(4.30265 * 0.05 / math.sqrt(3), rel=1e-5)
    assert entropy20["mde80"] == pytest.approx((4.30265 + 1.06066) * 0.05 / math.sqrt(3), rel=1e-5)
    assert "grpo" not in result["vs_grpo"]
    # A contrast between two arms: amplify:0.5 - amplify:-0.5 = 0.20, 0.10, 0.10
    contrast = result["contrasts"]["amplify:0.5 - amplify:-0.5"]["greedy_accuracy"]
    assert contrast["values"] == pytest.approx([0.2, 0.1, 0.1]) and contrast["seeds"] == [0, 1, 2]


def test_slopes_on_p_by_hand(tmp_path):
    result = fixture(tmp_path)
    slope = result["slopes"]["greedy_accuracy"]
    # per seed over p = -0.5, 0, 0.5: (y(0.5) - y(-0.5)) / 1 = 0.20, 0.10, 0.10
    assert slope["per_seed"] == pytest.approx([0.2, 0.1, 0.1])
    assert slope["mean"] == pytest.approx(0.4 / 3)
    sd = np.std([0.2, 0.1, 0.1], ddof=1)
    assert slope["ci95"] == pytest.approx(4.30265 * sd / math.sqrt(3), rel=1e-5)
    # [-0.010, 0.277] contains 0: the slope that 3 seeds would detect
    assert slope["mde80"] == pytest.approx((4.30265 + 1.06066) * sd / math.sqrt(3), rel=1e-5)
    assert slope["arms"] == {"amplify:-0.5": -0.5, "amplify:0": 0.0, "amplify:0.5": 0.5}
    assert [line["arms"] for line in result["slope_lines"]] == [slope["arms"]]  # grpo and entropy20 are on no line


def test_a_missing_run_leaves_its_seed_out_of_the_pairs_and_the_slopes(tmp_path):
    result = fixture(tmp_path, drop={("amplify:0", 1)})
    assert result["missing_runs"] == ["amplify_p0-s1"]
    assert result["arms"]["amplify:0"]["greedy_accuracy"]["n"] == 2
    assert result["slopes"]["greedy_accuracy"]["seeds"] == [0, 2]
    assert result["slopes"]["greedy_accuracy"]["per_seed"] == pytest.approx([0.2, 0.1])
    assert result["vs_grpo"]["amplify:0"]["greedy_accuracy"]["seeds"] == [0, 2]
    assert "Partial: 14 of 15 runs finished; missing: amplify_p0-s1" in study_report.markdown(result)


def test_a_single_seed_has_means_and_no_intervals(tmp_path):
    records = [record(arm, 0, value) for arm, value in GREEDY[0].items()]
    write_study(tmp_path, records, seeds=[0])
    result = study_report.summarize(tmp_path)
    assert result["arms"]["grpo"]["greedy_accuracy"]["ci95"] is None
    assert result["vs_grpo"]["entropy20"]["greedy_accuracy"]["mean"] == pytest.approx(0.05)
    assert result["vs_grpo"]["entropy20"]["greedy_accuracy"]["ci95"] is None
    assert result["slopes"]["greedy_accuracy"]["mean"] == pytest.approx(0.2)
    assert result["slopes"]["greedy_accuracy"]["mde80"] is None
    study_report.markdown(result)  # renders without intervals


def test_lines_with_other_fixed_fields_get_slopes_of_their_own():
    records = [record("amplify:-0.5", 0, 0.3), record("amplify:0.5", 0, 0.5)]
    for r, p in zip([record("amplify:-0.5", 0, 0.1), record("amplify:0.5", 0, 0.5)], (-0.5, 0.5)):
        r["arm"] = f"noclip{p:+}"
        r["overrides"] = {**r["overrides"], "max_grad_norm": 0}
        records.append(r)
    lines = study_report.dose_lines(records)
    assert [sorted(line["arms"]) for line in lines] == [["amplify:-0.5", "amplify:0.5"], ["noclip+0.5", "noclip-0.5"]]
    assert lines[1]["fixed"] == {"max_grad_norm": 0}
    assert study_report.line_slopes(records, lines[1], ["greedy_accuracy"])["greedy_accuracy"]["mean"] == \
        pytest.approx(0.4)


def test_the_report_files_are_written(tmp_path):
    fixture(tmp_path)
    result = study_report.write_report(tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert set(written) >= {"design", "arms", "slopes", "vs_grpo", "runs", "missing_runs"}
    assert written["arms"]["grpo"]["greedy_accuracy"]["mean"] == pytest.approx(0.4)
    assert written["design"]["arms_resolved"]["amplify:-0.5"]["thr_p"] == -0.5
    for name in ("results.md", "pass_at_k.png", "curves.png", "dose_response.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "entropy20 | +5.0 ± 12.4 (MDE 15.5)" in (tmp_path / "results.md").read_text()
    assert result["runs"] == 15


def test_the_committed_dose_study_reads_as_before(tmp_path):
    """The earlier layout (runs/<run>.json, study.json with args) gives the committed slopes again."""
    committed = ROOT / "benchmarks" / "steering" / "dose"
    if not (committed / "runs").is_dir():
        pytest.skip("the study's per-run records are in the repository, not in the source distribution")
    copy = tmp_path / "dose"
    shutil.copytree(committed, copy, ignore=shutil.ignore_patterns("*.png", "data"))
    result = study_report.summarize(copy)
    before = json.loads((committed / "results.json").read_text())
    assert result["runs"] == 96
    for metric in ("greedy_accuracy", "pass@32", "entropy"):
        assert result["slopes"][metric]["mean"] == pytest.approx(before["slopes"][metric]["mean"], rel=1e-9)
        assert result["slopes"][metric]["per_seed"] == pytest.approx(before["slopes"][metric]["per_seed"])
    assert result["arms"]["grpo"]["greedy_accuracy"]["mean"] == pytest.approx(
        before["arms"]["grpo"]["greedy_accuracy"]["mean"])


def test_runs_from_more_than_one_base_are_listed_by_base(tmp_path):
    """Seeds 0-1 from one base, seed 2 from another: the report lists them; a seed whose runs mix bases is named."""
    records = [{**record(arm, seed, value), "base_sha256": "aaaa" if seed < 2 else "bbbb"}
               for seed, arms in GREEDY.items() for arm, value in arms.items()]
    write_study(tmp_path / "split", records)
    result = study_report.summarize(tmp_path / "split")
    assert result["bases"] == {"aaaa": [0, 1], "bbbb": [2]}
    assert "Runs started from 2 base models (weights' sha256): aaaa: seeds 0, 1; bbbb: seeds 2.** Each seed's runs " \
        "share one base" in study_report.markdown(result)

    records[0] = {**records[0], "base_sha256": "bbbb"}  # one run of seed 0 from the other base
    write_study(tmp_path / "mixed", records)
    assert "Seeds [0] mix bases" in study_report.markdown(study_report.summarize(tmp_path / "mixed"))

    write_study(tmp_path / "one", [{**r, "base_sha256": "aaaa"} for r in records])
    assert "bases" not in study_report.summarize(tmp_path / "one")


@pytest.mark.parametrize("study, seeds", [("entropy-mask", 16), ("simple-equations", 16),
                                         ("simple-equations-noclip", 8)])
def test_the_committed_section_6_studies_give_what_science_md_quotes(study, seeds):
    """Each study's records give its committed results.json again, and docs/science.md quotes the primary
    contrasts as those records give them (mean and interval half-width, in points)."""
    committed = ROOT / "benchmarks" / "steering" / study
    if not (committed / "records").is_dir():
        pytest.skip("the study's per-run records are in the repository, not in the source distribution")
    result = study_report.summarize(committed)
    before = json.loads((committed / "results.json").read_text())
    assert result["missing_runs"] == [] and result["contrasts"] == before["contrasts"]
    assert {arm: len(s) for arm, s in result["seeds"].items()} == {arm: seeds for arm in result["arms"]}
    science = (ROOT / "docs" / "science.md").read_text()
    primary = ["positive-amplify - negative-amplify"] if "positive-amplify" in result["arms"] else []
    primary += ["dominant-only - entropy20"] if study == "entropy-mask" else []
    for name in primary:
        for metric in ("greedy_accuracy", "pass@32"):
            entry = result["contrasts"][name][metric]
            mean, half, mde = 100 * entry["mean"], 100 * entry["ci95"], 100 * entry["mde80"]
            if study == "entropy-mask":  # the primary table gives the interval's ends and the MDE
                quoted = f"| {mean:+.1f} | [{mean - half:+.1f}, {mean + half:+.1f}] | {mde:.1f} |"
            else:  # the replication table gives all 16 seeds in its last column
                quoted = f"| {mean:+.1f} ± {half:.1f} (MDE {mde:.1f}) |\n"
            assert quoted in science, (name, metric, quoted)


def test_every_arm_has_one_colour_on_every_panel_and_plot(tmp_path):
    """GRPO and the entropy arm log no thr/* metric: the THR panels leave them out and every other arm keeps its own
    colour there (matplotlib's colour cycle would shift them), the legend says which colour is which, and a metric
    logged at a single step is still drawn (a marker)."""
    from unittest.mock import patch

    import matplotlib.figure

    records = [record(arm, seed, value) for seed, arms in GREEDY.items() for arm, value in arms.items()]
    for r in records:
        if r["arm"] == "amplify:0":  # one logged step of thr/entropy_overlap
            r["log_history"][0]["thr/entropy_overlap"] = 0.9
    write_study(tmp_path, records)
    result = study_report.summarize(tmp_path)
    figures = []
    with patch.object(matplotlib.figure.Figure, "savefig", autospec=True,
                      side_effect=lambda figure, *args, **kwargs: figures.append(figure)):
        study_report.plot_curves(records, result, tmp_path / "curves.png")
        study_report.plot_pass_at_k(result, tmp_path / "pass_at_k.png")
    colours = study_report.arm_colours(result)
    assert len(set(colours.values())) == len(ARMS)
    drawn = {}
    for figure in figures:
        for axis in figure.axes:
            for line in axis.get_lines():
                if line.get_label() in ARMS:
                    drawn.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
                    title = axis.get_title()
                    if title.startswith("THR: dominant"):
                        assert line.get_label() == "amplify:0" and line.get_marker() == "o"
        for legend in figure.legends + [axis.get_legend() for axis in figure.axes if axis.get_legend()]:
            for handle, text in zip(legend.legend_handles, legend.get_texts()):
                if text.get_text() in ARMS:
                    assert matplotlib.colors.to_hex(handle.get_color()) == colours[text.get_text()]
    assert drawn == {arm: {colour} for arm, colour in colours.items()}


def test_zero_variance_is_not_an_mde_of_zero():
    assert study_report.fmt({"mean": 0.0, "ci95": 0.0, "mde80": 0.0, "n": 2}, percent=True, signed=True) == \
        "+0.0 (no variance)"
    assert study_report.fmt({"mean": 0.01, "ci95": 0.02, "mde80": 0.03, "n": 2}, percent=True) == "1.0 ± 2.0 (MDE 3.0)"


def test_the_arms_table_labels_each_column_with_its_own_arm_and_the_base_in_percent(tmp_path):
    """Arms in an order that is not sorted, each with its own value: every column under its own label; the base
    model's column in percent where the row is."""
    order = {"zeta": 0.10, "alpha": 0.30, "mid": 0.20}
    records = [{**record("grpo", seed, value), "arm": arm, "overrides": {"thr_strategy": "none"}}
               for arm, value in order.items() for seed in (0, 1)]
    (tmp_path / "records").mkdir()
    design = {"train": {}, "arms": {arm: {"thr_strategy": "none"} for arm in order}, "evals": {"": {}},
              "prepare": None, "reference_arm": None, "contrasts": []}
    (tmp_path / "study.json").write_text(json.dumps({"design": design, "seeds": [0, 1]}))
    for r in records:
        (tmp_path / "records" / f"{run_name(r['arm'], r['seed'])}.json").write_text(json.dumps(r))
    (tmp_path / "base-eval").mkdir()
    (tmp_path / "base-eval" / "base.json").write_text(json.dumps({"metrics": {"greedy_accuracy": 0.25}}))
    table = study_report.markdown(study_report.summarize(tmp_path))
    header = next(line for line in table.splitlines() if line.startswith("| metric | base |"))
    row = next(line for line in table.splitlines() if line.startswith("| greedy_accuracy (%) |"))
    labels = [cell.strip().split(" (n=")[0] for cell in header.strip("|").split("|")[2:]]
    values = [cell.strip() for cell in row.strip("|").split("|")]
    assert labels == list(order)
    assert values[1] == "25.0"  # the base, in percent
    assert values[2:] == [f"{100 * order[arm]:.1f} (no variance)" for arm in labels]
