"""stats.py: percentile bootstrap intervals of a mean and paired differences, on synthetic scores shaped like the
study's (many zeros, a long tail up to 100), checked against what the definitions and the normal approximation
give."""
import numpy as np
import pytest

from study.stats import bootstrap_interval, paired_difference, resampled_means, significant, weighted_mean


def rouge_like(n: int, seed: int) -> np.ndarray:
    """n per-sample scores in [0, 100]: a third are 0, the rest spread like ROUGE-L of short answers."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 1 / 3, 0.0, np.clip(rng.gamma(2.0, 9.0, n), 0, 100)).round(4)


def test_interval_contains_the_mean():
    for seed in range(5):
        x = rouge_like(100, seed)
        low, high = bootstrap_interval(x)
        assert low < x.mean() < high
        assert 0 <= low and high <= 100


def test_interval_matches_the_normal_approximation():
    # for a mean of 2000 samples the bootstrap distribution is nearly normal: mean +- 1.96 sd / sqrt(n)
    x = rouge_like(2000, 0)
    low, high = bootstrap_interval(x, resamples=4000)
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert (low + high) / 2 == pytest.approx(x.mean(), abs=0.1 * half)


def test_interval_narrows_as_samples_grow():
    widths = [np.subtract(*bootstrap_interval(rouge_like(n, 1))[::-1]) for n in (25, 100, 400, 1600)]
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # sqrt(1600 / 25) = 8 in theory; the 25-sample sd is itself noisy


def test_same_seed_same_interval_and_the_seed_matters():
    x = rouge_like(100, 2)
    assert bootstrap_interval(x, seed=7) == bootstrap_interval(x, seed=7)
    assert bootstrap_interval(x, seed=7) != bootstrap_interval(x, seed=8)
    assert bootstrap_interval(x) == bootstrap_interval(list(x))  # default seed, any sequence type


def test_resampled_means_are_means_of_resamples():
    x = np.array([0.0, 10.0, 20.0, 30.0])
    means = resampled_means(x, resamples=3000, seed=3)
    assert means.shape == (3000,)
    assert set(np.round(means * 4).astype(int)) <= set(range(0, 121, 10))  # sums of 4 draws from {0,10,20,30}
    assert means.min() >= 0 and means.max() <= 30
    assert np.mean(means) == pytest.approx(15.0, abs=0.3)


def test_level_and_resamples():
    x = rouge_like(100, 4)
    l95, h95 = bootstrap_interval(x, level=0.95)
    l50, h50 = bootstrap_interval(x, level=0.5)
    assert l95 < l50 < h50 < h95
    assert bootstrap_interval(x, resamples=1000) != bootstrap_interval(x, resamples=2000)


def test_weighted_mean_is_the_mean_per_token():
    nll, tokens = np.array([2.0, 4.0, 3.0]), np.array([10, 30, 60])
    assert weighted_mean(nll, tokens) == pytest.approx((20 + 120 + 180) / 100)
    assert weighted_mean(nll) == pytest.approx(3.0)
    low, high = bootstrap_interval(nll, tokens)
    assert 2.0 <= low < weighted_mean(nll, tokens) < high <= 4.0
    # equal weights: the plain mean's interval (the same resamples)
    assert bootstrap_interval(nll, np.full(3, 7.0)) == pytest.approx(bootstrap_interval(nll), abs=1e-12)


def test_paired_difference_excludes_zero_for_a_clearly_better_run():
    a = rouge_like(100, 5)
    rng = np.random.default_rng(6)
    b = np.clip(a + 2.0 + rng.normal(0, 2.0, 100), 0, 100)  # better by about 2 points on every sample
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert 0 < low < diff < high and significant(low, high)
    # the runs' own intervals overlap: only pairing (the same samples in both) shows the difference
    assert bootstrap_interval(b)[0] < bootstrap_interval(a)[1]
    # and the other way round the interval lies below 0
    diff, low, high = paired_difference(b, a)
    assert low < high < 0 and significant(low, high)


def test_paired_difference_includes_zero_without_a_difference():
    a = rouge_like(100, 7)
    assert paired_difference(a, a.copy()) == (0.0, 0.0, 0.0)
    assert not significant(0.0, 0.0)
    rng = np.random.default_rng(8)
    noise = rng.normal(0, 3.0, 100)
    diff, low, high = paired_difference(a, a + noise - noise.mean())  # per-sample changes that cancel
    assert low < 0 < high and not significant(low, high)
    assert diff == pytest.approx(0.0, abs=1e-9)


def test_paired_difference_pairs_the_resamples():
    # b = a + 1 exactly: every resample's difference is 1, whatever the spread of a
    a = rouge_like(50, 9)
    assert paired_difference(a, a + 1.0) == pytest.approx((1.0, 1.0, 1.0))


def test_paired_difference_weighted_by_tokens():
    base, tuned, tokens = np.array([2.0, 3.0, 4.0, 5.0]), np.array([2.5, 3.5, 4.5, 5.5]), np.array([1, 2, 3, 4])
    assert paired_difference(base, tuned, tokens) == pytest.approx((0.5, 0.5, 0.5))
    diff, _, _ = paired_difference(base, np.array([3.0, 3.0, 4.0, 5.0]), tokens)  # one sample of 1 token of 10
    assert diff == pytest.approx(0.1)


def test_errors():
    with pytest.raises(ValueError, match="same samples"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="length >= 1"):
        bootstrap_interval([])
