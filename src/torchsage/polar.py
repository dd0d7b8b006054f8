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
    "GRAM_MIN_ASPECT",
    "LOW_PRECISION_MARGIN",
    "MUON_COEFFICIENTS",
    "POLAR_METHODS",
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


def _gram_newton_schulz(
    X: Tensor, table: tuple[tuple[float, float, float], ...], restarts: tuple[int, ...] = ()
) -> Tensor:
    """The same iterations on the small Gram matrix of a normalised, wide ``(m, n)`` matrix.

    Every iterate is ``X_t = Q_t X_0`` with ``Q_t`` a polynomial in ``R_0 = X_0 X_0^T``, so the
    ``m x m`` matrices ``Q_t`` and ``R_t = X_t X_t^T`` are updated instead of ``X_t``:
    ``Z = b R + c R^2``, ``Q <- Q (a I + Z)``, ``R <- (a I + Z) R (a I + Z)`` (all commute), and
    ``X_0`` is touched only at the start, at each restart and at the end. Per step this costs
    ``O(m^3)`` instead of ``O(m^2 n)``. At each step index in ``restarts`` the product ``Q X`` is
    formed and ``R`` recomputed from it, which stops the rounding errors of the ``R`` updates from
    compounding (Zhang, Amsel, Chen and Dao, "Gram Newton-Schulz", 2026).
    """
    fused = torch.addmm if X.ndim == 2 else torch.baddbmm
    R = X @ X.mT
    Q = None
    last = len(table) - 1
    for i, (a, b, c) in enumerate(table):
        if Q is not None and i in restarts:
            X = Q @ X
            R = X @ X.mT
            Q = None
        Z = fused(R, R, R, beta=b, alpha=c)
        if Q is None:  # Q was the identity: Q (a I + Z) = Z + a I
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = fused(Q, Q, Z, beta=a)
        if i < last and (i + 1) not in restarts:
            RZ = fused(R, R, Z, beta=a)
            R = fused(RZ, Z, RZ, beta=a)
    return Q @ X


#: step indices at which :func:`_gram_newton_schulz` rebuilds ``R`` from ``Q X``: one restart in
#: every three steps (after step 2 for five steps, as the Gram Newton-Schulz authors recommend).
def _gram_restarts(steps: int) -> tuple[int, ...]:
    return tuple(range(2, steps, 3))


#: ``method="auto"`` iterates on the Gram matrix of an ``m x n`` (``m <= n``) matrix on the CPU
#: when ``n >= GRAM_MIN_ASPECT * m``: the aspect ratio above which it was measured faster than the
#: plain iteration in float32 (benchmarks/gram_newton_schulz.py, docs/benchmarks.md). Other devices
#: keep the plain iteration until a measurement there says otherwise.
GRAM_MIN_ASPECT = 2.0


def _use_gram(method: str, X: Tensor, dtype: torch.dtype) -> bool:
    if method == "gram_newton_schulz":
        return True
    if method != "auto":
        return False
    m, n = X.shape[-2:]
    return X.device.type == "cpu" and dtype in (torch.float32, torch.float64) and n >= GRAM_MIN_ASPECT * m


def _nonzero_lines(G: Tensor) -> tuple[Tensor, Tensor] | None:
    """Indices of the rows and columns of ``G`` (of any matrix of the batch) that hold a non-zero
    entry, or None when every row and column does (nothing to drop)."""
    nonzero = G != 0
    rows = nonzero.any(dim=-1).reshape(-1, G.shape[-2]).any(dim=0)
    cols = nonzero.any(dim=-2).reshape(-1, G.shape[-1]).any(dim=0)
    if bool(rows.all()) and bool(cols.all()):
        return None
    return rows.nonzero().squeeze(1), cols.nonzero().squeeze(1)


_compiled_kernels: dict[Any, Any] = {}


def _autocast_off(device_type: str) -> Any:
    """Disables autocast for ``device_type`` when it is on (else does nothing)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _compiled(kernel: Any) -> Any:
    """``kernel`` through ``torch.compile`` (built once per kernel, on first use)."""
    if kernel not in _compiled_kernels:
        # dynamic: one graph serves every layer shape instead of one recompilation per shape.
        _compiled_kernels[kernel] = torch.compile(kernel, dynamic=True, fullgraph=True)
    compiled = _compiled_kernels[kernel]

    def run(*args: Any) -> Tensor:
        try:
            return compiled(*args)
        except Exception as error:  # the backend's errors have no common base class
            first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise RuntimeError(
                f"torch.compile of the Newton-Schulz kernel failed on this build ({type(error).__name__}: "
                f"{first.strip()}); use compile=False"
            ) from error

    return run


def _iterate(
    G: Tensor, table: tuple[tuple[float, float, float], ...], method: str, dtype: torch.dtype, compile: bool
) -> Tensor:
    """Normalises ``G`` and runs the iterations (plain or on the Gram matrix) in ``dtype``."""
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
    if _use_gram(method, X, dtype):
        kernel, args = _gram_newton_schulz, (table, _gram_restarts(len(table)))
    else:
        kernel, args = _newton_schulz, (table,)
    with _autocast_off(X.device.type):  # ``dtype`` decides the precision, not an outer autocast
        X = (_compiled(kernel) if compile else kernel)(X, *args)
    X = X.reshape(*batch_shape, *X.shape[-2:])
    if transposed:
        X = X.mT
    return X.to(G.dtype)


#: the values of ``method`` that :func:`polar_factor` accepts
POLAR_METHODS: tuple[str, ...] = ("newton_schulz", "gram_newton_schulz", "auto", "svd")


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
        method: ``"newton_schulz"`` (iterate on ``X``), ``"gram_newton_schulz"`` (the same
            polynomial, iterated on the ``m x m`` Gram matrix: fewer flops when ``n`` is well above
            ``m``), ``"auto"`` (the Gram form where it was measured faster: see
            :data:`GRAM_MIN_ASPECT`) or ``"svd"`` (exact, float64; for tests and small layers).
        dtype: precision of the iteration: ``torch.float32`` (default), ``torch.bfloat16`` or
            ``torch.float64``. The result is returned in ``G``'s dtype.
        compile: run the iterations through ``torch.compile`` (compiled on first use, one graph
            for every shape). What it buys depends on the device: see docs/benchmarks.md. A
            build where compilation fails raises ``RuntimeError`` naming the backend's error.

    Returns:
        A tensor of ``G``'s shape and dtype. A zero matrix gives zeros; tiny (even subnormal)
        matrices are rescaled before normalising, so no input gives NaN. Singular values far below
        the Frobenius norm are not lifted to 1 by Newton-Schulz. Rows and columns that are zero
        (in every matrix of a batch) are dropped before iterating and come back as zeros, which is
        exact: ``polar([G_s; 0]) = [polar(G_s); 0]``. The gradient of a word embedding has non-zero
        rows only for the batch's tokens, so its cost follows the batch, not the vocabulary.

    Example:
        >>> G = torch.randn(4, 6, dtype=torch.float64)
        >>> Q = polar_factor(G, method="svd")
        >>> torch.allclose(Q @ Q.T, torch.eye(4, dtype=torch.float64))
        True
        >>> approx = polar_factor(G.float(), steps=8, coefficients="polar_express")
        >>> (approx.double() - Q).abs().max().item() < 1e-2
        True
        >>> wide = torch.randn(8, 64)
        >>> gram = polar_factor(wide, method="gram_newton_schulz")
        >>> (gram - polar_factor(wide)).abs().max().item() < 1e-4
        True
    """
    if not isinstance(G, Tensor) or G.ndim < 2:
        raise ValueError(f"G must be a tensor with at least 2 dimensions, got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"G must be a floating-point tensor, got {G.dtype}")
    if method == "svd":
        return _svd_polar(G).to(G.dtype)
    if method not in POLAR_METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(map(repr, POLAR_METHODS))}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    table = newton_schulz_coefficients(steps, coefficients, dtype)
    lines = _nonzero_lines(G)
    if lines is None:
        return _iterate(G, table, method, dtype, compile)
    # polar([G_s 0; 0 0]) = [polar(G_s) 0; 0 0]: iterate on the rows and columns that hold entries.
    rows, cols = lines
    out = torch.zeros_like(G)
    if rows.numel() == 0:
        return out
    Q = _iterate(G.index_select(-2, rows).index_select(-1, cols), table, method, dtype, compile)
    if cols.numel() < G.shape[-1]:
        Q = G.new_zeros(*G.shape[:-1], cols.numel()).index_copy_(-2, rows, Q)
        return out.index_copy_(-1, cols, Q)
    return out.index_copy_(-2, rows, Q)
