"""Polar factor of a matrix: Newton-Schulz iterations and an exact SVD reference.

The polar factor of ``G = U S V^T`` is ``polar(G) = U V^T``: the orthogonal matrix closest to ``G``.
SAGE perturbs every weight matrix along ``polar(grad)``, so every direction of the gradient's row
and column spaces is probed with the same magnitude, whatever its singular value.

Newton-Schulz iterations compute it with matrix products only. After dividing ``G`` by its
Frobenius norm (so every singular value lies in ``(0, 1]``), each step applies an odd quintic
``p(x) = a x + b x^3 + c x^5`` to the singular values, written in matrix form as
``X <- a X + (b A + c A^2) X`` with ``A = X X^T``. Two schedules are provided:

* ``"muon"``: the same quintic every step, ``(3.4445, -4.7750, 2.0315)``. Five steps map singular
  values at or above about 1e-2 of the Frobenius norm into roughly ``[0.68, 1.13]``: cheap, not
  exact, and enough for an optimizer direction.
* ``"polar_express"``: a different quintic per step, each the minimax fit of 1 on the interval the
  singular values occupy at that step (Amsel et al., 2025). Computed by :func:`polar_express_coefficients`;
  with 6 to 8 steps the singular values land within about 1e-3 of 1 down to 1e-3 of the Frobenius norm.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION_MARGIN",
    "MUON_COEFFICIENTS",
    "newton_schulz_coefficients",
    "polar_express_coefficients",
    "polar_factor",
]

MUON_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Fixed point of the minimax fit on a vanishing interval around 1: p(1) = 1, p'(1) = p''(1) = 0.
_QUINTIC_AT_ONE: tuple[float, float, float] = (15 / 8, -10 / 8, 3 / 8)


def _minimax_odd_quintic(lower: float, upper: float) -> tuple[float, float, float, float]:
    """Remez exchange for the odd quintic closest to 1 in max norm on ``[lower, upper]``.

    The optimum equioscillates at four points: both ends and the two interior extrema of the
    error, which are the positive roots of ``p'(x) = a + 3 b x^2 + 5 c x^4``. Returns
    ``(a, b, c, E)`` with ``E`` the maximal error.
    """
    # Below a relative width of 1e-4 the exchange system is singular to working precision (it
    # fails outright near 5e-6), while the fixed-point quintic is off by at most 2.5 (w/2)^3 < 1e-12.
    if upper - lower < 1e-4 * upper:
        return (*_QUINTIC_AT_ONE, 0.0)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    points = torch.tensor(
        [lower, lower + 0.25 * (upper - lower), lower + 0.75 * (upper - lower), upper],
        dtype=torch.float64,
    )
    for _ in range(200):
        system = torch.stack([points, points**3, points**5, signs], dim=1)
        a, b, c, err = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64)).tolist()
        disc = max(9 * b * b - 20 * a * c, 0.0)
        roots = sorted(((-3 * b - math.sqrt(disc)) / (10 * c), (-3 * b + math.sqrt(disc)) / (10 * c)))
        interior = [min(max(math.sqrt(max(r, 0.0)), lower), upper) for r in roots]
        new_points = torch.tensor([lower, *interior, upper], dtype=torch.float64)
        if torch.allclose(new_points, points, rtol=0.0, atol=1e-14):
            break
        points = new_points
    return a, b, c, abs(err)


#: Relative widening of every fitted interval of the Polar Express schedule in low precision.
LOW_PRECISION_MARGIN = 0.01


@functools.lru_cache(maxsize=32)
def polar_express_coefficients(
    steps: int = 8, lower: float = 1e-3, margin: float = 0.0
) -> tuple[tuple[float, float, float], ...]:
    """Per-step quintic coefficients of the Polar Express schedule.

    Starting from the interval ``[lower, 1]`` that holds the singular values of a
    Frobenius-normalised matrix (those at least ``lower`` times the norm), each step takes the
    minimax odd quintic of 1 on the current interval and maps the interval through it. The result
    is computed in float64 and cached.

    ``margin > 0`` fits every step on its interval widened by the factor ``1 + margin`` (the upper
    end multiplied, the lower end of every step after the first divided). The early quintics
    have large coefficients and grow fast just above their interval, so a singular value that
    rounding pushes past the interval's end is blown up by the next steps; in bfloat16 this
    happens to a large share of random matrices. :func:`polar_factor` uses
    :data:`LOW_PRECISION_MARGIN` in bfloat16 and float16, and no margin otherwise.

    Example:
        >>> coeffs = polar_express_coefficients(steps=8)
        >>> len(coeffs)
        8
        >>> [round(x, 3) for x in coeffs[-1]]
        [1.875, -1.25, 0.375]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < lower < 1.0:
        raise ValueError(f"lower must lie in (0, 1), got {lower}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    coefficients = []
    widen = 1.0 + margin
    lo, hi = lower, widen
    for _ in range(steps):
        a, b, c, err = _minimax_odd_quintic(lo, hi)
        coefficients.append((a, b, c))
        lo, hi = (1.0 - err) / widen, (1.0 + err) * widen
    return tuple(coefficients)


def newton_schulz_coefficients(
    steps: int, coefficients: str | Sequence[Sequence[float]] = "muon", dtype: torch.dtype = torch.float32
) -> tuple[tuple[float, float, float], ...]:
    """The ``(a, b, c)`` triple of every step for a named schedule or an explicit table.

    ``dtype`` is the precision of the iteration: in bfloat16 and float16 the Polar Express
    schedule is fitted with :data:`LOW_PRECISION_MARGIN` (see :func:`polar_express_coefficients`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients == "muon":
            return (MUON_COEFFICIENTS,) * steps
        if coefficients == "polar_express":
            low = dtype in (torch.bfloat16, torch.float16)
            return polar_express_coefficients(steps, margin=LOW_PRECISION_MARGIN if low else 0.0)
        raise ValueError(f"unknown coefficients {coefficients!r}: use 'muon', 'polar_express' or a table")
    table = tuple(tuple(float(x) for x in row) for row in coefficients)
    if any(len(row) != 3 for row in table):
        raise ValueError("a coefficient table holds one (a, b, c) triple per step")
    if len(table) == 1:
        return table * steps
    if len(table) != steps:
        raise ValueError(f"coefficient table has {len(table)} rows but steps={steps}")
    return table


def _svd_polar(G: Tensor) -> Tensor:
    U, S, Vh = torch.linalg.svd(G.to(torch.float64), full_matrices=False)
    # Directions of (numerically) zero singular values are arbitrary: drop them, as rank does, at
    # the precision of G's own dtype (a float32 matrix carries float32 rounding, not float64's).
    tol = S.amax(dim=-1, keepdim=True) * max(G.shape[-2:]) * torch.finfo(G.dtype).eps
    keep = (S > tol).to(torch.float64)
    return (U * keep.unsqueeze(-2)) @ Vh


def _newton_schulz(X: Tensor, table: tuple[tuple[float, float, float], ...]) -> Tensor:
    """The iterations on a normalised, wide ``(m, n)`` or ``(batch, m, n)`` matrix."""
    # Fused multiply-adds: b A + c A^2 and a X + B X in one kernel each.
    fused = torch.addmm if X.ndim == 2 else torch.baddbmm
    for a, b, c in table:
        A = X @ X.mT
        B = fused(A, A, A, beta=b, alpha=c)
        X = fused(X, B, X, beta=a)
    return X


_compiled_kernel: Any = None


def _autocast_off(device_type: str) -> Any:
    """Disables autocast for ``device_type`` when it is on (else does nothing)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _compiled_newton_schulz(X: Tensor, table: tuple[tuple[float, float, float], ...]) -> Tensor:
    """:func:`_newton_schulz` through ``torch.compile`` (built once, on first use)."""
    global _compiled_kernel
    if _compiled_kernel is None:
        # dynamic: one graph serves every layer shape instead of one recompilation per shape.
        _compiled_kernel = torch.compile(_newton_schulz, dynamic=True, fullgraph=True)
    try:
        return _compiled_kernel(X, table)
    except Exception as error:  # the backend's errors have no common base class
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise RuntimeError(
            f"torch.compile of the Newton-Schulz kernel failed on this build ({type(error).__name__}: "
            f"{first.strip()}); use compile=False"
        ) from error


def polar_factor(
    G: Tensor,
    steps: int = 5,
    coefficients: str | Sequence[Sequence[float]] = "muon",
    method: str = "newton_schulz",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
) -> Tensor:
    """Polar factor ``U V^T`` of ``G = U S V^T``, batched over leading dimensions.

    Args:
        G: tensor of shape ``(..., m, n)``; tall and wide matrices are both accepted. A conv
            weight is reshaped to ``(out, -1)`` by the caller.
        steps: Newton-Schulz iterations.
        coefficients: ``"muon"`` (default), ``"polar_express"`` or a table of ``(a, b, c)``
            triples (one row, or one row per step).
        method: ``"newton_schulz"`` or ``"svd"`` (exact, float64; for tests and small layers).
        dtype: precision of the iteration: ``torch.float32`` (default), ``torch.bfloat16`` or
            ``torch.float64``. The result is returned in ``G``'s dtype.
        compile: run the iterations through ``torch.compile`` (compiled on first use, one graph
            for every shape). What it buys depends on the device: see docs/benchmarks.md. A
            build where compilation fails raises ``RuntimeError`` naming the backend's error.

    Returns:
        A tensor of ``G``'s shape and dtype. A zero matrix gives zeros; tiny (even subnormal)
        matrices are rescaled before normalising, so no input gives NaN. Singular values far below
        the Frobenius norm are not lifted to 1 by Newton-Schulz.

    Example:
        >>> G = torch.randn(4, 6, dtype=torch.float64)
        >>> Q = polar_factor(G, method="svd")
        >>> torch.allclose(Q @ Q.T, torch.eye(4, dtype=torch.float64))
        True
        >>> approx = polar_factor(G.float(), steps=8, coefficients="polar_express")
        >>> (approx.double() - Q).abs().max().item() < 1e-2
        True
    """
    if not isinstance(G, Tensor) or G.ndim < 2:
        raise ValueError(f"G must be a tensor with at least 2 dimensions, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"G must be a floating-point tensor, got {G.dtype}")
    if method == "svd":
        return _svd_polar(G).to(G.dtype)
    if method != "newton_schulz":
        raise ValueError(f"unknown method {method!r}: use 'newton_schulz' or 'svd'")
    if dtype not in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    table = newton_schulz_coefficients(steps, coefficients, dtype)

    X = G.to(dtype)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:  # iterate on the wide orientation: the Gram matrix A is the small one
        X = X.mT
    # Two-stage normalisation: dividing by the largest entry first keeps the Frobenius norm of a
    # tiny (even subnormal) matrix from underflowing to zero.
    scale = X.abs().amax(dim=(-2, -1), keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    X = X / safe
    # The norm in at least float32 (bf16 would round it to 3 digits), in float64 for a float64 run.
    norm = torch.linalg.matrix_norm(X.to(torch.promote_types(dtype, torch.float32)), keepdim=True).to(dtype)
    # X is a fresh tensor here: dividing in place saves one matrix-sized temporary.
    X.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))  # a zero matrix stays zero
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:]) if X.ndim > 3 else X
    with _autocast_off(X.device.type):  # ``dtype`` decides the precision, not an outer autocast
        X = (_compiled_newton_schulz if compile else _newton_schulz)(X, table)
    X = X.reshape(*batch_shape, *X.shape[-2:])
    if transposed:
        X = X.mT
    return X.to(G.dtype)
