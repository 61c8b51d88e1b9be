"""The statistics of `trl-thr study`: means over seeds with Student-t intervals, differences paired by seed,
least-squares slopes, and the minimum detectable effect. Pure Python, no third-party imports.

Every interval is two-sided 95 % over seeds (one value per seed: a run, a paired difference or a per-seed slope).
The minimum detectable effect at 80 % power is `(t_0.975 + t_0.80) * standard error` with `n - 1` degrees of freedom:
the smallest true effect that a two-sided 5 % test over these seeds would detect four times in five, given the
spread the seeds showed. It is reported where the interval contains 0, i.e. where "no effect" is not ruled out.
"""

import math

CONFIDENCE = 0.95
POWER = 0.80


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(dof / 2, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(probability: float, dof: int) -> float:
    """The `probability` quantile of Student's t with `dof >= 1` degrees of freedom (bisection on `t_cdf`)."""
    if dof < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {dof}.")
    if not 0 < probability < 1:
        raise ValueError(f"probability must be in (0, 1), got {probability}.")
    low, high = -1e4, 1e4
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, dof) < probability else (low, middle)
    return (low + high) / 2


def mean_interval(values: list[float]) -> dict:
    """`{"mean", "ci95", "n", "values", "mde80"}` over seeds: `ci95` is the half-width of the 95 % t-interval of the
    mean (`None` for one value), `mde80` the minimum detectable effect where that interval contains 0 (else `None`).
    """
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one value.")
    mean = sum(values) / n
    entry = {"mean": mean, "ci95": None, "n": n, "values": values, "mde80": None}
    if n < 2:
        return entry
    standard_error = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    entry["ci95"] = t_quantile(1 - (1 - CONFIDENCE) / 2, n - 1) * standard_error
    if mean - entry["ci95"] <= 0 <= mean + entry["ci95"]:
        entry["mde80"] = minimum_detectable_effect(standard_error, n - 1)
    return entry


def minimum_detectable_effect(standard_error: float, dof: int) -> float:
    """Smallest true effect a two-sided 5 % t-test detects with 80 % power: `(t_0.975 + t_0.80) * SE`."""
    return (t_quantile(1 - (1 - CONFIDENCE) / 2, dof) + t_quantile(POWER, dof)) * standard_error


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict | None:
    """`values - reference` paired by seed over the seeds both have: `mean_interval` of the differences, with
    `seeds`; `None` when they share no seed."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    return {**mean_interval([values[s] - reference[s] for s in seeds]), "seeds": seeds}


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the least-squares line through the points `(xs, ys)`."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values and {len(ys)} y values.")
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - x_mean) ** 2 for x in xs)
    if spread == 0:
        raise ValueError("a slope needs at least two distinct x values.")
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / spread


def slope_interval(points_by_seed: dict[int, list[tuple[float, float]]]) -> dict | None:
    """The per-seed least-squares slopes of `(x, y)` points and `mean_interval` of them, with `per_seed` and `seeds`;
    `None` when no seed has points at two distinct x."""
    per_seed = {seed: least_squares_slope([x for x, _ in points], [y for _, y in points])
                for seed, points in sorted(points_by_seed.items()) if len({x for x, _ in points}) >= 2}
    if not per_seed:
        return None
    return {**mean_interval(list(per_seed.values())), "per_seed": list(per_seed.values()), "seeds": list(per_seed)}
