"""Per-distribution weights (``step(closure, weights=...)``) against brute-force float64 formulas.

With weights ``w_k`` normalised to sum 1: the mean gradient is ``sum_k w_k g_k``, the variance
``V = sum_k w_k ||g_k - g_bar||^2`` (so ``normalized_std = sqrt(V) / ||g_bar||``), the per-coordinate
variance ``sum_k w_k (g_k - g_bar)^2``, and the cosine measure ``1 - mean over pairs of cos``, every
pair counted once. Everything runs in float64, where the streaming updates and the direct sums
agree to about 1e-15 relative; the tolerances below leave a wide margin above that.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import torchsage
from torchsage import GradientStatistics, disagreement
from torchsage.disagreement import MEASURES

F64 = torch.float64
WEIGHTS = [5.0, 12.0, 3.0]  # batch sizes n_k: shares n_k / N = 0.25, 0.6, 0.15


def shares(weights):
    total = sum(weights)
    return [w / total for w in weights]


def brute(vectors, weights):
    w = shares(weights)
    mean = sum(wk * v for wk, v in zip(w, vectors))
    var = sum(wk * float(((v - mean) ** 2).sum()) for wk, v in zip(w, vectors))
    cos = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(vectors, 2)]
    norm = float(mean.norm())
    return {
        "raw_var": var,
        "raw_std": math.sqrt(var),
        "normalized_var": var / (norm**2 + 1e-12),  # the measures' documented eps
        "normalized_std": math.sqrt(var) / (norm + 1e-12),
        "cosine": 1.0 - sum(cos) / len(cos),
        "mean": mean,
        "elementwise": sum(wk * (v - mean) ** 2 for wk, v in zip(w, vectors)),
    }


def test_weighted_measures_match_the_formulas():
    gen = torch.Generator().manual_seed(1)
    grads = [
        [torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64)]
        for _ in WEIGHTS
    ]
    vectors = [torch.cat([t.reshape(-1) for t in g]) for g in grads]
    expected = brute(vectors, WEIGHTS)
    for measure in MEASURES:
        got = float(disagreement(grads, measure, weights=WEIGHTS))
        assert got == pytest.approx(expected[measure], rel=1e-12), measure
    stats = GradientStatistics(grads[0], cosine=True, elementwise=True)
    for g, w in zip(grads, WEIGHTS):
        stats.update(g, weight=w)
    mean = torch.cat([m.reshape(-1) for m in stats.mean])
    elementwise = torch.cat([e.reshape(-1) for e in stats.elementwise_variance()])
    torch.testing.assert_close(mean, expected["mean"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(elementwise, expected["elementwise"], rtol=1e-12, atol=1e-14)


def test_equal_weights_give_the_unweighted_measures():
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(7, generator=gen, dtype=F64) for _ in range(4)]
    for measure in MEASURES:
        a = float(disagreement(grads, measure))
        b = float(disagreement(grads, measure, weights=[2.0] * 4))
        assert b == pytest.approx(a, rel=1e-13), measure


def problem(seed=0):
    """Quadratic losses L_k = 0.5 ||W - C_k||^2 (identity Hessian) in float64."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((4, 6), (3,))
    params = [torch.randn(s, generator=gen, dtype=F64, requires_grad=True) for s in shapes]
    targets = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in WEIGHTS]

    def closure():
        return [sum(0.5 * (p - c).square().sum() for p, c in zip(params, cs)) for cs in targets]

    return params, targets, closure


def weighted_targets(targets):
    w = shares(WEIGHTS)
    return [sum(wk * cs[i] for wk, cs in zip(w, targets)) for i in range(len(targets[0]))]


@pytest.mark.parametrize("lazy", [False, True])
def test_one_pass_step_descends_on_the_weighted_mean(lazy):
    params, targets, closure = problem()
    w0 = [p.detach().clone() for p in params]
    c = weighted_targets(targets)
    step = (lambda: iter(closure())) if lazy else closure
    info = torchsage.SAM(params, torch.optim.SGD, rho=0.0, lr=0.5).step(step, weights=WEIGHTS)
    for p, w, cw in zip(params, w0, c):  # W - 0.5 (W - C_w)
        torch.testing.assert_close(p.detach(), w - 0.5 * (w - cw), rtol=1e-13, atol=1e-14)
    losses = [float(sum(0.5 * (w - t).square().sum() for w, t in zip(w0, cs))) for cs in targets]
    assert info.loss == pytest.approx(sum(s * x for s, x in zip(shares(WEIGHTS), losses)), rel=1e-13)


def test_sam_ascends_and_descends_on_the_weighted_mean():
    params, targets, closure = problem()
    c = weighted_targets(targets)
    g = [p.detach() - cw for p, cw in zip(params, c)]
    norm = math.sqrt(sum(float(x.square().sum()) for x in g))
    torchsage.SAM(params, torch.optim.SGD, rho=0.3, lr=1.0).step(closure, weights=WEIGHTS)
    # gradient at W + e is W + e - C_w, so lr 1 lands on C_w - e with e = rho g_w / ||g_w||
    for p, cw, gi in zip(params, c, g):
        torch.testing.assert_close(p.detach(), cw - 0.3 * gi / norm, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("measure", ["normalized_std", "cosine"])
@pytest.mark.parametrize("lazy", [False, True])
def test_sage_disagreement_and_noise_use_the_weights(measure, lazy):
    params, targets, closure = problem(3)
    vectors = [torch.cat([(p.detach() - t).reshape(-1) for p, t in zip(params, cs)]) for cs in targets]
    expected = brute(vectors, WEIGHTS)[measure]
    opt = torchsage.SAGE(params, torch.optim.SGD, rho=0.05, gamma=0.2, disagreement=measure, lr=0.1, seed=0)
    info = opt.step((lambda: iter(closure())) if lazy else closure, weights=WEIGHTS)
    assert info.disagreement == pytest.approx(expected, rel=1e-12)
    assert info.noise_std == pytest.approx(0.2 * expected, rel=1e-12)


def test_align_ascent_uses_the_weighted_spread():
    """SAGEAlign's spread direction is polar(sqrt(weighted variance) * sign(weighted mean))."""
    params, targets, closure = problem(4)
    w0 = [p.detach().clone() for p in params]
    c = weighted_targets(targets)
    vectors = [[p.detach() - t for p, t in zip(params, cs)] for cs in targets]
    w = shares(WEIGHTS)
    mean = [sum(wk * v[i] for wk, v in zip(w, vectors)) for i in range(2)]
    spread = [
        sum(wk * (v[i] - mean[i]) ** 2 for wk, v in zip(w, vectors)).sqrt() * mean[i].sign() for i in range(2)
    ]
    flat = [torch.cat([x.reshape(-1) for x in v]) for v in vectors]
    cos = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(flat, 2)]
    lam = min(max(0.8 * (1 - sum(cos) / len(cos)), 0.0), 0.8)

    def direction(x):
        if x.ndim < 2:
            return x / x.norm()
        U, _, Vh = torch.linalg.svd(x, full_matrices=False)
        return U @ Vh

    dirs = [(1 - lam) * direction(m) + lam * direction(s) for m, s in zip(mean, spread)]
    rho = 0.2
    total = math.sqrt(sum(float(d.square().sum()) for d in dirs))
    opt = torchsage.SAGEAlign(params, torch.optim.SGD, rho=rho, lr=1.0, polar_method="svd")
    opt.step(closure, weights=WEIGHTS)
    for p, cw, d, _w in zip(params, c, dirs, w0):
        torch.testing.assert_close(p.detach(), cw - rho * d / total, rtol=1e-10, atol=1e-12)


def test_bad_weights_are_refused():
    params, _, closure = problem()
    opt = torchsage.SAGE(params, torch.optim.SGD, rho=0.05, lr=0.1)
    for bad, match in [
        ([1.0, 2.0], "2 weights but the closure returned 3"),
        ([1.0, 0.0, 2.0], "positive"),
        ([1.0, -1.0, 2.0], "positive"),
        ([1.0, math.nan, 2.0], "positive"),
        ("abc", "sequence"),
        (torch.ones(3, 1), "1-d"),
    ]:
        with pytest.raises(ValueError, match=match):
            opt.step(closure, weights=bad)
    with pytest.raises(ValueError, match="or more"):
        opt.step(lambda: iter(closure()), weights=[1.0, 2.0])
    sam = torchsage.SAM(params, torch.optim.SGD, rho=0.0, lr=0.1)
    with pytest.raises(ValueError, match="4 weights but the closure returned 3"):
        sam.step(lambda: iter(closure()), weights=[1.0] * 4)


def test_weights_with_a_solver_are_refused():
    params, _, closure = problem()
    opt = torchsage.SAGE(params, torch.optim.SGD, rho=0.05, lr=0.1, solver="mean")
    with pytest.raises(ValueError, match="solver"):
        opt.step(closure, weights=WEIGHTS)
