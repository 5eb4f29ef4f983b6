"""The summary statistics every report uses: mean with the seed spread, the one verdict rule for "better than its
baseline", a binomial interval and a paired bootstrap interval over questions."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator; 0 for a single value)."""
    if not values:
        raise ValueError("mean_sd of no values")
    m = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (95% for ``z = 1.96``; nan for ``n = 0``).

    Unlike the normal interval it stays inside [0, 1] and is not empty at 0 or n successes.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def seed_verdict(cand: Sequence[float], ref: Sequence[float]) -> tuple[str, float]:
    """``(outcome, mean(cand) - mean(ref))`` for per-seed scores of a row and of its baseline.

    The outcome is ``"better"`` / ``"worse"`` only when every seed of one lies beyond every seed of the other (no
    distribution assumed, and with 2-3 seeds a standard deviation says little), ``"within"`` otherwise,
    ``"one seed"`` when either side has a single seed (no spread to judge by), ``"not measured"`` when one is empty.
    """
    if not cand or not ref:
        return "not measured", float("nan")
    diff = mean_sd(cand)[0] - mean_sd(ref)[0]
    if len(cand) < 2 or len(ref) < 2:
        return "one seed", diff
    if min(cand) > max(ref):
        return "better", diff
    if max(cand) < min(ref):
        return "worse", diff
    return "within", diff


def paired_bootstrap(diffs: Sequence[float], *, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (one per test question: the row's score
    minus its baseline's on the same question), resampling the questions with replacement.

    The seed spread says how much training noise moves a score; this says how much the choice of test questions
    does, which at a few dozen questions is often more.
    """
    import numpy as np

    if not diffs:
        return float("nan"), float("nan")
    x = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


__all__ = ["mean_sd", "paired_bootstrap", "seed_verdict", "wilson_interval"]
