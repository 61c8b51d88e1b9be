"""`trl_thr.cli.study_stats` against values computed by hand and published t tables."""

import math

import numpy as np
import pytest

from trl_thr.cli.study_stats import (
    least_squares_slope,
    mean_interval,
    minimum_detectable_effect,
    paired_difference,
    slope_interval,
    t_cdf,
    t_quantile,
)


@pytest.mark.parametrize(
    "dof, t975, t80",  # two-sided 95 % and one-sided 80 % quantiles, as printed in Student-t tables
    [(1, 12.706, 1.376), (2, 4.303, 1.061), (3, 3.182, 0.978), (5, 2.571, 0.920), (15, 2.131, 0.866),
     (30, 2.042, 0.854), (120, 1.980, 0.845)],
)
def test_t_quantiles_match_the_table(dof, t975, t80):
    assert t_quantile(0.975, dof) == pytest.approx(t975, abs=5e-4)
    assert t_quantile(0.80, dof) == pytest.approx(t80, abs=5e-4)
    assert t_quantile(0.025, dof) == pytest.approx(-t975, abs=5e-4)


def test_t_cdf_of_one_degree_of_freedom_is_the_cauchy_cdf():
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


def test_mean_interval_by_hand():
    # 1, 2, 3, 4: mean 2.5, sample sd sqrt(5/3), standard error sqrt(5/3)/2, t(0.975, 3) = 3.1824.
    entry = mean_interval([1, 2, 3, 4])
    se = math.sqrt(5 / 3) / 2
    assert entry["mean"] == 2.5 and entry["n"] == 4 and entry["values"] == [1.0, 2.0, 3.0, 4.0]
    assert entry["ci95"] == pytest.approx(3.18245 * se, rel=1e-5)
    assert entry["mde80"] is None  # [0.45, 4.55] does not contain 0


def test_the_minimum_detectable_effect_comes_with_an_interval_that_contains_zero():
    # -1, 0, 2: mean 1/3, sd sqrt(7/3), se sqrt(7/9); t(0.975, 2) = 4.3027, t(0.80, 2) = 1.0607.
    entry = mean_interval([-1, 0, 2])
    se = math.sqrt(7 / 9)
    assert entry["ci95"] == pytest.approx(4.30265 * se, rel=1e-5)
    assert entry["mde80"] == pytest.approx((4.30265 + 1.06066) * se, rel=1e-5)
    assert minimum_detectable_effect(se, 2) == pytest.approx(entry["mde80"])


def test_one_value_has_no_interval():
    assert mean_interval([0.3]) == {"mean": 0.3, "ci95": None, "n": 1, "values": [0.3], "mde80": None}
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_paired_difference_uses_the_shared_seeds_only():
    arm = {0: 0.5, 1: 0.7, 2: 0.4, 5: 0.9}
    reference = {0: 0.4, 1: 0.4, 2: 0.5, 3: 0.1}
    entry = paired_difference(arm, reference)
    assert entry["seeds"] == [0, 1, 2]
    assert entry["values"] == pytest.approx([0.1, 0.3, -0.1])
    assert entry["mean"] == pytest.approx(0.1)
    # differences 0.1, 0.3, -0.1: sd 0.2, se 0.2 / sqrt(3)
    assert entry["ci95"] == pytest.approx(4.30265 * 0.2 / math.sqrt(3), rel=1e-5)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_slopes_are_least_squares_per_seed():
    assert least_squares_slope([-1, 0, 1], [1, 2, 3]) == pytest.approx(1.0)
    assert least_squares_slope([0, 0, 1, 1], [0, 2, 1, 3]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two distinct"):
        least_squares_slope([0.5, 0.5], [1, 2])
    generator = np.random.default_rng(0)
    points = {seed: [(p, 0.3 * p + generator.normal(0, 0.1)) for p in (-0.5, 0.0, 0.25, 0.5)] for seed in range(5)}
    points[7] = [(0.1, 1.0)]  # one value of p: no slope for this seed
    entry = slope_interval(points)
    expected = [np.polyfit(*zip(*points[seed]), 1)[0] for seed in range(5)]
    assert entry["seeds"] == [0, 1, 2, 3, 4]
    assert entry["per_seed"] == pytest.approx(expected, abs=1e-12)
    assert entry["mean"] == pytest.approx(np.mean(expected))
    assert entry["ci95"] == pytest.approx(2.77645 * np.std(expected, ddof=1) / math.sqrt(5), rel=1e-5)
    assert slope_interval({0: [(0.1, 1.0)]}) is None
