"""`benchmarks/bench_cost.py` at tiny scale: one arm trains on fixed work and appends its record, the summary pairs the
arms in running order, and the median's interval is the sign test's."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cost  # noqa: E402

from trl_thr.files import append_json_line  # noqa: E402


@pytest.mark.parametrize("n,expected", [(5, (0, 4)), (6, (0, 5)), (10, (1, 8)), (20, (5, 14))])
def test_median_interval_is_the_sign_tests(n, expected):
    # Tabulated 95 % sign-test bounds for the median: x(1)..x(n) for n <= 8, x(2), x(9) for n = 10, x(6), x(15) for 20.
    values = [float(i) for i in range(n)][::-1]
    median, low, high = bench_cost.median_interval(values)
    assert (low, high) == (float(expected[0]), float(expected[1]))
    assert median == (n - 1) / 2


def test_one_arm_records_fixed_work_and_the_summary_pairs_arms(tiny_model_path, tmp_path):
    record = bench_cost.train_one_arm("thr", "transformers", steps=1, warmup=1, batch=4, num_generations=2,
                                      max_completion_length=8, model=tiny_model_path)
    assert len(record["step_seconds"]) == 2 and record["timed_median"] == record["step_seconds"][1]
    assert record["min_completion_length"] == [8.0, 8.0], "completions were not forced to full length"
    assert all(seconds is not None for seconds in record["thr_seconds"])

    out = tmp_path / "runs.jsonl"
    for trainer, median in (("grpo", 2.0), ("thr", 2.2), ("grpo", 4.0), ("thr", 4.0)):
        append_json_line(out, {**record, "trainer": trainer, "timed_median": median})
    with open(out, "a") as file:
        file.write('{"trainer": "grpo", "cut sh')  # a process killed mid-write: its line is dropped
    summary = bench_cost.summarize(out)["transformers"]
    assert summary["pairs"] == 2 and summary["all_completions_full_length"]
    assert summary["ratios"] == [1.1, 1.0]
    assert json.loads(out.read_text().splitlines()[0])["trainer"] == "grpo"


def test_full_length_is_judged_on_every_step(tmp_path):
    """One step with a shorter completion, after full-length ones, makes the work not fixed."""
    out = tmp_path / "runs.jsonl"
    base = {"engine": "transformers", "max_completion_length": 8, "timed_median": 1.0}
    for trainer in ("grpo", "thr"):
        append_json_line(out, {**base, "trainer": trainer, "min_completion_length": [8.0, 8.0, 8.0]})
    assert bench_cost.summarize(out)["transformers"]["all_completions_full_length"]
    append_json_line(out, {**base, "trainer": "grpo", "min_completion_length": [8.0, 8.0, 5.0]})
    append_json_line(out, {**base, "trainer": "thr", "min_completion_length": [8.0, 8.0, 8.0]})
    assert not bench_cost.summarize(out)["transformers"]["all_completions_full_length"]
