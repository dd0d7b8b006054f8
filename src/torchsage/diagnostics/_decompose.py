"""The alignment / curvature decomposition of a model at its current weights."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torchsage.diagnostics._hessian import MeanHessian, as_batches, check_params
from torchsage.diagnostics._krylov import _lanczos_ritz, conjugate_gradient, hutchinson_trace
from torchsage.disagreement import MEASURES, GradientStatistics
from torchsage.harness.progress import bar as tqdm

__all__ = ["DecompositionReport", "decompose"]


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass(frozen=True)
class DecompositionReport:
    """What :func:`decompose` measured. All numbers are Python floats, ints and lists.

    Attributes:
        alignment: :math:`\\operatorname{tr}((\\bar H + \\lambda I)^{-1}\\Sigma_g)
            = \\frac1K\\sum_k d_k^\\top(\\bar H + \\lambda I)^{-1} d_k`, :math:`d_k = g_k - \\bar g`,
            by conjugate gradients (exact up to ``cg_tol``); ``nan`` when ``negative_curvature``.
        alignment_per_distribution: the K terms :math:`d_k^\\top(\\bar H + \\lambda I)^{-1} d_k`
            (their mean is ``alignment``); all ``nan`` when ``negative_curvature``.
        alignment_residuals: largest relative residual
            :math:`\\|d_k - (\\bar H + \\lambda I) x_k\\| / \\|d_k\\|` over the solves that ran
            (recomputed, not the recurrence's; 0 for :math:`d_k = 0` or when no solve ran).
        cg_iterations: Hessian-vector products of each solve (0 for solves not run).
        curvature_trace: :math:`\\operatorname{tr}(\\bar H)` (undamped), exact or by Hutchinson.
        curvature_trace_stderr: Hutchinson standard error (0 when ``exact``).
        curvature_top: the ``top_k`` largest eigenvalues of :math:`\\bar H` (undamped), descending.
        curvature_top_residuals: Lanczos residual norms :math:`\\|\\bar H y - \\theta y\\|` of those
            Ritz pairs: :math:`\\bar H` has an eigenvalue within that distance of each (0 when
            ``exact``).
        curvature_min: smallest eigenvalue of :math:`\\bar H` when ``exact``, else the smallest Ritz
            value, an upper bound on it (negative means :math:`\\bar H` is certainly indefinite).
        negative_curvature: :math:`\\bar H + \\lambda I` was found not positive definite: a solve
            met :math:`p^\\top(\\bar H + \\lambda I)p \\le 0`, or ``curvature_min + damping`` is
            below :math:`-\\sqrt{\\varepsilon}\\max|\\theta|` (``eps`` of the parameters' dtype).
            ``False`` is no proof of definiteness when not ``exact``.
        exact: the trace and eigenvalues come from the full Hessian (``exact`` / ``exact_limit``).
        grad_norms: :math:`\\|g_k\\|` per distribution.
        mean_grad_norm: :math:`\\|\\bar g\\|`.
        losses: per-distribution losses (means over each distribution's batches).
        cosine_matrix: :math:`\\cos(g_i, g_j)` as a KxK nested list (0 against a zero gradient).
        disagreement: every measure of :mod:`torchsage.disagreement` on the :math:`g_k`.
        damping: :math:`\\lambda`.
        num_params: number of scalar parameters differentiated.
        K: number of distributions.
        hessian_vector_products: products with :math:`\\bar H` through the model (building the
            exact Hessian counts ``num_params``); each costs a double backward of every batch.
        warnings: human-readable problems (negative curvature, unconverged solves); each was also
            emitted as a :class:`RuntimeWarning`.
    """

    alignment: float
    alignment_per_distribution: list[float]
    alignment_residuals: float
    cg_iterations: list[int]
    curvature_trace: float
    curvature_trace_stderr: float
    curvature_top: list[float]
    curvature_top_residuals: list[float]
    curvature_min: float
    negative_curvature: bool
    exact: bool
    grad_norms: list[float]
    mean_grad_norm: float
    losses: list[float]
    cosine_matrix: list[list[float]]
    disagreement: dict[str, float]
    damping: float
    num_params: int
    K: int
    hessian_vector_products: int
    warnings: list[str]

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON: non-finite floats (the documented ``nan``) become ``None``."""
        return _json_safe(dataclasses.asdict(self))


def _cosine_matrix(grads: Sequence[Tensor]) -> list[list[float]]:
    G = torch.stack([g.to(torch.float64) for g in grads])
    norms = torch.linalg.vector_norm(G, dim=1)
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    return ((G @ G.T) * inv[:, None] * inv[None, :]).cpu().tolist()


def _check_arguments(
    damping: float,
    cg_tol: float,
    cg_max_iter: int,
    hutchinson_samples: int,
    exact: bool | str,
    exact_limit: int,
    top_k: int,
    lanczos_steps: int,
) -> None:
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite non-negative number, got {damping}")
    if not cg_tol > 0:
        raise ValueError(f"cg_tol must be positive, got {cg_tol}")
    if cg_max_iter < 1:
        raise ValueError(f"cg_max_iter must be positive, got {cg_max_iter}")
    if exact not in (True, False, "auto"):
        raise ValueError(f'exact must be True, False or "auto", got {exact!r}')
    if exact_limit < 0:
        raise ValueError(f"exact_limit must be non-negative, got {exact_limit}")
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if exact is not True and lanczos_steps < top_k:
        raise ValueError(f"lanczos_steps ({lanczos_steps}) must be at least top_k ({top_k})")
    if exact is not True and hutchinson_samples < 2:
        raise ValueError(f"hutchinson_samples must be at least 2, got {hutchinson_samples}")


def decompose(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor] | Sequence[Callable[[Any, Any], Tensor]],
    batches: Sequence[Any],
    *,
    damping: float = 0.0,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 200,
    hutchinson_samples: int = 100,
    exact: bool | Literal["auto"] = "auto",
    exact_limit: int = 2000,
    top_k: int = 1,
    lanczos_steps: int = 30,
    params: Iterable[Tensor] | None = None,
    strict: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> DecompositionReport:
    """Alignment and curvature terms of the excess risk at the model's current weights.

    With K distributions, per-distribution losses :math:`L_k` (the mean over each distribution's
    batches of ``loss_fn(model(inputs), targets)``), gradients :math:`g_k`, their mean
    :math:`\\bar g`, :math:`d_k = g_k - \\bar g` and the mean Hessian
    :math:`\\bar H = \\frac1K\\sum_k \\nabla^2 L_k`, it measures

    * the **alignment term** :math:`\\operatorname{tr}\\big((\\bar H + \\lambda I)^{-1}\\Sigma_g\\big)`
      with :math:`\\Sigma_g = \\frac1K\\sum_k d_k d_k^\\top`. As :math:`\\Sigma_g` has rank at most
      :math:`K - 1` this is :math:`\\frac1K\\sum_k d_k^\\top x_k` with
      :math:`(\\bar H + \\lambda I)\\,x_k = d_k` solved by conjugate gradients on Hessian-vector
      products: no sampling, exact up to ``cg_tol``;
    * the **curvature term** through :math:`\\bar H` itself (undamped): its trace (exact from the
      full Hessian for small models, otherwise Hutchinson with Rademacher probes and a standard
      error) and its ``top_k`` largest eigenvalues (Lanczos with full reorthogonalisation, with
      residual bounds);
    * the gradients' norms, pairwise cosines and the disagreement measures of
      :mod:`torchsage.disagreement`.

    **Indefinite** :math:`\\bar H` (weights not at a minimum): the inverse in the alignment term is
    only meaningful for a positive definite :math:`\\bar H + \\lambda I`. When a solve meets a
    direction with :math:`p^\\top(\\bar H + \\lambda I)p \\le 0`, or the smallest eigenvalue
    estimate shows :math:`\\bar H + \\lambda I` is indefinite, ``negative_curvature`` is set, the
    remaining solves are skipped and ``alignment`` is ``nan`` with an entry in ``warnings`` (also
    emitted as a :class:`RuntimeWarning`) giving a lower bound for the damping needed. With
    ``strict=True`` a :class:`ValueError` is raised instead. No other figure is ``nan``.

    The model runs in ``eval()`` mode (BatchNorm uses its running statistics, Dropout is off);
    every module's training flag, every parameter and every ``p.grad`` are left as they were.
    Computations run on the parameters' device and dtype (inputs and targets are moved there).

    Cost, in products with :math:`\\bar H` (each a forward, backward and double backward of every
    batch): up to ``K * (cg_max_iter + 1)`` for the solves, ``lanczos_steps`` and
    ``hutchinson_samples`` for the curvature, or ``num_params`` (batched) for the exact Hessian.

    Args:
        model: the network; called as ``model(inputs)``.
        loss_fn: ``loss_fn(output, targets)`` returning a scalar, or a list or tuple with one such
            function per distribution (e.g. the tasks of a multi-task model, each reading its own
            head of the output).
        batches: one entry per distribution: an ``(inputs, targets)`` pair, or an iterable of such
            pairs (a loader; its batches are drawn once and kept, so shuffling or augmentation
            cannot change the loss between products). A pair whose two entries are themselves
            pairs reads as a loader of two batches: wrap such a batch in a list.
        damping: :math:`\\lambda \\ge 0` added to :math:`\\bar H` in the solves only.
        cg_tol: relative residual each solve must reach.
        cg_max_iter: most iterations per solve; an unconverged solve adds a warning.
        hutchinson_samples: Rademacher probes for the trace (at least 2).
        exact: ``True`` builds the full Hessian (``num_params`` squared entries) for the trace,
            the eigenvalues (``torch.linalg.eigvalsh``) and the solves; ``"auto"`` does so when
            ``num_params <= exact_limit``; ``False`` never.
        exact_limit: the size limit of ``exact="auto"``.
        top_k: number of largest eigenvalues reported.
        lanczos_steps: Lanczos steps (Hessian-vector products).
        params: the parameters to differentiate (e.g. a shared trunk); default: every parameter
            of ``model`` that requires grad. All must share one dtype and device.
        strict: raise :class:`ValueError` on negative curvature instead of reporting ``nan``.
        seed: seeds the Lanczos start vector and the Hutchinson probes (drawn on the CPU, so the
            same on every device).
        progress: show progress for the long estimates.

    Returns:
        A :class:`DecompositionReport`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
        ...         for _ in range(3)]
        >>> report = decompose(model, nn.functional.mse_loss, data, progress=False)
        >>> report.K, report.num_params, report.exact, report.negative_curvature
        (3, 3, True, False)
        >>> report.alignment > 0
        True
    """
    _check_arguments(
        damping, cg_tol, cg_max_iter, hutchinson_samples, exact, exact_limit, top_k, lanczos_steps
    )
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("batches must be a non-empty sequence with one entry per distribution")
    data = [as_batches(source, k) for k, source in enumerate(batches)]
    if isinstance(loss_fn, (list, tuple)):
        if len(loss_fn) != len(batches):
            raise ValueError(
                f"loss_fn lists {len(loss_fn)} functions but batches has {len(batches)} distributions"
            )
        for k, fn in enumerate(loss_fn):
            if not callable(fn):
                raise ValueError(f"loss_fn[{k}] is not callable")
    elif not callable(loss_fn):
        raise ValueError("loss_fn must be callable or a list of one callable per distribution")
    params = check_params([p for p in model.parameters() if p.requires_grad] if params is None else params)
    num_params = sum(p.numel() for p in params)
    use_exact = exact is True or (exact == "auto" and num_params <= exact_limit)
    if top_k > num_params:
        raise ValueError(f"top_k ({top_k}) exceeds the number of parameters ({num_params})")

    training = [(m, m.training) for m in model.modules()]
    holders = {id(p): p for p in [*model.parameters(), *params]}
    saved_grads = [(p, p.grad) for p in holders.values()]
    try:
        model.eval()
        return _decompose(
            MeanHessian(model, loss_fn, data, params),
            damping=damping,
            cg_tol=cg_tol,
            cg_max_iter=cg_max_iter,
            hutchinson_samples=hutchinson_samples,
            use_exact=use_exact,
            top_k=top_k,
            lanczos_steps=lanczos_steps,
            strict=strict,
            seed=seed,
            progress=progress,
        )
    finally:
        for module, mode in training:
            module.training = mode
        for p, grad in saved_grads:
            p.grad = grad


def _negative_message(damping: float, where: str, bound: float) -> str:
    return (
        f"H_bar + damping*I is not positive definite ({where}), so the alignment term is undefined "
        f"and reported as nan: raise damping above {bound:.4g} (a lower bound; current damping {damping:g})"
    )


def _decompose(
    op: MeanHessian,
    *,
    damping: float,
    cg_tol: float,
    cg_max_iter: int,
    hutchinson_samples: int,
    use_exact: bool,
    top_k: int,
    lanczos_steps: int,
    strict: bool,
    seed: int,
    progress: bool,
) -> DecompositionReport:
    K, dim = op.K, op.dim
    notes: list[str] = []
    generator = torch.Generator().manual_seed(seed)

    # Gradients and the first-order figures.
    losses, grads = op.gradients()
    stats = GradientStatistics([grads[0]], cosine=True)
    grad_norms = [float(stats.update([g])) for g in grads]
    g_bar = stats.mean[0]
    measures = {m: float(stats.disagreement(m)) for m in MEASURES}

    # The full Hessian when small enough: exact trace and spectrum, cheap products.
    H: Tensor | None = None
    if use_exact:
        total = dim * sum(len(b) for b in op.batches)
        with tqdm(total=total, desc="exact Hessian", disable=not progress, leave=False) as bar:
            H = op.matrix(progress=bar.update)
        evals = torch.linalg.eigvalsh(H.to(torch.float64)).cpu()
        trace, trace_stderr = float(H.diagonal().sum()), 0.0
        top = evals.flip(0)[:top_k].tolist()
        top_residuals = [0.0] * top_k
        curvature_min = float(evals[0])
        scale = float(evals.abs().max())
    else:
        ritz = _lanczos_ritz(op.matvec, dim, lanczos_steps, generator, op.dtype, op.device, progress)
        top = ritz.theta.flip(0)[:top_k].tolist()
        top_residuals = ritz.residuals.flip(0)[:top_k].tolist()
        curvature_min = float(ritz.theta[0])
        scale = float(ritz.theta.abs().max())
    spectral_negative = curvature_min + damping < -math.sqrt(torch.finfo(op.dtype).eps) * scale
    what = "smallest eigenvalue" if use_exact else "smallest Ritz value"
    if spectral_negative:
        notes.append(_negative_message(damping, f"{what} of H_bar is {curvature_min:.4g}", -curvature_min))
        if strict:
            raise ValueError(notes[-1])
    elif curvature_min < -math.sqrt(torch.finfo(op.dtype).eps) * scale:
        notes.append(
            f"H_bar is indefinite ({what} {curvature_min:.4g}): the weights are not at a minimum; "
            f"the alignment term uses the damped H_bar + {damping:g} I"
        )

    # Alignment: K solves with the damped mean Hessian.
    def damped(v: Tensor) -> Tensor:
        hv = H @ v if H is not None else op.matvec(v)
        return hv.add(v, alpha=damping) if damping else hv

    per_distribution = [0.0] * K
    iterations = [0] * K
    residual = 0.0
    cg_negative = False
    unconverged = False
    if not spectral_negative:
        for k in tqdm(range(K), desc="alignment (CG)", disable=not progress, leave=False):
            d = grads[k] - g_bar
            x, info = conjugate_gradient(damped, d, cg_tol, cg_max_iter, true_residual=True)
            iterations[k] = info.iterations
            residual = max(residual, info.residual)
            if info.negative_curvature:
                cg_negative = True
                quotient = info.min_curvature
                bound = max(damping - quotient, -curvature_min)
                where = (
                    f"conjugate gradients met p^T (H_bar + {damping:g} I) p / |p|^2 = {quotient:.4g} "
                    f"solving for distribution {k}; {what} of H_bar {curvature_min:.4g}"
                )
                notes.append(_negative_message(damping, where, bound))
                if strict:
                    raise ValueError(notes[-1])
                break
            unconverged = unconverged or not info.converged
            per_distribution[k] = float(torch.dot(d.to(torch.float64), x.to(torch.float64)))
    negative_curvature = spectral_negative or cg_negative
    if negative_curvature:
        per_distribution = [math.nan] * K
    elif unconverged:
        notes.append(
            f"conjugate gradients did not reach cg_tol={cg_tol:g} within cg_max_iter={cg_max_iter} "
            f"(largest relative residual {residual:.3g}): the alignment is approximate; raise "
            "cg_max_iter or damping"
        )
    alignment = math.nan if negative_curvature else sum(per_distribution) / K

    if not use_exact:
        trace, trace_stderr = hutchinson_trace(
            op.matvec,
            dim,
            hutchinson_samples,
            generator,
            dtype=op.dtype,
            device=op.device,
            progress=progress,
        )

    for note in notes:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    return DecompositionReport(
        alignment=alignment,
        alignment_per_distribution=per_distribution,
        alignment_residuals=residual,
        cg_iterations=iterations,
        curvature_trace=trace,
        curvature_trace_stderr=trace_stderr,
        curvature_top=top,
        curvature_top_residuals=top_residuals,
        curvature_min=curvature_min,
        negative_curvature=negative_curvature,
        exact=use_exact,
        grad_norms=grad_norms,
        mean_grad_norm=float(stats.mean_norm()),
        losses=losses,
        cosine_matrix=_cosine_matrix(grads),
        disagreement=measures,
        damping=float(damping),
        num_params=dim,
        K=K,
        hessian_vector_products=op.products,
        warnings=notes,
    )
