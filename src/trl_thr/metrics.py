"""Evaluation metrics that need no model (standard library only): the unbiased Pass@K estimator of Chen et al.
2021 (arXiv 2107.03374).

From `n` samples of which `c` are correct, `pass@k = 1 - C(n - c, k) / C(n, k)`: the probability that `k` samples
drawn without replacement from the `n` contain a correct one. It is not "max over n" (which is pass@n of a single
draw). `trl-thr eval` averages it over problems.
"""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct (Chen et al. 2021), computed as a stable product.

    `1 - C(n-c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)`, which never forms large binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}.")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}.")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}] (pass@k needs at least k samples), got k={k}.")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product
