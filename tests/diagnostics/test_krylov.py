"""The flat-vector building blocks against dense linear algebra: CG, Hutchinson, Lanczos, HVPs."""

import math

import pytest
import torch

from torchsage.diagnostics import (
    CGInfo,
    conjugate_gradient,
    hessian_vector_product,
    hutchinson_trace,
    lanczos,
)

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=F64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ Q.T


# --- conjugate gradients ---------------------------------------------------------------------------


def test_cg_matches_dense_solve_on_spd_matrix():
    M = torch.randn(30, 30, generator=_gen(1), dtype=F64)
    A = M @ M.T + 0.5 * torch.eye(30, dtype=F64)
    b = torch.randn(30, generator=_gen(2), dtype=F64)
    x, info = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=200, true_residual=True)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=0)
    assert info.converged and not info.negative_curvature
    assert 0 < info.iterations <= 200
    assert info.residual == pytest.approx(float(torch.linalg.norm(b - A @ x) / torch.linalg.norm(b)))
    assert info.residual <= 1e-12
    assert info.min_curvature >= float(torch.linalg.eigvalsh(A)[0]) - 1e-9


def test_cg_zero_right_hand_side_returns_zero_without_products():
    calls = []
    x, info = conjugate_gradient(lambda v: calls.append(v) or v, torch.zeros(4, dtype=F64))
    assert torch.equal(x, torch.zeros(4, dtype=F64)) and not calls
    assert info == CGInfo(True, 0, 0.0, False, math.inf)


@pytest.mark.parametrize(
    "eigenvalues", [[3.0, 2.0, 1.0, 0.5, -0.7], [1.0, -1.0], [0.0, 0.0, 0.0], [2.0, 1.0, 0.0]]
)
def test_cg_reports_negative_curvature_without_nan(eigenvalues):
    A = _symmetric(eigenvalues, seed=3)
    b = torch.randn(len(eigenvalues), generator=_gen(4), dtype=F64)
    x, info = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=100, true_residual=True)
    assert info.negative_curvature and not info.converged
    assert info.min_curvature <= 1e-12
    assert bool(torch.isfinite(x).all()) and math.isfinite(info.residual)


def test_cg_stops_at_max_iter_and_reports_the_residual():
    A = torch.diag(torch.logspace(0, 4, 40, dtype=F64))
    b = torch.ones(40, dtype=F64)
    x, info = conjugate_gradient(lambda v: A @ v, b, tol=1e-10, max_iter=3)
    assert info.iterations == 3 and not info.converged and not info.negative_curvature
    true = float(torch.linalg.norm(b - A @ x) / torch.linalg.norm(b))
    assert info.residual == pytest.approx(true, rel=1e-6)


def test_cg_rejects_bad_input():
    b = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="non-finite"):
        conjugate_gradient(lambda v: v * math.nan, b)
    with pytest.raises(ValueError, match="shape"):
        conjugate_gradient(lambda v: v[:2], b)
    with pytest.raises(ValueError, match="1-D"):
        conjugate_gradient(lambda v: v, torch.ones(2, 2))
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: v, b, tol=-1.0)


# --- Hutchinson --------------------------------------------------------------------------------------


def test_hutchinson_is_exact_for_a_diagonal_matrix():
    d = torch.linspace(-2.0, 5.0, 17, dtype=F64)
    estimate, stderr = hutchinson_trace(lambda v: d * v, 17, samples=5, generator=_gen())
    assert estimate == pytest.approx(float(d.sum()), abs=1e-12) and stderr == 0.0


def test_hutchinson_estimate_and_standard_error():
    A = _symmetric(torch.linspace(-1.0, 4.0, 40).tolist(), seed=5)
    samples = 400
    estimate, stderr = hutchinson_trace(lambda v: A @ v, 40, samples=samples, generator=_gen(6))
    assert abs(estimate - float(A.trace())) <= 4 * stderr
    # Var[z^T A z] = 2 sum_{i != j} A_ij^2 for Rademacher z.
    off = A - torch.diag(A.diagonal())
    expected = math.sqrt(2 * float((off**2).sum()) / samples)
    assert stderr == pytest.approx(expected, rel=0.25)


def test_hutchinson_is_reproducible_and_checks_arguments():
    A = _symmetric([1.0, 2.0, 3.0], seed=7)
    first = hutchinson_trace(lambda v: A @ v, 3, samples=8, generator=_gen(1))
    assert hutchinson_trace(lambda v: A @ v, 3, samples=8, generator=_gen(1)) == first
    with pytest.raises(ValueError, match="at least 2"):
        hutchinson_trace(lambda v: A @ v, 3, samples=1)


# --- Lanczos -----------------------------------------------------------------------------------------


def test_lanczos_with_a_full_basis_is_exact():
    spectrum = torch.linspace(-3.0, 7.0, 25, dtype=F64)
    A = _symmetric(spectrum.tolist(), seed=8)
    values, residuals = lanczos(lambda v: A @ v, 25, steps=25, k=3, generator=_gen())
    torch.testing.assert_close(values, spectrum.flip(0)[:3], rtol=1e-10, atol=1e-10)
    assert values.dtype == F64 and bool((residuals < 1e-8).all())


def test_lanczos_top_eigenvalues_and_residual_bounds():
    spectrum = [50.0, 30.0, 20.0, *torch.linspace(-1.0, 5.0, 197).tolist()]
    A = _symmetric(spectrum, seed=9)
    values, residuals = lanczos(lambda v: A @ v, 200, steps=40, k=3, generator=_gen(2))
    torch.testing.assert_close(values, torch.tensor([50.0, 30.0, 20.0], dtype=F64), rtol=1e-8, atol=0)
    exact = torch.linalg.eigvalsh(A)
    for value, residual in zip(values, residuals):  # an eigenvalue lies within the residual
        assert float((exact - value).abs().min()) <= float(residual) + 1e-10
    # Few steps: Ritz values are interior, the residual bound still holds.
    values, residuals = lanczos(lambda v: A @ v, 200, steps=4, k=2, generator=_gen(2))
    assert float(values[0]) <= 50.0 + 1e-10
    for value, residual in zip(values, residuals):
        assert float((exact - value).abs().min()) <= float(residual) + 1e-10


@pytest.mark.parametrize(
    "spectrum", [[3.0] * 3 + [1.0] * 5, [4.0, 2.0] + [0.0] * 10], ids=["repeated", "low-rank"]
)
def test_lanczos_continues_past_an_invariant_subspace(spectrum):
    """A random start only sees one copy of a repeated eigenvalue: the restart finds the others."""
    A = _symmetric(spectrum, seed=10)
    n = len(spectrum)
    values, _ = lanczos(lambda v: A @ v, n, steps=n, k=n, generator=_gen(3))
    torch.testing.assert_close(
        values, torch.tensor(sorted(spectrum, reverse=True), dtype=F64), atol=1e-10, rtol=0
    )


def test_lanczos_checks_arguments():
    with pytest.raises(ValueError, match="k must be"):
        lanczos(lambda v: v, 5, steps=2, k=3)
    with pytest.raises(ValueError, match="steps"):
        lanczos(lambda v: v, 5, steps=0)


# --- Hessian-vector products -------------------------------------------------------------------------


def test_hessian_vector_product_matches_the_autograd_hessian():
    a = torch.randn(3, 2, generator=_gen(11), dtype=F64, requires_grad=True)
    b = torch.randn(4, generator=_gen(12), dtype=F64, requires_grad=True)
    unused = torch.randn(2, dtype=F64, requires_grad=True)
    linear = torch.randn(2, dtype=F64, requires_grad=True)

    def loss_of(a_, b_, unused_, linear_):
        return torch.tanh(a_).pow(3).sum() * b_.sin().sum() + (b_**4).sum() + linear_.sum() + 0 * unused_[0]

    flat = torch.cat([t.detach().reshape(-1) for t in (a, b, unused, linear)])

    def flat_loss(theta):
        return loss_of(theta[:6].reshape(3, 2), theta[6:10], theta[10:12], theta[12:14])

    H = torch.autograd.functional.hessian(flat_loss, flat)
    v = torch.randn(14, generator=_gen(13), dtype=F64)
    hv = hessian_vector_product(lambda: loss_of(a, b, unused, linear), [a, b, unused, linear], v)
    torch.testing.assert_close(hv, H @ v, rtol=1e-12, atol=1e-12)
    assert a.grad is None and b.grad is None
    # A loss without curvature in any parameter gives zeros, not an error.
    zero = hessian_vector_product(lambda: linear.sum(), [linear], torch.ones(2, dtype=F64))
    assert torch.equal(zero, torch.zeros(2, dtype=F64))


def test_hessian_vector_product_checks_arguments():
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="flat vector"):
        hessian_vector_product(lambda: (w**2).sum(), [w], torch.ones(2))
    with pytest.raises(ValueError, match="requires grad"):
        hessian_vector_product(lambda: (w**2).sum(), [torch.ones(3)], torch.ones(3))
    with pytest.raises(ValueError, match="scalar"):
        hessian_vector_product(lambda: w**2, [w], torch.ones(3))
