"""The ascent of every optimizer, read off exactly on problems with an identity Hessian.

With ``L_k(W) = 0.5 ||W - C_k||^2`` the gradient at ``W + e`` is ``W + e - C_bar``, so one SGD step
with ``lr = 1`` and no noise lands on ``C_bar - e``: the perturbation is revealed exactly and is
compared with formulas computed here from a float64 SVD.
"""

import math

import pytest
import torch

import torchsage
from torchsage.optim import SAGEAlign


def svd_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double().reshape(G.shape[0], -1), full_matrices=False)
    return (U @ Vh).reshape(G.shape)


def quadratic_problem(K=3, shapes=((5, 7), (4, 3, 2, 2), (6,)), dtype=torch.float64):
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    targets = [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(K)]

    def closure():
        return [sum(0.5 * (p - c).square().sum() for p, c in zip(params, cs)) for cs in targets]

    mean_targets = [torch.stack([cs[i] for cs in targets]).mean(0) for i in range(len(shapes))]
    return params, targets, mean_targets, closure


def revealed_perturbation(opt, params, mean_targets, closure):
    opt.step(closure)
    return [(c - p).detach() for p, c in zip(params, mean_targets)]


@pytest.mark.parametrize("scaling", ["global", "layer", "weight"])
def test_sage_ascent_is_the_scaled_polar_factor(scaling):
    params, _, mean_targets, closure = quadratic_problem()
    w0 = [p.detach().clone() for p in params]
    grads = [w - c for w, c in zip(w0, mean_targets)]
    rho = 0.3
    directions = [svd_polar(g) if g.ndim >= 2 else g / g.norm() for g in grads]
    if scaling == "global":
        total = math.sqrt(sum(float(d.square().sum()) for d in directions))
        expected = [rho * d / total for d in directions]
    elif scaling == "layer":
        expected = [rho * d for d in directions]
    else:
        expected = [rho * (w.norm() if w.ndim >= 2 else 1.0) * d for w, d in zip(w0, directions)]

    opt = torchsage.SAGE(
        params, torch.optim.SGD, rho=rho, gamma=0.0, lr=1.0, polar_method="svd", rho_scaling=scaling
    )
    got = revealed_perturbation(opt, params, mean_targets, closure)
    for e, x in zip(got, expected):
        torch.testing.assert_close(e, x, rtol=1e-9, atol=1e-10)


def test_sage_newton_schulz_ascent_is_close_to_exact_polar_express():
    params, _, mean_targets, closure = quadratic_problem(shapes=((8, 12),))
    g = params[0].detach() - mean_targets[0]
    expected = 0.1 * svd_polar(g) / math.sqrt(8)
    opt = torchsage.SAGE(
        params, torch.optim.SGD, rho=0.1, gamma=0.0, lr=1.0, ns_steps=8, ns_coefficients="polar_express"
    )
    (e,) = revealed_perturbation(opt, params, mean_targets, closure)
    assert (e - expected).norm() / expected.norm() < 5e-3


def test_sam_ascent_is_the_normalised_gradient_over_all_parameters():
    params, _, mean_targets, closure = quadratic_problem()
    grads = [p.detach() - c for p, c in zip(params, mean_targets)]
    total = math.sqrt(sum(float(g.square().sum()) for g in grads))
    opt = torchsage.SAM(params, torch.optim.SGD, rho=0.2, lr=1.0)
    got = revealed_perturbation(opt, params, mean_targets, closure)
    for e, g in zip(got, grads):
        torch.testing.assert_close(e, 0.2 * g / total, rtol=1e-9, atol=1e-12)


def test_asam_ascent_matches_its_formula():
    params, _, mean_targets, closure = quadratic_problem()
    w0 = [p.detach().clone() for p in params]
    grads = [w - c for w, c in zip(w0, mean_targets)]
    eta, rho = 0.01, 0.5
    scale = [w.abs() + eta for w in w0]
    total = math.sqrt(sum(float((t * g).square().sum()) for t, g in zip(scale, grads)))
    opt = torchsage.ASAM(params, torch.optim.SGD, rho=rho, eta=eta, lr=1.0)
    got = revealed_perturbation(opt, params, mean_targets, closure)
    for e, t, g in zip(got, scale, grads):
        torch.testing.assert_close(e, rho * t * t * g / total, rtol=1e-9, atol=1e-12)


def test_align_ascent_mixes_mean_and_spread_directions():
    K = 4
    params, targets, mean_targets, closure = quadratic_problem(K=K, shapes=((5, 6), (3,)))
    w0 = [p.detach().clone() for p in params]
    per_k = [[w - c for w, c in zip(w0, cs)] for cs in targets]
    flat = torch.stack([torch.cat([g.flatten() for g in gs]) for gs in per_k])
    unit = flat / flat.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    mean_cos = float((cos.sum() - K) / (K * (K - 1)))
    lam = min(max(0.8 * (1 - mean_cos), 0.0), 0.8)
    assert 0 < lam < 0.8
    dirs = []
    for i, w in enumerate(w0):
        stacked = torch.stack([gs[i] for gs in per_k])
        g_bar = stacked.mean(0)
        spread = stacked.std(0, unbiased=False) * torch.sign(g_bar)
        if w.ndim >= 2:
            dirs.append((1 - lam) * svd_polar(g_bar) + lam * svd_polar(spread))
        else:
            dirs.append((1 - lam) * g_bar / g_bar.norm() + lam * spread / spread.norm())
    total = math.sqrt(sum(float(d.square().sum()) for d in dirs))
    rho = 0.25
    opt = SAGEAlign(params, torch.optim.SGD, rho=rho, lr=1.0, polar_method="svd")
    got = revealed_perturbation(opt, params, mean_targets, closure)
    for e, d in zip(got, dirs):
        torch.testing.assert_close(e, rho * d / total, rtol=1e-8, atol=1e-10)
    assert opt.ascent.last_lambda == pytest.approx(lam, rel=1e-9)


def test_groups_have_their_own_rho():
    params, _, mean_targets, closure = quadratic_problem(shapes=((4, 4), (3, 5)))
    g0 = params[0].detach() - mean_targets[0]
    opt = torchsage.SAGE(
        [{"params": [params[0]], "rho": 0.1}, {"params": [params[1]], "rho": 0.0}],
        torch.optim.SGD,
        gamma=0.0,
        lr=1.0,
        polar_method="svd",
        rho_scaling="layer",
    )
    e0, e1 = revealed_perturbation(opt, params, mean_targets, closure)
    torch.testing.assert_close(e0, 0.1 * svd_polar(g0), rtol=1e-9, atol=1e-12)
    assert e1.abs().max() < 1e-12  # rounding of C_bar - (W - g) only


def diagonal_quadratic(n=12):
    # L(w) = 0.5 w^T A w - b^T w with diagonal A: g(w) = A w - b, exactly.
    a = torch.linspace(0.5, 3.0, n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    return w, a, b, lambda: [0.5 * (a * w * w).sum() - (b * w).sum()]


def test_gsam_descends_along_the_perturbed_gradient_minus_the_orthogonal_clean_part():
    w, a, b, closure = diagonal_quadratic()
    w0 = w.detach().clone()
    g = a * w0 - b
    e = 0.1 * g / g.norm()
    g_p = a * (w0 + e) - b
    g_orth = g - (g @ g_p) / (g_p @ g_p) * g_p
    expected = w0 - (g_p - 0.3 * g_orth)
    torchsage.optim.GSAM([w], torch.optim.SGD, rho=0.1, alpha=0.3, lr=1.0).step(closure)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    assert g_orth.norm() > 1e-3  # the correction is not trivially zero here


def test_sagm_ascends_with_pullback_and_descends_with_the_mean_of_both_gradients():
    w, a, b, closure = diagonal_quadratic()
    w0 = w.detach().clone()
    g = a * w0 - b
    e = (0.1 / g.norm() - 0.01) * g
    g_p = a * (w0 + e) - b
    torchsage.optim.SAGM([w], torch.optim.SGD, rho=0.1, alpha=0.01, lr=1.0).step(closure)
    torch.testing.assert_close(w.detach(), w0 - 0.5 * (g + g_p), rtol=1e-12, atol=1e-12)
