"""The statistics of the evidence study: intervals over trials, paired tests, Holm, least squares.

Every function takes plain sequences of floats and returns plain floats, so the tables can print
them and the tests can compare them with hand-computed values.

* :func:`mean_ci`: the mean over trials and its Student-t confidence interval;
* :func:`paired_comparison`: the mean of the paired differences ``a - b`` (one per trial, both
  runs sharing the trial's seeds), a paired bootstrap interval (resampling the trials, through
  :func:`scipy.stats.bootstrap`) and the Wilcoxon signed-rank p-value
  (:func:`scipy.stats.wilcoxon`, two-sided);
* :func:`holm`: Holm's step-down adjustment of a family of p-values (strong control of the
  family-wise error rate, no independence assumed);
* :func:`least_squares`: ordinary least squares with an intercept, R^2 and a case-resampling
  bootstrap interval for every coefficient and for R^2.

Example:
    >>> m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    >>> m, round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Fit", "Paired", "holm", "least_squares", "mean_ci", "paired_comparison"]


def _values(values: Sequence[float], what: str, at_least: int = 1) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < at_least:
        raise ValueError(f"{what} needs at least {at_least} value(s), got {x.size}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds a non-finite value: {x.tolist()}")
    return x


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its Student-t interval ``mean ± t_{n-1} s / sqrt(n)``
    (``s`` the sample standard deviation); one value gives ``nan`` bounds.

    Example:
        >>> mean_ci([4.0, 4.0])
        (4.0, 4.0, 4.0)
    """
    from scipy import stats

    x = _values(values, "mean_ci")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Paired:
    """The comparison of two methods over the same trials (differences ``a - b``).

    Attributes:
        n: number of paired trials.
        mean: mean difference.
        low, high: paired bootstrap percentile interval of the mean difference (``nan`` when every
            difference is equal: the interval is the point ``mean`` then, reported as such).
        p: two-sided Wilcoxon signed-rank p-value (exact for small samples without ties or zeros;
            ``1.0`` when every difference is zero).
        p_adjusted: ``p`` after Holm's adjustment over the family it was reported in (set by the
            caller; equal to ``p`` until then).
    """

    n: int
    mean: float
    low: float
    high: float
    p: float
    p_adjusted: float

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the Holm-adjusted p-value is below ``alpha``."""
        return self.p_adjusted < alpha


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    level: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> Paired:
    """Paired comparison of ``a`` against ``b`` (entry ``i`` of each from trial ``i``).

    Raises:
        ValueError: different lengths, fewer than 2 pairs, or non-finite values.

    Example:
        >>> r = paired_comparison([0.9, 0.8, 0.85, 0.7, 0.95], [0.8, 0.75, 0.8, 0.6, 0.9])
        >>> round(r.mean, 3), r.p  # five positive differences: exact p = 2 / 2**5
        (0.07, 0.0625)
    """
    from scipy import stats

    x, y = _values(a, "paired_comparison(a)", 2), _values(b, "paired_comparison(b)", 2)
    if x.size != y.size:
        raise ValueError(f"paired_comparison needs one value per trial in both: got {x.size} and {y.size}")
    d = x - y
    mean = float(d.mean())
    if np.all(d == d[0]):  # bootstrap of a constant is the constant; Wilcoxon undefined for all-zero
        p = 1.0 if d[0] == 0 else float(stats.wilcoxon(d).pvalue)
        return Paired(int(d.size), mean, mean, mean, p, p)
    boot = stats.bootstrap(
        (d,),
        np.mean,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    p = float(stats.wilcoxon(d).pvalue)
    low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    return Paired(int(d.size), mean, low, high, p, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting
    the adjusted p-values below alpha keeps the family-wise error rate at alpha.
    """
    p = _values(pvalues, "holm", 0)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p[i])))
        adjusted[i] = running
    return [float(v) for v in adjusted]


@dataclass(frozen=True)
class Fit:
    """A least-squares fit ``y ~ intercept + X @ coef``.

    Attributes:
        names: the predictors' names.
        coef: the slope of each predictor.
        intercept: the intercept.
        r2: the coefficient of determination ``1 - SS_res / SS_tot``.
        coef_low, coef_high, r2_low, r2_high: percentile bootstrap intervals (cases resampled).
        n: number of observations.
    """

    names: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float
    r2: float
    coef_low: tuple[float, ...]
    coef_high: tuple[float, ...]
    r2_low: float
    r2_high: float
    n: int


def _ols(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    design = np.column_stack([np.ones(len(y)), X])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ beta
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else math.nan
    return beta, r2


def _within(X: np.ndarray, y: np.ndarray, members: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """:func:`_ols` on the data centred within each group (index arrays ``members``)."""
    Xc, yc = X.copy(), y.copy()
    for m in members:
        Xc[m] -= X[m].mean(axis=0)
        yc[m] -= y[m].mean()
    return _ols(Xc, yc)


def least_squares(
    X: Sequence[Sequence[float]] | np.ndarray,
    y: Sequence[float],
    names: Sequence[str],
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> Fit:
    """Ordinary least squares of ``y`` on the columns of ``X`` with an intercept.

    With ``groups`` (one label per observation) every group gets its own intercept (fixed
    effects): ``X`` and ``y`` are centred within each group before the fit, so the slopes say how
    ``y`` moves with ``X`` *within* a group, and ``r2`` is the within-group R^2 (the share of the
    variation around the group means that the slopes explain). ``intercept`` is then the line's
    value through the grand means, for drawing. The bootstrap resamples within each group and
    centres each resample again.

    Raises:
        ValueError: shapes that do not match ``names`` or ``y``, or fewer observations than
            coefficients plus one (plus the number of groups), or a group of one observation.

    Example:
        >>> fit = least_squares([[0.0], [1.0], [2.0]], [1.0, 3.0, 5.0], ["x"], n_resamples=50)
        >>> round(fit.coef[0], 6), round(fit.intercept, 6), round(fit.r2, 6)
        (2.0, 1.0, 1.0)
    """
    Xa = np.asarray(X, dtype=np.float64)
    if Xa.ndim == 1:
        Xa = Xa[:, None]
    ya = _values(y, "least_squares(y)", 1)
    if Xa.shape != (ya.size, len(names)):
        raise ValueError(
            f"X must have shape ({ya.size}, {len(names)}) for names {list(names)}, got {Xa.shape}"
        )
    if not np.all(np.isfinite(Xa)):
        raise ValueError("least_squares: X holds a non-finite value")
    if groups is None:
        if ya.size < len(names) + 2:
            raise ValueError(f"least_squares needs at least {len(names) + 2} observations, got {ya.size}")
        beta, r2 = _ols(Xa, ya)
        intercept = float(beta[0])

        def refit(rng: np.random.Generator) -> tuple[np.ndarray, float]:
            idx = rng.integers(0, ya.size, ya.size)
            return _ols(Xa[idx], ya[idx])

    else:
        labels = list(groups)
        if len(labels) != ya.size:
            raise ValueError(f"groups must have one label per observation ({ya.size}), got {len(labels)}")
        members = [np.flatnonzero([lab == g for lab in labels]) for g in dict.fromkeys(labels)]
        if min(m.size for m in members) < 2:
            raise ValueError("least_squares: every group needs at least 2 observations")
        if ya.size < len(names) + len(members) + 1:
            raise ValueError(
                f"least_squares needs at least {len(names) + len(members) + 1} observations with "
                f"{len(members)} groups, got {ya.size}"
            )
        beta, r2 = _within(Xa, ya, members)
        intercept = float(ya.mean() - Xa.mean(axis=0) @ beta[1:])

        def refit(rng: np.random.Generator) -> tuple[np.ndarray, float]:
            idx = [m[rng.integers(0, m.size, m.size)] for m in members]
            starts = np.cumsum([0] + [i.size for i in idx[:-1]])
            flat = np.concatenate(idx)
            return _within(Xa[flat], ya[flat], [s0 + np.arange(i.size) for s0, i in zip(starts, idx)])

    rng = np.random.default_rng(seed)
    draws = [refit(rng) for _ in range(n_resamples)]
    coefs = [b[1:] for b, _ in draws]
    r2s = [r for _, r in draws]
    tail = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(np.array(coefs), [tail, 100 - tail], axis=0)
    r2_lo, r2_hi = np.nanpercentile(np.array(r2s), [tail, 100 - tail])
    return Fit(
        names=tuple(names),
        coef=tuple(float(v) for v in beta[1:]),
        intercept=intercept,
        r2=float(r2),
        coef_low=tuple(float(v) for v in lo),
        coef_high=tuple(float(v) for v in hi),
        r2_low=float(r2_lo),
        r2_high=float(r2_hi),
        n=int(ya.size),
    )
