"""The faster exact paths of ``polar_factor``: Gram Newton-Schulz and zero-row/column compaction.

References are independent of the code: ``U^T Q V`` for the float64 SVD ``G = U S V^T`` must be
the diagonal of the coefficient polynomial iterated in float64 on ``S / ||S||`` (the Gram form applies
the same polynomial, only in another order), and zero rows and columns of ``G`` have zero rows and
columns in the exact polar factor ``U V^T``.
"""

from __future__ import annotations

import pytest
import torch

from test_polar import (
    assert_diagonal,
    generator,
    iterate_scalar,
    relative_spectrum,
    spectral_action,
    with_spectrum,
)
from torchsage import polar
from torchsage.polar import GRAM_MIN_ASPECT, newton_schulz_coefficients, polar_factor

F64 = torch.float64
SCHEDULES = [("muon", 5), ("polar_express", 8), ("muon", 9)]


@pytest.mark.parametrize(("coefficients", "steps"), SCHEDULES)
@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (12, 30), (9, 9), (1, 7)])
def test_gram_form_applies_the_polynomial_to_every_singular_value(coefficients, steps, shape):
    gen = generator(sum(shape) * steps)
    r = min(shape)
    G = with_spectrum(*shape, relative_spectrum(r, 1e-2, gen), gen)
    Q = polar_factor(G, steps=steps, coefficients=coefficients, method="gram_newton_schulz", dtype=F64)
    M, s = spectral_action(G, Q)
    expected = iterate_scalar(s, newton_schulz_coefficients(steps, coefficients, F64))
    # float64: each product rounds at ~n * 2**-53 = 1e-14; the Gram form multiplies the m x m
    # iterates about 4 times per step and the polynomial's slope is at most 3.5 in magnitude, so
    # after 9 steps the error stays below 3.5**9 * 4 * 9 * 1e-14 = 3e-9: 1e-8
    assert_diagonal(M, expected, atol=1e-8)


@pytest.mark.parametrize(("coefficients", "steps"), SCHEDULES[:2])
def test_gram_form_in_float32_is_as_accurate_as_the_plain_iteration(coefficients, steps):
    gen = generator(11)
    G = torch.randn(4, 48, 300, generator=gen, dtype=F64)
    exact = polar_factor(G, method="svd")
    plain = polar_factor(G.float(), steps=steps, coefficients=coefficients).double()
    gram = polar_factor(
        G.float(), steps=steps, coefficients=coefficients, method="gram_newton_schulz"
    ).double()
    for Qg, G_k in zip(gram, G):
        M, s = spectral_action(G_k, Qg)
        expected = iterate_scalar(s, newton_schulz_coefficients(steps, coefficients))
        # float32 products round at ~sqrt(300) * 6e-8 = 1e-6 relative, grown at most 3.5x per step
        # over 5 Muon steps (3.5**5 * 1e-6 = 5e-4); Polar Express's 8 steps contract near 1: 1e-3
        assert_diagonal(M, expected, atol=1e-3)
    dist = lambda Q: torch.linalg.matrix_norm(Q - exact)  # noqa: E731
    # the same distance to the exact factor as the iteration it replaces, up to float32 rounding
    torch.testing.assert_close(dist(gram), dist(plain), rtol=1e-3, atol=1e-4)


def test_gram_form_in_bfloat16_stays_in_the_iterations_band():
    G = torch.randn(3, 32, 400, generator=generator(4))
    Q = polar_factor(G, method="gram_newton_schulz", dtype=torch.bfloat16)
    assert Q.dtype == torch.float32
    s = torch.linalg.svdvals(Q.double())
    # five Muon steps map singular values above ~1e-2 of the norm into [0.68, 1.13]; bf16 rounding
    # (2**-8 relative) moves them by a few 1e-3 to 1e-2
    assert s.min() > 0.6 and s.max() < 1.2


def test_restarts_once_every_three_steps():
    assert polar._gram_restarts(5) == (2,)
    assert polar._gram_restarts(8) == (2, 5)
    assert polar._gram_restarts(2) == ()


def _record_kernels(monkeypatch) -> list[tuple[str, tuple[int, ...]]]:
    seen: list[tuple[str, tuple[int, ...]]] = []
    plain, gram = polar._newton_schulz, polar._gram_newton_schulz

    def record_plain(X, table):
        seen.append(("plain", tuple(X.shape)))
        return plain(X, table)

    def record_gram(X, table, restarts=()):
        seen.append(("gram", tuple(X.shape)))
        return gram(X, table, restarts)

    monkeypatch.setattr(polar, "_newton_schulz", record_plain)
    monkeypatch.setattr(polar, "_gram_newton_schulz", record_gram)
    return seen


def test_auto_takes_the_gram_form_on_cpu_where_it_was_measured_faster(monkeypatch):
    seen = _record_kernels(monkeypatch)
    assert GRAM_MIN_ASPECT == 2.0
    for shape in [(8, 16), (16, 8), (8, 15), (8, 8), (2, 8, 40)]:
        polar_factor(torch.randn(*shape), method="auto")
    polar_factor(torch.randn(8, 40), method="auto", dtype=torch.bfloat16)  # bf16 keeps the plain form
    polar_factor(torch.randn(8, 40), method="auto", dtype=F64)
    assert [kind for kind, _ in seen] == ["gram", "gram", "plain", "plain", "gram", "plain", "gram"]


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown method 'qr'.*'gram_newton_schulz'.*'auto'"):
        polar_factor(torch.randn(3, 4), method="qr")


# -- zero rows and columns -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["newton_schulz", "gram_newton_schulz"])
def test_zero_rows_and_columns_are_exact_and_dropped_before_iterating(monkeypatch, method):
    gen = generator(3)
    G = torch.zeros(50, 30, dtype=F64)
    rows, cols = torch.tensor([1, 4, 7, 20, 33, 41, 49]), torch.tensor([0, 2, 3, 5, 11, 17, 18, 29])
    G[rows.unsqueeze(1), cols] = with_spectrum(7, 8, relative_spectrum(7, 1e-2, gen), gen)
    seen = _record_kernels(monkeypatch)
    Q = polar_factor(G, method=method, dtype=F64)
    assert [shape for _, shape in seen] == [(7, 8)]  # only the block of non-zero lines is iterated
    keep = torch.zeros(50, 30, dtype=torch.bool)
    keep[rows.unsqueeze(1), cols] = True
    assert torch.equal(Q[~keep], torch.zeros((~keep).sum().item(), dtype=F64))
    M, s = spectral_action(G, Q)  # against the full matrix's own float64 SVD
    assert_diagonal(M[:7, :7], iterate_scalar(s[:7], newton_schulz_coefficients(5, "muon")), atol=1e-9)


def test_compaction_keeps_the_union_of_lines_across_a_batch(monkeypatch):
    gen = generator(8)
    G = torch.randn(3, 20, 12, generator=gen)
    G[:, 5:15] = 0
    G[0, 6] = 1.0  # row 6 holds an entry in one matrix only: kept for all three
    G[:, :, 3] = 0
    seen = _record_kernels(monkeypatch)
    Q = polar_factor(G)
    assert seen == [("plain", (3, 11, 11))]  # rows 0-4, 6, 15-19; every column but 3
    assert Q[:, :, 3].abs().max() == 0 and Q[1:, 6].abs().max() == 0
    monkeypatch.setattr(polar, "_nonzero_lines", lambda G: None)  # the uncompacted iteration
    full = polar_factor(G)
    # the same products, but the sums over the dropped zeros change float32's blocking: rounding of
    # ~sqrt(20) * 6e-8 per product, grown at most 3.5x per Muon step: 3.5**5 * 3e-7 = 2e-4
    torch.testing.assert_close(Q, full, rtol=1e-4, atol=2e-4)


def test_embedding_gradient_is_iterated_on_the_batch_tokens_only(monkeypatch):
    embedding = torch.nn.Embedding(1000, 16)
    tokens = torch.tensor([[3, 17, 3, 999], [17, 5, 42, 0]])
    embedding(tokens).square().sum().backward()
    seen = _record_kernels(monkeypatch)
    Q = polar_factor(embedding.weight.grad)
    assert seen == [("plain", (6, 16))]  # six distinct tokens, not 1000 rows
    assert Q.shape == (1000, 16) and torch.count_nonzero(Q.abs().sum(1)) == 6


def test_zero_matrix_and_nan_entries():
    assert torch.equal(polar_factor(torch.zeros(2, 4, 6)), torch.zeros(2, 4, 6))
    G = torch.zeros(4, 6)
    G[1, 2] = float("nan")
    assert torch.isnan(polar_factor(G)).any()  # NaN is not zero: it is kept, not hidden
