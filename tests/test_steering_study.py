"""The steering study's arms and its analysis (`benchmarks/steering/run_study.py`, `summarize.py`).

The analysis is checked on synthetic run records whose slopes and differences are known, against numpy's
least-squares fit and a direct paired difference.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trl_thr.thr import STRATEGIES_USING_P, signed_p, thr_weights

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "steering"))

import run_study  # noqa: E402
import summarize  # noqa: E402


@pytest.mark.parametrize(
    "arm, expected",
    [
        ("grpo", ("none", 0.0)),
        ("positive-amplify", ("positive-amplify", 0.1)),
        ("negative-amplify", ("negative-amplify", -0.1)),
        ("dominant-only", ("dominant-only", 0.0)),
        ("amplify:-0.25", ("amplify", -0.25)),
        ("amplify:0", ("amplify", 0.0)),
        ("positive-amplify:0.3", ("positive-amplify", 0.3)),
    ],
)
def test_arms_name_a_strategy_and_its_signed_p(arm, expected):
    assert run_study.parse_arm(arm, 0.1) == expected


@pytest.mark.parametrize(
    "arm, message",
    [("amplfy:0.1", "neither 'grpo' nor a thr_strategy"), ("dominant-only:0.2", "does not use p"),
     ("amplify:half", "is not a number")],
)
def test_bad_arms_are_refused_before_any_work(arm, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_study.parse_arm(arm, 0.1)
    with pytest.raises(SystemExit, match="--arms"):
        run_study.main(["--output_dir", str(tmp_path / "study"), "--arms", "grpo", arm])
    assert not (tmp_path / "study").exists()


def test_run_names_keep_colons_out_of_paths():
    assert run_study.run_name("amplify:-0.25", 3) == "amplify_p-0.25-s3"
    assert run_study.run_name("grpo", 0) == "grpo-s0"


def test_the_study_config_carries_the_arms_p():
    args = run_study.parse_args(["--output_dir", "x", "--thr_p", "0.2"])
    task = {"train": "train.jsonl"}
    for arm, strategy, p in [("grpo", "none", 0.0), ("negative-amplify", "negative-amplify", -0.2),
                             ("amplify:0.5", "amplify", 0.5)]:
        config = run_study.train_config(args, arm, 1, "base", task, Path("out"))
        assert (config["thr_strategy"], config["thr_p"], config["seed"]) == (strategy, p, 1)


def test_signed_p_is_the_p_the_weights_use():
    """`signed_p` is the rule `thr_weights` applies: weights of `strategy` at p equal `amplify` at signed_p."""
    thr = torch.tensor(np.random.default_rng(0).normal(size=(4, 5)), dtype=torch.float32)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(4, 5)
    taus = torch.tensor([0.3, 0.3])
    for strategy in (*STRATEGIES_USING_P, "dominant-only"):
        for p in (-0.4, 0.0, 0.3):
            got = thr_weights(thr, advantages, mask, 2, strategy=strategy, p=p, taus=taus)
            via_amplify = thr_weights(thr, advantages, mask, 2, strategy="amplify", p=signed_p(strategy, p),
                                      taus=taus)
            assert torch.equal(got, via_amplify), (strategy, p)
    assert signed_p("none", 0.3) == 0.0 and signed_p("nthr", -0.3) == 0.0
    with pytest.raises(ValueError, match="strategy must be one of"):
        signed_p("amplfy", 0.1)


def synthetic_records(seeds=range(6)):
    """Runs whose greedy accuracy rises with p by a seed-dependent slope, with noise; GRPO beside them."""
    generator = np.random.default_rng(1)
    records, truth = [], {}
    for seed in seeds:
        true_slope = 0.1 + 0.02 * seed
        truth[seed] = []
        for arm, p in [("grpo", None), ("amplify:-0.5", -0.5), ("amplify:0", 0.0), ("amplify:0.5", 0.5)]:
            greedy = 0.4 + (0.0 if p is None else true_slope * p) + generator.normal(0, 0.01)
            pass32 = 0.6 - (0.0 if p is None else 0.05 * p) + generator.normal(0, 0.01)
            entropy_steps = [{"step": s, "entropy": 0.2 + 0.001 * s + (p or 0) * 0.01} for s in range(1, 21)]
            strategy, thr_p = ("none", 0.1) if p is None else ("amplify", p)
            records.append({
                "arm": arm, "seed": seed, "train_config": {"thr_strategy": strategy, "thr_p": thr_p},
                "metrics": {"problems": 10, "greedy_accuracy": greedy, "pass@1": greedy - 0.05, "pass@32": pass32},
                "log_history": entropy_steps, "train_seconds": 1.0, "eval_seconds": 1.0,
            })
            if p is not None:
                truth[seed].append((p, greedy))
    return records, truth


def test_slopes_are_per_seed_least_squares_with_a_t_interval():
    records, truth = synthetic_records()
    slopes = summarize.dose_slopes(records)
    expected = [np.polyfit(*zip(*truth[seed]), 1)[0] for seed in sorted(truth)]
    assert slopes["greedy_accuracy"]["per_seed"] == pytest.approx(expected, abs=1e-12)
    mean, sd = np.mean(expected), np.std(expected, ddof=1)
    half = 2.571 * sd / np.sqrt(len(expected))  # t_0.975 with 5 degrees of freedom
    assert slopes["greedy_accuracy"]["mean"] == pytest.approx(mean)
    assert slopes["greedy_accuracy"]["ci95_low"] == pytest.approx(mean - half)
    assert slopes["greedy_accuracy"]["ci95_high"] == pytest.approx(mean + half)
    assert slopes["greedy_accuracy"]["mde80"] == pytest.approx((2.571 + 0.920) * sd / np.sqrt(len(expected)))
    assert slopes["pass@32"]["ci95_high"] < 0 < slopes["greedy_accuracy"]["ci95_low"]
    # The final entropy is the mean of the last 10 logged steps: 0.2 + 0.001 * 15.5 + 0.01 p, slope 0.01.
    assert slopes["entropy"]["mean"] == pytest.approx(0.01)
    assert summarize.run_metrics(records[0])["entropy"] == pytest.approx(0.2 + 0.001 * 15.5)


def test_only_seeds_with_every_dose_arm_enter_the_slopes():
    records, _ = synthetic_records()
    partial = [r for r in records if not (r["seed"] == 2 and r["arm"] == "amplify:0")]
    assert summarize.dose_slopes(partial)["greedy_accuracy"]["seeds"] == [0, 1, 3, 4, 5]
    assert summarize.dose_slopes([r for r in records if r["arm"] in ("grpo", "amplify:0")]) == {}


def test_arms_are_compared_with_grpo_seed_by_seed():
    records, _ = synthetic_records()
    paired = summarize.paired_with_grpo(records, ["greedy_accuracy"])
    grpo = {r["seed"]: r["metrics"]["greedy_accuracy"] for r in records if r["arm"] == "grpo"}
    differences = [r["metrics"]["greedy_accuracy"] - grpo[r["seed"]] for r in records if r["arm"] == "amplify:0.5"]
    assert paired["amplify:0.5"]["greedy_accuracy"]["values"] == pytest.approx(differences)
    assert "grpo" not in paired


def test_results_json_holds_the_design_arms_slopes_and_runs(tmp_path):
    records, _ = synthetic_records(range(3))
    for record in records:
        path = tmp_path / "runs" / run_study.run_name(record["arm"], record["seed"]) / "record.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
    arms = ["grpo", "amplify:-0.5", "amplify:0", "amplify:0.5"]
    (tmp_path / "study.json").write_text(json.dumps({"args": {"arms": arms, "seeds": [0, 1, 2, 3], "steps": 5}}))
    summarize.main([str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["design"]["arms"] == arms and result["design"]["seeds"] == [0, 1, 2, 3]
    assert result["design"]["arm_p"] == {"grpo": None, "amplify:-0.5": -0.5, "amplify:0": 0.0, "amplify:0.5": 0.5}
    assert result["runs"] == 12 and set(result["arms"]) == set(arms)
    assert {"mean", "ci95"} <= set(result["arms"]["amplify:0"]["greedy_accuracy"])
    assert {"mean", "ci95_low", "ci95_high", "per_seed"} <= set(result["slopes"]["pass@32"])
    assert "Partial: 12 of 16 runs finished" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "dose_response.png").stat().st_size > 10_000
    # the committed layout (one runs/<run>.json per run) reads the same
    committed = tmp_path / "committed"
    (committed / "runs").mkdir(parents=True)
    (committed / "study.json").write_text((tmp_path / "study.json").read_text())
    for path in (tmp_path / "runs").glob("*/record.json"):
        (committed / "runs" / f"{path.parent.name}.json").write_text(path.read_text())
    again = summarize.summarize(committed)
    assert again["slopes"] == result["slopes"]
