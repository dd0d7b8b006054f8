"""``polar_factor`` and the Polar Express schedule against an exact float64 SVD and scalar maths.

The reference polar factor is ``U @ Vh`` from ``torch.linalg.svd`` in float64, computed here (never
the library's own SVD path). Newton-Schulz applies one scalar polynomial to every singular value of
the Frobenius-normalised input, so ``U^T Q V`` must be diagonal and equal to that polynomial iterated
in float64 on ``S / ||S||``: that is the exact reference for every coefficient schedule.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchsage import polar_factor
from torchsage.polar import MUON_COEFFICIENTS, polar_express_coefficients

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)
dims = st.integers(min_value=1, max_value=20)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return Q * torch.sign(torch.diagonal(R))


def with_spectrum(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``U diag(s) V^T`` (float64) with random orthonormal ``U`` (m x r) and ``V`` (n x r), r = len(s)."""
    r = s.numel()
    U = random_orthogonal(m, gen)[:, :r]
    V = random_orthogonal(n, gen)[:, :r]
    return (U * s) @ V.T


def relative_spectrum(k: int, floor: float, gen: torch.Generator) -> torch.Tensor:
    """``k`` log-uniform singular values with unit Frobenius norm, every one at least ``floor``."""
    exponents = torch.rand(k, generator=gen, dtype=F64)
    exponents[0] = 0.0
    if k > 1:
        exponents[-1] = 1.0
    s = floor**exponents
    for _ in range(200):  # lift the small ones until s_i >= floor * ||s|| (a contraction)
        s = torch.maximum(s, 1.0000001 * floor * s.norm())
    return s / s.norm()


def svd_reference(G: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G.to(F64), full_matrices=False)
    r = S.shape[-1] if rank is None else rank
    return U[..., :, :r] @ Vh[..., :r, :]


def iterate_scalar(x: torch.Tensor, table) -> torch.Tensor:
    for a, b, c in table:
        x = a * x + b * x**3 + c * x**5
    return x


def spectral_action(G: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U^T Q V`` for the float64 SVD of ``G``, and ``G``'s singular values over its Frobenius norm."""
    U, S, Vh = torch.linalg.svd(G.to(F64), full_matrices=False)
    return U.mT @ Q.to(F64) @ Vh.mT, S / S.norm()


def assert_diagonal(M: torch.Tensor, diagonal: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(M, torch.diag(diagonal), rtol=0.0, atol=atol)


# -- method="svd" ---------------------------------------------------------------------------------

SHAPES = [(5, 5), (7, 4), (4, 7), (1, 6), (6, 1), (12, 30), (30, 12)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol", [(F64, 1e-12), (torch.float32, 2e-6)])
def test_svd_method_is_u_vt_and_orthogonal(shape, dtype, atol):
    G = torch.randn(shape, generator=generator(sum(shape)), dtype=dtype)
    Q = polar_factor(G, method="svd")
    assert Q.dtype == dtype and Q.shape == G.shape
    torch.testing.assert_close(Q.to(F64), svd_reference(G), rtol=0.0, atol=atol)
    m, n = shape
    Q64 = Q.to(F64)
    gram = Q64 @ Q64.T if m <= n else Q64.T @ Q64
    torch.testing.assert_close(gram, torch.eye(min(m, n), dtype=F64), rtol=0.0, atol=10 * atol)


@pytest.mark.parametrize("m, n, r", [(5, 7, 2), (7, 5, 3), (6, 6, 1), (4, 9, 3), (8, 3, 2)])
@pytest.mark.parametrize("dtype, atol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_svd_method_keeps_only_the_range_of_a_rank_deficient_matrix(m, n, r, dtype, atol):
    gen = generator(100 * m + 10 * n + r)
    U = random_orthogonal(m, gen)[:, :r]
    V = random_orthogonal(n, gen)[:, :r]
    s = torch.logspace(0, -1, r, dtype=F64)
    G = ((U * s) @ V.T).to(dtype)
    Q = polar_factor(G, method="svd").to(F64)
    # The polar factor of a rank-r matrix is the partial isometry U_r V_r^T: the null directions
    # (numerically ~ eps * ||G|| after rounding G to its dtype) must not be lifted to 1.
    torch.testing.assert_close(Q, U @ V.T, rtol=0.0, atol=atol)
    expected = torch.cat([torch.ones(r, dtype=F64), torch.zeros(min(m, n) - r, dtype=F64)])
    torch.testing.assert_close(torch.linalg.svdvals(Q), expected, rtol=0.0, atol=atol)


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (2, 5, 5)])
def test_svd_method_of_zero_is_zero(shape):
    Q = polar_factor(torch.zeros(shape, dtype=F64), method="svd")
    assert torch.equal(Q, torch.zeros(shape, dtype=F64))


def test_svd_method_batched_with_a_zero_matrix():
    G = torch.randn(4, 5, 3, generator=generator(1), dtype=F64)
    G[2] = 0.0
    Q = polar_factor(G, method="svd")
    assert torch.equal(Q[2], torch.zeros(5, 3, dtype=F64))
    for i in (0, 1, 3):
        torch.testing.assert_close(Q[i], svd_reference(G[i]), rtol=0.0, atol=1e-12)


# -- Newton-Schulz: accuracy ----------------------------------------------------------------------


@PROPERTY
@given(m=dims, n=dims, seed=seeds, log_scale=st.floats(-4.0, 4.0))
def test_polar_express_8_steps_lands_within_1e_3_of_one(m, n, seed, log_scale):
    gen = generator(seed)
    s = relative_spectrum(min(m, n), 1e-3, gen) * 10.0**log_scale
    G = with_spectrum(m, n, s, gen).float()
    Q = polar_factor(G, steps=8, coefficients="polar_express")
    assert Q.dtype == torch.float32 and Q.shape == (m, n)
    sv = torch.linalg.svdvals(Q.to(F64))
    assert (sv - 1.0).abs().max() <= 2e-3
    torch.testing.assert_close(Q.to(F64), svd_reference(G), rtol=0.0, atol=2e-3)
    M, _ = spectral_action(G, Q)
    assert_diagonal(M, torch.ones(min(m, n), dtype=F64), atol=2e-3)


@PROPERTY
@given(m=dims, n=dims, seed=seeds)
def test_muon_5_steps_band_and_singular_vectors(m, n, seed):
    gen = generator(seed)
    G = with_spectrum(m, n, relative_spectrum(min(m, n), 1e-2, gen), gen).float()
    Q = polar_factor(G)  # defaults: 5 muon steps
    sv = torch.linalg.svdvals(Q.to(F64))
    assert sv.min() >= 0.6 and sv.max() <= 1.2
    # Q = U f(S) V^T: the singular vectors are G's, the values the muon quintic iterated 5 times.
    M, s_rel = spectral_action(G, Q)
    expected = iterate_scalar(s_rel, [MUON_COEFFICIENTS] * 5)
    assert expected.min() >= 0.68 and expected.max() <= 1.135  # the documented band, in exact maths
    assert_diagonal(M, expected, atol=1e-4)


CUBIC = [(1.5, -0.5, 0.0)]  # the classical Newton-Schulz iteration, as a one-row table
TABLES = [
    ("muon", 5, [MUON_COEFFICIENTS] * 5),
    ("polar_express", 8, None),
    (CUBIC, 12, CUBIC * 12),
    ([(3.0, -3.2, 1.2), (2.0, -1.5, 0.5), (1.875, -1.25, 0.375)], 3, None),
]


@pytest.mark.parametrize("coefficients, steps, table", TABLES, ids=["muon", "pe", "cubic", "rows"])
@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (9, 5)])
def test_float64_iteration_is_the_scalar_polynomial_on_the_singular_values(coefficients, steps, table, shape):
    if table is None:
        table = polar_express_coefficients(steps, 1e-3) if coefficients == "polar_express" else coefficients
    gen = generator(7)
    G = with_spectrum(*shape, relative_spectrum(min(shape), 1e-2, gen) * 3.0, gen)
    Q = polar_factor(G, steps=steps, coefficients=coefficients, dtype=F64)
    assert Q.dtype == F64
    M, s_rel = spectral_action(G, Q)
    assert_diagonal(M, iterate_scalar(s_rel, table), atol=1e-10)


# -- Newton-Schulz: symmetries --------------------------------------------------------------------


@PROPERTY
@given(m=dims, n=dims, seed=seeds, coefficients=st.sampled_from(["muon", "polar_express"]))
def test_transpose_equivariance(m, n, seed, coefficients):
    G = torch.randn(m, n, generator=generator(seed), dtype=F64)
    kw = dict(steps=6, coefficients=coefficients, dtype=F64)
    torch.testing.assert_close(polar_factor(G.T, **kw), polar_factor(G, **kw).T, rtol=0.0, atol=1e-12)
    G32 = G.float()
    # float32: the transposed operand changes the summation order (~sqrt(20) * 2**-24 = 3e-7 per
    # product), grown by |p'| < 3.5 per step for the derandomized examples' singular values: 1e-5
    torch.testing.assert_close(polar_factor(G32.T), polar_factor(G32).T, rtol=0.0, atol=1e-5)


@PROPERTY
@given(m=dims, n=dims, seed=seeds, c=st.sampled_from([1e-6, 3.0, 1e4]))
def test_scale_invariance(m, n, seed, c):
    G = torch.randn(m, n, generator=generator(seed), dtype=F64)
    kw = dict(steps=8, coefficients="polar_express", dtype=F64)
    torch.testing.assert_close(polar_factor(c * G, **kw), polar_factor(G, **kw), rtol=0.0, atol=1e-12)
    G32 = G.float()
    # float32: the Frobenius normalisation rounds differently for c * G (one ulp, 6e-8), grown by
    # |p'| < 3.5 per step of the default five: 1e-5
    torch.testing.assert_close(polar_factor(c * G32), polar_factor(G32), rtol=0.0, atol=1e-5)


@PROPERTY
@given(m=dims, n=dims, seed=seeds, coefficients=st.sampled_from(["muon", "polar_express"]))
def test_orthogonal_equivariance(m, n, seed, coefficients):
    gen = generator(seed)
    G = torch.randn(m, n, generator=gen, dtype=F64)
    P, R = random_orthogonal(m, gen), random_orthogonal(n, gen)
    kw = dict(steps=5, coefficients=coefficients, dtype=F64)
    expected = P @ polar_factor(G, **kw) @ R
    torch.testing.assert_close(polar_factor(P @ G @ R, **kw), expected, rtol=0.0, atol=1e-10)


# -- Newton-Schulz: batching, edge values, dtypes ---------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 7, 4)])
# batched matmuls sum in another order: ~sqrt(7) * unit roundoff per product, grown by |p'| < 3.5
# per step over 8 steps at worst (3.5**8 * 1.6e-7 ~ 3e-3 is the bound; random 4..7-sized matrices
# stay far from it): float32 1e-4, float64 1e-13
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (F64, 1e-13)])
def test_batched_equals_per_matrix(shape, dtype, atol):
    G = torch.randn(shape, generator=generator(3), dtype=dtype)
    kw = dict(steps=8, coefficients="polar_express", dtype=dtype)
    Q = polar_factor(G, **kw)
    assert Q.shape == G.shape and Q.dtype == dtype
    for i in range(shape[0]):
        for j in range(shape[1]):
            torch.testing.assert_close(Q[i, j], polar_factor(G[i, j], **kw), rtol=0.0, atol=atol)
    # ... and each is close to its own exact polar factor.
    torch.testing.assert_close(Q.to(F64), svd_reference(G), rtol=0.0, atol=5e-3)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (3, 3), (1, 5), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_zero_matrix_gives_zeros(shape, dtype):
    Q = polar_factor(torch.zeros(shape), dtype=dtype)
    assert torch.equal(Q, torch.zeros(shape))


def test_zero_matrix_in_a_batch_leaves_the_others_alone():
    G = torch.randn(3, 4, 6, generator=generator(5))
    G[1] = 0.0
    Q = polar_factor(G, steps=8, coefficients="polar_express")
    assert torch.equal(Q[1], torch.zeros(4, 6))
    for i in (0, 2):
        torch.testing.assert_close(Q[i].to(F64), svd_reference(G[i]), rtol=0.0, atol=2e-3)


@pytest.mark.parametrize("shape", [(5, 7), (7, 5)])
def test_tiny_matrices(shape):
    G = torch.randn(shape, generator=generator(11))
    tiny = G * 1e-30  # its squared Frobenius norm (~1e-59) underflows float32
    Q = polar_factor(tiny, steps=8, coefficients="polar_express")
    torch.testing.assert_close(Q.to(F64), svd_reference(tiny), rtol=0.0, atol=2e-3)
    rescaled = (tiny.to(F64) * 1e30).float()
    torch.testing.assert_close(polar_factor(tiny), polar_factor(rescaled), rtol=0.0, atol=2e-6)

    subnormal = G * 1e-40  # every entry below float32's smallest normal number (1.2e-38)
    assert subnormal.abs().max() < torch.finfo(torch.float32).tiny
    Q = polar_factor(subnormal)
    assert torch.isfinite(Q).all()
    # The subnormal entries keep only ~16 bits, but the factor is still that of the stored matrix.
    rescaled = (subnormal.to(F64) * 1e40).float()
    torch.testing.assert_close(Q, polar_factor(rescaled), rtol=0.0, atol=1e-5)


def test_returns_the_input_dtype_and_shape():
    G = torch.randn(2, 5, 8, generator=generator(13), dtype=F64)
    reference = svd_reference(G)
    Q = polar_factor(G, steps=8, coefficients="polar_express")  # float32 iteration
    assert Q.dtype == F64 and Q.shape == G.shape
    torch.testing.assert_close(Q, reference, rtol=0.0, atol=2e-3)

    for H in (G.to(torch.bfloat16), G.mT.to(torch.bfloat16)):
        Q = polar_factor(H, steps=8, coefficients="polar_express")
        assert Q.dtype == torch.bfloat16 and Q.shape == H.shape
        torch.testing.assert_close(Q.to(F64), svd_reference(H), rtol=0.0, atol=2e-2)

    Q = polar_factor(G.float(), dtype=F64)
    assert Q.dtype == torch.float32


@pytest.mark.parametrize("shape", [(16, 16), (8, 24), (24, 8), (4, 8, 8)])
def test_bfloat16_iteration_is_close_to_float32(shape):
    G = torch.randn(shape, generator=generator(17))
    Q16 = polar_factor(G, dtype=torch.bfloat16)
    Q32 = polar_factor(G, dtype=torch.float32)
    assert Q16.dtype == torch.float32 and Q16.shape == G.shape
    assert (Q16 - Q32).abs().max() <= 5e-2
    # and bf16 muon still lands in the muon band for a well-conditioned matrix
    sv = torch.linalg.svdvals(Q16.to(F64))
    assert sv.min() >= 0.6 and sv.max() <= 1.2


# -- Polar Express coefficients -------------------------------------------------------------------


def quintic_error(coeffs, x: float) -> float:
    """``1 - p(x)`` evaluated exactly in rational arithmetic."""
    a, b, c = (Fraction(v) for v in coeffs)
    x = Fraction(x)
    return float(1 - (a * x + b * x**3 + c * x**5))


def grid_max_error(coeffs, lo: float, hi: float, points: int = 20001) -> tuple[float, float, float]:
    """``(max |1 - p|, min p, max p)`` on a dense grid of ``[lo, hi]``."""
    a, b, c = coeffs
    x = np.linspace(lo, hi, points)
    p = a * x + b * x**3 + c * x**5
    return float(np.abs(1.0 - p).max()), float(p.min()), float(p.max())


def interior_extrema(coeffs, lo: float, hi: float) -> list[float]:
    """Positive roots of ``p'(x) = a + 3 b x^2 + 5 c x^4`` strictly inside ``(lo, hi)``."""
    a, b, c = coeffs
    roots = np.roots([5 * c, 0.0, 3 * b, 0.0, a])
    return sorted(float(r.real) for r in roots if abs(r.imag) < 1e-12 and lo < r.real < hi)


@pytest.mark.parametrize("steps, lower", [(8, 1e-3), (10, 1e-3), (8, 1e-2), (8, 0.1), (6, 0.5)])
def test_polar_express_coefficients_are_equioscillating_minimax_fits(steps, lower):
    table = polar_express_coefficients(steps, lower)
    assert len(table) == steps
    lo, hi = lower, 1.0
    for k, coeffs in enumerate(table):
        E, p_min, p_max = grid_max_error(coeffs, lo, hi)
        if E > 1e-12:
            # Chebyshev alternation: |1 - p| reaches its maximum E with alternating signs at both
            # ends and at the two interior extrema, so no odd quintic does better on [lo, hi].
            xs = interior_extrema(coeffs, lo, hi)
            assert len(xs) == 2, f"step {k}: interior extrema {xs} in [{lo}, {hi}]"
            errors = [quintic_error(coeffs, x) for x in (lo, *xs, hi)]
            E = max(abs(e) for e in errors)
            assert [np.sign(e) for e in errors] == [1, -1, 1, -1], f"step {k}: {errors}"
            for e in errors:
                assert abs(e) == pytest.approx(E, rel=1e-6, abs=1e-15), f"step {k}: {errors}"
            assert grid_max_error(coeffs, lo, hi)[0] <= E * (1 + 1e-6) + 1e-15
            # Local optimality: nudging any coefficient makes the worst error larger.
            for i in range(3):
                for factor in (1.01, 0.99, 1.0001):
                    nudged = list(coeffs)
                    nudged[i] *= factor
                    assert grid_max_error(nudged, lo, hi)[0] > E, f"step {k}: coefficient {i} * {factor}"
            p_min, p_max = min(p_min, 1 - E), max(p_max, 1 + E)
        else:
            # The interval has collapsed onto 1: p(1) = 1, p'(1) = p''(1) = 0.
            assert coeffs == pytest.approx((15 / 8, -10 / 8, 3 / 8), abs=1e-6)
        lo, hi = p_min, p_max
    if lower == 1e-3 and steps >= 8:
        assert 1 - 1e-3 <= lo and hi <= 1 + 1e-3
        assert max(1 - lo, hi - 1) <= 1e-9  # the error squares (and more) once near 1
    distances = [max(abs(x - y) for x, y in zip(c, (15 / 8, -10 / 8, 3 / 8))) for c in table]
    assert distances[-1] <= 1e-6
    assert all(later <= earlier for earlier, later in zip(distances[-4:], distances[-3:]))


def test_polar_express_schedule_maps_the_whole_interval_near_one():
    x = torch.logspace(-3, 0, 20001, dtype=F64)
    assert (iterate_scalar(x, polar_express_coefficients(6, 1e-3)) - 1).abs().max() <= 1e-3
    assert (iterate_scalar(x, polar_express_coefficients(8, 1e-3)) - 1).abs().max() <= 1e-9
    # the first steps of a longer schedule are the shorter schedule (each step is a greedy fit)
    assert polar_express_coefficients(8, 1e-3)[:5] == polar_express_coefficients(5, 1e-3)


# -- argument checking ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "G, kwargs",
    [
        (torch.randn(5), {}),
        (torch.tensor(1.0), {}),
        (torch.ones(3, 4, dtype=torch.int64), {}),
        (torch.ones(3, 4, dtype=torch.int64), {"method": "svd"}),
        (torch.randn(3, 4), {"method": "qr"}),
        (torch.randn(3, 4), {"coefficients": "muon2"}),
        (torch.randn(3, 4), {"steps": 0}),
        (torch.randn(3, 4), {"steps": -1}),
        (torch.randn(3, 4), {"steps": True}),
        (torch.randn(3, 4), {"steps": 2.0}),
        (torch.randn(3, 4), {"coefficients": [(1.5, -0.5)]}),
        (torch.randn(3, 4), {"coefficients": [(1.5, -0.5, 0.0, 0.0)] * 5}),
        (torch.randn(3, 4), {"steps": 5, "coefficients": [(1.5, -0.5, 0.0)] * 3}),
        (torch.randn(3, 4), {"steps": 2, "coefficients": [(1.5, -0.5, 0.0)] * 3}),
        (torch.randn(3, 4), {"dtype": torch.int32}),
    ],
)
def test_bad_arguments_raise_value_error(G, kwargs):
    with pytest.raises(ValueError):
        polar_factor(G, **kwargs)


@pytest.mark.parametrize("steps, lower", [(0, 1e-3), (3, 0.0), (3, 1.0), (3, -0.5)])
def test_bad_polar_express_arguments_raise_value_error(steps, lower):
    with pytest.raises(ValueError):
        polar_express_coefficients(steps, lower)
