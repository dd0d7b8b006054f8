"""Matrix-free linear algebra on flat vectors: conjugate gradients, Hutchinson, Lanczos.

Every routine sees the symmetric matrix :math:`A` only through ``matvec(v) = A v`` on 1-D tensors,
so it serves an explicit matrix (``lambda v: A @ v``) and a Hessian-vector product alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from torchsage.harness.progress import bar as tqdm

__all__ = ["CGInfo", "conjugate_gradient", "hutchinson_trace", "lanczos"]

MatVec = Callable[[Tensor], Tensor]


def _apply(matvec: MatVec, v: Tensor, what: str) -> Tensor:
    out = matvec(v)
    if not isinstance(out, Tensor) or out.shape != v.shape:
        raise ValueError(f"{what}: matvec must return a tensor of shape {tuple(v.shape)}")
    out = out.to(v.dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{what}: matvec returned non-finite values")
    return out


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a, b))


@dataclass(frozen=True)
class CGInfo:
    """How a :func:`conjugate_gradient` solve ended.

    Attributes:
        converged: the relative residual reached ``tol`` (never with ``negative_curvature``).
        iterations: matrix-vector products taken by the iteration (the optional true-residual
            check adds one more).
        residual: relative residual :math:`\\|b - A x\\| / \\|b\\|` of the returned ``x`` (0 for
            :math:`b = 0`); the recurrence's value, or the recomputed one with ``true_residual``.
        negative_curvature: a search direction with :math:`p^\\top A p \\le 0` was met, so
            :math:`A` is not positive definite; the solve stopped there.
        min_curvature: smallest Rayleigh quotient :math:`p^\\top A p / p^\\top p` over the search
            directions (an upper bound on :math:`\\lambda_{\\min}(A)`; ``inf`` before any step).
    """

    converged: bool
    iterations: int
    residual: float
    negative_curvature: bool
    min_curvature: float


def conjugate_gradient(
    matvec: MatVec,
    b: Tensor,
    tol: float = 1e-6,
    max_iter: int = 200,
    *,
    true_residual: bool = False,
) -> tuple[Tensor, CGInfo]:
    """Solves :math:`A x = b` for a symmetric positive definite :math:`A` by conjugate gradients.

    Starting from :math:`x_0 = 0`, :math:`r_0 = p_0 = b`, each step is

    .. math::

        \\alpha_i = \\frac{r_i^\\top r_i}{p_i^\\top A p_i},\\quad
        x_{i+1} = x_i + \\alpha_i p_i,\\quad r_{i+1} = r_i - \\alpha_i A p_i,\\quad
        p_{i+1} = r_{i+1} + \\frac{r_{i+1}^\\top r_{i+1}}{r_i^\\top r_i} p_i,

    until :math:`\\|r_i\\| \\le \\mathrm{tol}\\,\\|b\\|` or ``max_iter`` steps.

    An indefinite (or singular) :math:`A` is detected, not divided by: when a direction has
    :math:`p_i^\\top A p_i \\le 0` the solve stops and returns the last iterate :math:`x_i` (finite)
    with ``info.negative_curvature = True``. Add damping (:math:`A + \\lambda I`) and solve again.
    A non-finite ``matvec`` output raises :class:`ValueError`.

    Args:
        matvec: ``v -> A v`` on 1-D tensors shaped like ``b``.
        b: right-hand side (1-D).
        tol: relative residual to reach.
        max_iter: most matrix-vector products.
        true_residual: recompute :math:`\\|b - A x\\|` with one more product at the end (the
            recurrence drifts from it in low precision); ``converged`` then refers to it.

    Returns:
        ``(x, info)``.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x, info = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> x, info.converged, info.iterations
        (tensor([0.0909, 0.6364], dtype=torch.float64), True, 2)
        >>> B = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
        >>> x, info = conjugate_gradient(lambda v: B @ v, torch.tensor([1.0, 1.0], dtype=torch.float64))
        >>> info.negative_curvature, bool(torch.isfinite(x).all())
        (True, True)
    """
    if b.dim() != 1:
        raise ValueError(f"b must be a 1-D tensor, got shape {tuple(b.shape)}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be non-negative, got {max_iter}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b has non-finite entries")
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return x, CGInfo(True, 0, 0.0, False, math.inf)
    r = b.clone()
    p = b.clone()
    rr = _dot(r, r)
    iterations = 0
    negative = False
    min_curvature = math.inf
    while math.sqrt(rr) > tol * b_norm and iterations < max_iter:
        Ap = _apply(matvec, p, "conjugate_gradient")
        iterations += 1
        pAp = _dot(p, Ap)
        min_curvature = min(min_curvature, pAp / _dot(p, p))
        if not pAp > 0.0:
            negative = True
            break
        alpha = rr / pAp
        x.add_(p, alpha=alpha)
        r.add_(Ap, alpha=-alpha)
        rr_next = _dot(r, r)
        p.mul_(rr_next / rr).add_(r)
        rr = rr_next
    residual = math.sqrt(rr) / b_norm
    if true_residual:
        residual = float(torch.linalg.vector_norm(b - _apply(matvec, x, "conjugate_gradient"))) / b_norm
    converged = not negative and residual <= tol
    return x, CGInfo(converged, iterations, residual, negative, min_curvature)


def _probe_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    samples: int = 100,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[float, float]:
    """Hutchinson's estimate of :math:`\\operatorname{tr}(A)` with Rademacher probes.

    For :math:`z` with independent :math:`\\pm 1` entries, :math:`\\mathbb{E}[z^\\top A z] =
    \\operatorname{tr}(A)` and :math:`\\operatorname{Var}[z^\\top A z] = 2\\sum_{i \\ne j} A_{ij}^2`
    (zero for a diagonal :math:`A`). The estimate is the mean of ``samples`` draws and the standard
    error is their sample standard deviation over :math:`\\sqrt{\\text{samples}}`.

    Args:
        matvec: ``v -> A v`` on 1-D tensors of length ``dim``.
        dim: size of :math:`A`.
        samples: number of probes (at least 2, for the standard error).
        generator: draws the probes (on its own device, then moved to ``device``); ``None`` uses
            the global generator.
        dtype, device: of the probe vectors handed to ``matvec``.
        progress: show progress (a bar on a terminal, plain lines otherwise).

    Returns:
        ``(estimate, stderr)`` as floats.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
        >>> hutchinson_trace(lambda v: A @ v, 4, samples=10, generator=torch.Generator().manual_seed(0))
        (10.0, 0.0)
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if samples < 2:
        raise ValueError(f"hutchinson_trace needs at least 2 samples for a standard error, got {samples}")
    values = torch.empty(samples, dtype=torch.float64)
    for i in tqdm(range(samples), desc="Hutchinson trace", disable=not progress, leave=False):
        bits = torch.randint(0, 2, (dim,), generator=generator, device=_probe_device(generator))
        z = (2 * bits - 1).to(dtype=dtype, device=device)
        values[i] = _dot(z, _apply(matvec, z, "hutchinson_trace"))
    return float(values.mean()), float(values.std() / math.sqrt(samples))


@dataclass(frozen=True)
class _Ritz:
    """Ritz values ``theta`` (ascending, float64) and their residual norms from one Lanczos run."""

    theta: Tensor
    residuals: Tensor


def _orthogonalise(w: Tensor, Q: Tensor) -> Tensor:
    """Classical Gram-Schmidt of ``w`` against the orthonormal rows of ``Q``, twice ("twice is enough")."""
    for _ in range(2):
        w = w - Q.T @ (Q @ w)
    return w


def _lanczos_ritz(
    matvec: MatVec,
    dim: int,
    steps: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    progress: bool,
) -> _Ritz:
    """Runs ``min(steps, dim)`` Lanczos steps with full reorthogonalisation; all Ritz pairs' figures."""
    m = min(steps, dim)
    gen_device = _probe_device(generator)

    def random_vector() -> Tensor:
        return torch.randn(dim, generator=generator, device=gen_device, dtype=torch.float64).to(
            dtype=dtype, device=device
        )

    Q = torch.zeros(m, dim, dtype=dtype, device=device)
    q = random_vector()
    Q[0] = q / torch.linalg.vector_norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta_last = 0.0
    eps = torch.finfo(dtype).eps
    for j in tqdm(range(m), desc="Lanczos", disable=not progress, leave=False):
        w = _apply(matvec, Q[j], "lanczos")
        w_norm = float(torch.linalg.vector_norm(w))
        alphas.append(_dot(Q[j], w))
        w = _orthogonalise(w, Q[: j + 1])
        beta = float(torch.linalg.vector_norm(w))
        if j == m - 1:
            beta_last = beta
            break
        if beta <= 16 * eps * max(w_norm, abs(alphas[-1])) or beta == 0.0:
            # Invariant subspace: A's action on span(Q) is exact. Continue in its orthogonal
            # complement from a fresh random vector; T gets a zero off-diagonal entry there.
            w = _orthogonalise(random_vector(), Q[: j + 1])
            beta_used = 0.0
        else:
            beta_used = beta
        Q[j + 1] = w / torch.linalg.vector_norm(w)
        betas.append(beta_used)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    # A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T, so ||A y - theta y|| = |beta_m s_m| for y = Q_m s.
    return _Ritz(theta, (beta_last * S[-1]).abs())


def lanczos(
    matvec: MatVec,
    dim: int,
    steps: int = 30,
    k: int = 1,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenvalues of a symmetric :math:`A` by Lanczos with full reorthogonalisation.

    From a random Gaussian start :math:`q_1`, ``m = min(steps, dim)`` steps build an orthonormal
    basis :math:`Q_m` of the Krylov space :math:`\\mathcal{K}_m(A, q_1)` and the tridiagonal
    :math:`T_m = Q_m^\\top A Q_m`; each new vector is orthogonalised against all previous ones
    (twice), so no spurious copies of converged eigenvalues appear. The eigenvalues
    :math:`\\theta_i` of :math:`T_m` (Ritz values) approximate the extreme eigenvalues of
    :math:`A` from inside: :math:`\\theta_{\\max} \\le \\lambda_{\\max}(A)`. When the Krylov space
    becomes invariant the iteration continues from a fresh random vector orthogonal to it, so with
    ``steps >= dim`` the result is the exact spectrum.

    The residual of a Ritz pair :math:`(\\theta_i, y_i = Q_m s_i)` is
    :math:`\\|A y_i - \\theta_i y_i\\| = |\\beta_m s_{m,i}|`: :math:`A` has an eigenvalue within
    that distance of :math:`\\theta_i`. Memory: ``m`` vectors of length ``dim``.

    Args:
        matvec: ``v -> A v`` on 1-D tensors of length ``dim``.
        dim: size of :math:`A`.
        steps: Lanczos steps (matrix-vector products), at most ``dim`` are taken.
        k: number of eigenvalues wanted (at most ``min(steps, dim)``).
        generator: draws the start vector (on its own device); ``None`` uses the global one.
        dtype, device: of the basis vectors handed to ``matvec``.
        progress: show progress (a bar on a terminal, plain lines otherwise).

    Returns:
        ``(eigenvalues, residuals)``: float64 CPU tensors of length ``k``, eigenvalues descending.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=torch.float64))
        >>> values, residuals = lanczos(lambda v: A @ v, 4, steps=4, k=2)
        >>> values
        tensor([3.0000, 1.0000], dtype=torch.float64)
    """
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if not 1 <= k <= min(steps, dim):
        raise ValueError(f"k must be between 1 and min(steps, dim) = {min(steps, dim)}, got {k}")
    ritz = _lanczos_ritz(matvec, dim, steps, generator, dtype, device, progress)
    return ritz.theta.flip(0)[:k].clone(), ritz.residuals.flip(0)[:k].clone()
