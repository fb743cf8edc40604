"""How sure a mean over evaluation samples is: percentile bootstrap intervals, alone and paired.

A score is a mean over samples (the study's 100 per set), so its uncertainty comes from which samples were drawn:
resample the samples with replacement RESAMPLES times, take the mean of each resample, and the interval holds the
middle LEVEL of those means (the percentile method). Two runs scored on the SAME samples are compared by resampling
sample indices jointly for both: the interval of the mean difference, which is much narrower than either run's
own interval because the hard samples stay hard in both. A difference whose interval excludes 0 is "significant".

Every interval is drawn from a generator seeded by SEED: the same values always give the same interval.
"""
import numpy as np

METHOD = "percentile"  # interval = the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
CHUNK = 1 << 22  # resampled indices held at once


def settings(resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """What metrics.json and the table say about their intervals."""
    return {"method": METHOD, "resamples": resamples, "seed": seed, "level": level, "unit": "sample"}


def weighted_mean(values, weights=None) -> float:
    """sum(w v) / sum(w): the plain mean without weights; with token counts as weights, the mean per token."""
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    return float((values * weights).sum() / weights.sum())


def resampled_means(values, weights=None, seed: int = SEED, resamples: int = RESAMPLES) -> np.ndarray:
    """The (weighted) mean of `resamples` resamples of `values` (n,), drawn with replacement -> (resamples,)."""
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    n = len(values)
    if n == 0 or values.shape != weights.shape:
        raise ValueError(f"need values and weights of one length >= 1, got {values.shape} and {weights.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, CHUNK // n)
    for start in range(0, resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, resamples - start), n))  # (r, n)
        means[start:start + len(idx)] = (values[idx] * weights[idx]).sum(axis=1) / weights[idx].sum(axis=1)
    return means


def bootstrap_interval(values, weights=None, seed: int = SEED, resamples: int = RESAMPLES,
                       level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of the (weighted) mean of `values` -> (low, high)."""
    means = resampled_means(values, weights, seed, resamples)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def paired_difference(a, b, weights=None, seed: int = SEED, resamples: int = RESAMPLES,
                      level: float = LEVEL) -> tuple[float, float, float]:
    """Run b minus run a, both scored on the same samples in the same order -> (mean difference, low, high).

    Drawing the same sample indices for a and b is drawing indices of the per-sample differences b - a; with
    weights (shared by both runs, e.g. the reference tokens of each sample) the difference of weighted means."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same samples in both runs, got {a.shape} and {b.shape}")
    diff = b - a
    return (weighted_mean(diff, weights), *bootstrap_interval(diff, weights, seed, resamples, level))


def significant(low: float, high: float) -> bool:
    """The interval of a difference excludes 0."""
    return low > 0 or high < 0
