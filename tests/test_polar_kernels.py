"""Newton-Schulz kernels: bfloat16 accuracy against a float64 SVD, the low-precision Polar Express
margin, batching of equal shapes in SAGE's ascent, and the ``torch.compile`` option.

References: ``U V^T`` from ``torch.linalg.svd`` in float64 computed here, the minimax error of each
quintic evaluated on a dense grid, per-matrix calls for the batched ascent.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import torchsage
import torchsage.polar
from torchsage import polar_factor
from torchsage.optim import PolarAscent
from torchsage.polar import LOW_PRECISION_MARGIN, polar_express_coefficients

F64 = torch.float64


def exact_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.to(F64), full_matrices=False)
    return U @ Vh


def spectrum_matrix(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=F64))
    return (U * s) @ V.T


def singular_values(Q: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(Q.to(F64))


# -- bfloat16 against float64 --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64)])
def test_bf16_muon_stays_within_bf16_rounding_of_float32(shape):
    # Newton-Schulz applies one scalar quintic to every singular value of G / ||G||_F: iterated in
    # float64 on the exact singular values it gives the exact singular values of the result.
    gen = torch.Generator().manual_seed(sum(shape))
    r = min(shape)
    G = spectrum_matrix(*shape, torch.logspace(0, -2, r, dtype=F64), gen).float()
    s_rel = torch.linalg.svdvals(G.double()) / torch.linalg.matrix_norm(G.double())
    expected = s_rel.clone()
    for _ in range(5):
        expected = 3.4445 * expected - 4.7750 * expected**3 + 2.0315 * expected**5
    expected = expected.sort(descending=True).values
    exact = exact_polar(G)
    q32 = polar_factor(G, dtype=torch.float32)
    q16 = polar_factor(G, dtype=torch.bfloat16)
    assert q16.dtype == torch.float32  # returned in the input's dtype
    torch.testing.assert_close(singular_values(q32), expected, rtol=0, atol=1e-4)
    # bfloat16 (8 mantissa bits) moves every singular value by a few 1e-3 and the factor by 1e-2 to 4e-2.
    torch.testing.assert_close(singular_values(q16), expected, rtol=0, atol=3e-2)
    gap = torch.linalg.matrix_norm(q16.double() - q32.double()) / math.sqrt(r)
    assert gap < 5e-2
    # Neither is the exact factor (Muon stops in [0.68, 1.2]); bf16 is barely further from it.
    d32 = torch.linalg.matrix_norm(q32.double() - exact) / math.sqrt(r)
    d16 = torch.linalg.matrix_norm(q16.double() - exact) / math.sqrt(r)
    assert d16 < d32 + 3e-2


def test_bf16_polar_express_is_stable_on_random_matrices():
    # Without the margin, bfloat16 rounding pushes singular values past the first quintics'
    # interval and later steps blow them up (measured: up to 1e19 on such matrices).
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(12):
        G = torch.randn(64, 192, generator=gen)
        s = singular_values(polar_factor(G, steps=8, coefficients="polar_express", dtype=torch.bfloat16))
        s_exact = torch.linalg.svdvals(G.double())
        assert s_exact.min() / torch.linalg.matrix_norm(G.double()) > 1e-3  # inside the fitted range
        worst = max(worst, float((s - 1).abs().max()))
    assert worst < 2e-2


def test_margin_quintics_are_minimax_fits_on_the_widened_intervals():
    table = polar_express_coefficients(8, 1e-3, LOW_PRECISION_MARGIN)
    widen = 1 + LOW_PRECISION_MARGIN
    lo, hi = 1e-3, widen
    for a, b, c in table:
        x = torch.linspace(lo, hi, 20001, dtype=F64)
        p = a * x + b * x**3 + c * x**5
        err = (p - 1).abs()
        # equioscillation: the error at both ends equals the maximum over the interval
        assert float(err[0]) == pytest.approx(float(err.max()), rel=1e-6, abs=1e-12)
        assert float(err[-1]) == pytest.approx(float(err.max()), rel=1e-6, abs=1e-12)
        lo, hi = (1 - float(err.max())) / widen, (1 + float(err.max())) * widen
    # In exact arithmetic the schedule still converges: 8 steps take [1e-3, 1] to within 1e-2 of 1.
    x = torch.logspace(-3, 0, 2001, dtype=F64)
    for a, b, c in table:
        x = a * x + b * x**3 + c * x**5
    assert float((x - 1).abs().max()) < 1e-2
    assert polar_express_coefficients(8, 1e-3) != table  # float32 keeps the plain schedule


def test_margin_is_checked():
    with pytest.raises(ValueError, match="margin must lie in"):
        polar_express_coefficients(8, 1e-3, -0.1)


# -- batching in the ascent -----------------------------------------------------------------------


def test_equal_shapes_share_one_batched_call(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(16, 8, generator=gen),
        torch.randn(4, 2, 3, 3, generator=gen),  # conv kernel: (4, 18)
        torch.randn(16, 8, generator=gen),
        torch.randn(7, generator=gen),
        torch.randn(16, 8, generator=gen),
        torch.randn(4, 18, generator=gen),  # same (rows, cols) as the conv kernel
    ]
    calls = []
    real = torchsage.polar.polar_factor

    def counting(G, **kwargs):
        calls.append(tuple(G.shape))
        return real(G, **kwargs)

    monkeypatch.setattr(torchsage.polar, "polar_factor", counting)  # the ascent calls it by module
    out = PolarAscent().directions(grads)
    assert sorted(calls) == [(2, 4, 18), (3, 16, 8)]  # one call per distinct shape
    for g, d in zip(grads, out):
        assert d.shape == g.shape
        if g.ndim >= 2:
            alone = real(g.reshape(g.shape[0], -1))
            # a batched matmul sums in another order: ~sqrt(18) * 2**-24 = 3e-7 per product, grown
            # by at most |p'| < 3.5 per Muon step on these well-conditioned matrices: 1e-5
            torch.testing.assert_close(d.reshape(g.shape[0], -1), alone, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(d, g / g.norm())


# -- torch.compile ---------------------------------------------------------------------------------


def test_compiled_kernel_matches_eager():
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(3, 12, 20, generator=gen)
    eager = polar_factor(G)
    compiled = polar_factor(G, compile=True)
    # inductor fuses and reorders the float32 sums: ~sqrt(20) * 2**-24 = 3e-7 per product, grown by
    # at most |p'| < 3.5 per step over five Muon steps (worst case 3.5**5 * 3e-7 = 2e-4): 1e-4
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    # and both against the exact factor, per matrix: Muon's five steps, singular values in [0.6, 1.2]
    for Q in compiled:
        s = singular_values(Q)
        assert s.min() > 0.6 and s.max() < 1.2


def test_compile_failure_names_the_backend_error(monkeypatch):
    from torchsage import polar

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(polar, "_compiled_kernels", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(
        RuntimeError, match=r"torch.compile of the Newton-Schulz kernel failed.*no C\+\+ compiler"
    ):
        polar_factor(torch.randn(4, 6), compile=True)


def test_compile_flag_is_checked():
    with pytest.raises(ValueError, match="compile must be True or False"):
        polar_factor(torch.randn(4, 6), compile="yes")
    with pytest.raises(ValueError, match="compile must be True or False"):
        PolarAscent(compile=1)


def test_sage_bf16_perturbation_tracks_float32():
    # SAGE's ns_dtype: the perturbed loss with a bf16 ascent is close to the float32 one.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    data = [(torch.randn(10, 6), torch.randint(0, 3, (10,))) for _ in range(3)]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        clone = copy.deepcopy(model)  # same weights for both precisions
        opt = torchsage.SAGE(clone.parameters(), torch.optim.SGD, rho=0.5, gamma=0.0, ns_dtype=dtype, lr=0.1)
        results[dtype] = opt.step(
            lambda clone=clone: [torch.nn.functional.cross_entropy(clone(x), y) for x, y in data]
        )
    a, b = results[torch.float32], results[torch.bfloat16]
    assert a.loss == b.loss  # the clean pass is the same float32 code
    # bf16 keeps 8 bits (2**-8 = 4e-3 per rounding): the direction is off by ~1e-2 relative, the
    # perturbed loss by ||g|| * rho * 1e-2 ~ 3e-3 of itself: 1e-2
    assert b.perturbed_loss == pytest.approx(a.perturbed_loss, rel=1e-2)
    assert b.perturbation_norm == pytest.approx(0.5, rel=1e-5)  # global scaling: the norm is rho


def test_outer_autocast_does_not_change_the_iteration_precision():
    gen = torch.Generator().manual_seed(9)
    G = torch.randn(2, 10, 14, generator=gen)
    plain = polar_factor(G)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (G @ G.mT).dtype == torch.bfloat16  # autocast is on for matrix products here
        inside = polar_factor(G)
    assert torch.equal(inside, plain)


def test_sage_ns_compile_routes_through_the_compiled_kernel(monkeypatch):
    from torchsage import polar

    seen = []

    def fake_compiled(kernel):  # stands in for the compiled kernel: records, then runs eagerly
        def run(X, *args):
            seen.append(tuple(X.shape))
            return kernel(X, *args)

        return run

    monkeypatch.setattr(polar, "_compiled", fake_compiled)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    data = [(torch.randn(10, 6), torch.randint(0, 3, (10,))) for _ in range(2)]
    twin = copy.deepcopy(model)
    infos = []
    for m, flag in ((model, True), (twin, False)):
        opt = torchsage.SAGE(m.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, ns_compile=flag, lr=0.1)
        infos.append(opt.step(lambda m=m: [torch.nn.functional.cross_entropy(m(x), y) for x, y in data]))
    assert sorted(seen) == [(3, 12), (6, 12)]  # both weight matrices, in the wide orientation
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
