"""The study's statistics against exact references: hand-computed values, closed forms, scipy's
own routines on known data and brute-force enumeration."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from torchsage.study.stats import holm, least_squares, mean_ci, paired_comparison


def test_mean_ci_by_hand():
    # mean 2, sample std 1; with 2 degrees of freedom the t quantile has the closed form
    # t_p = (2p - 1) / sqrt(2 p (1 - p)), here p = 0.975; half width t / sqrt(3)
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) / math.sqrt(3)
    assert mean == 2.0
    assert lo == pytest.approx(2.0 - half, rel=1e-12) and hi == pytest.approx(2.0 + half, rel=1e-12)
    assert mean_ci([5.0])[0] == 5.0 and math.isnan(mean_ci([5.0])[1])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])


def test_wilcoxon_exact_p_by_enumeration():
    # 6 distinct nonzero differences: the exact null distribution of W+ is the 2**6 sign patterns
    a = [0.91, 0.85, 0.88, 0.79, 0.95, 0.70]
    b = [0.90, 0.88, 0.80, 0.80, 0.90, 0.60]
    d = np.subtract(a, b)
    ranks = stats.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    dist = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=6)]
    low = min(w_plus, ranks.sum() - w_plus)
    p_exact = 2 * sum(w <= low for w in dist) / len(dist)
    result = paired_comparison(a, b)
    assert result.p == pytest.approx(min(1.0, p_exact), rel=1e-12)
    assert result.mean == pytest.approx(d.mean(), rel=1e-12)
    assert result.n == 6


def test_all_positive_differences_give_two_over_two_to_the_n():
    r = paired_comparison([1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.2, 2.0, 2.9, 3.7])
    assert r.p == pytest.approx(2 / 2**5, rel=1e-12)


def test_paired_bootstrap_interval_matches_enumeration():
    # n = 4 differences: every one of the 4**4 resamples is equally likely; the percentile interval
    # of 200000 random resamples estimates the quantiles of that exact distribution. Monte Carlo
    # error of a 2.5% quantile with 2e5 draws: sqrt(q (1-q) / n) / density ~ 3.5e-4 / density in
    # probability, far below the gap between neighbouring atoms of this distribution (step 1/4 of
    # the smallest gap between differences, 0.25): the estimate lands on the exact atom.
    d = np.array([1.0, 2.0, 4.0, 8.0])
    means = np.array([d[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    r = paired_comparison(d, np.zeros(4), n_resamples=200_000, seed=3)
    lo_exact, hi_exact = np.percentile(means, [2.5, 97.5])
    assert r.low == pytest.approx(lo_exact, abs=0.25) and r.high == pytest.approx(hi_exact, abs=0.25)
    assert r.low < d.mean() < r.high


def test_constant_differences():
    r = paired_comparison([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert (r.mean, r.low, r.high, r.p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="one value per trial"):
        paired_comparison([1.0, 2.0], [1.0, 2.0, 3.0])


def test_holm_by_hand():
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], rel=1e-12)
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []


def test_least_squares_matches_linregress_and_exact_plane():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 0.7 * x - 0.2 + rng.normal(scale=0.5, size=30)
    fit = least_squares(x[:, None], y, ["x"], n_resamples=200)
    ref = stats.linregress(x, y)
    assert fit.coef[0] == pytest.approx(ref.slope, rel=1e-10)
    assert fit.intercept == pytest.approx(ref.intercept, rel=1e-10)
    assert fit.r2 == pytest.approx(ref.rvalue**2, rel=1e-10)
    assert fit.coef_low[0] < fit.coef[0] < fit.coef_high[0]
    X = rng.normal(size=(12, 2))
    plane = least_squares(X, 3.0 * X[:, 0] - 2.0 * X[:, 1] + 0.5, ["a", "b"], n_resamples=20)
    assert plane.coef == pytest.approx((3.0, -2.0), abs=1e-12) and plane.r2 == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        least_squares(X, np.zeros(12), ["a"])


def test_least_squares_with_groups_matches_dummy_regression():
    # fixed effects by an independent route: one indicator column per group, no common intercept
    rng = np.random.default_rng(1)
    groups = ["a"] * 7 + ["b"] * 9 + ["c"] * 6
    offsets = {"a": 0.0, "b": 5.0, "c": -3.0}
    X = rng.normal(size=(22, 2))
    y = (
        0.4 * X[:, 0]
        - 1.1 * X[:, 1]
        + np.array([offsets[g] for g in groups])
        + rng.normal(scale=0.3, size=22)
    )
    fit = least_squares(X, y, ["u", "v"], n_resamples=200, groups=groups)
    dummies = np.array([[g == k for k in "abc"] for g in groups], dtype=float)
    design = np.column_stack([X, dummies])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ beta
    group_mean = np.array([y[[h == g for h in groups]].mean() for g in groups])
    within_r2 = 1 - (residual**2).sum() / ((y - group_mean) ** 2).sum()
    assert fit.coef == pytest.approx(tuple(beta[:2]), rel=1e-9)
    assert fit.r2 == pytest.approx(within_r2, rel=1e-9)
    assert fit.intercept == pytest.approx(y.mean() - X.mean(axis=0) @ beta[:2], rel=1e-9)
    assert all(lo < c < hi for lo, c, hi in zip(fit.coef_low, fit.coef, fit.coef_high))
    # pooled, the group offsets swamp the slopes; within groups the relation is close to exact
    assert least_squares(X, y, ["u", "v"], n_resamples=20).r2 < 0.5 < fit.r2


def test_least_squares_groups_exact_relation_and_errors():
    x = np.arange(8.0)
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    y = 2.0 * x + np.where(np.array(groups) == 1, 100.0, 0.0)  # same slope, different intercepts
    fit = least_squares(x[:, None], y, ["x"], n_resamples=50, groups=groups)
    assert fit.coef[0] == pytest.approx(2.0, abs=1e-12) and fit.r2 == pytest.approx(1.0, abs=1e-12)
    # every resample is exact too: the stratified bootstrap never mixes the groups' intercepts
    assert fit.coef_low[0] == pytest.approx(2.0, abs=1e-9) and fit.coef_high[0] == pytest.approx(
        2.0, abs=1e-9
    )
    with pytest.raises(ValueError, match="at least 2 observations"):
        least_squares(x[:, None], y, ["x"], groups=[0] * 7 + [1])
    with pytest.raises(ValueError, match="one label per observation"):
        least_squares(x[:, None], y, ["x"], groups=[0, 1])
