"""Curvature and alignment diagnostics: the two terms of the multi-distribution excess risk.

For K distributions with per-distribution gradients :math:`g_k` at the current weights, their
mean :math:`\\bar g`, :math:`d_k = g_k - \\bar g` and the mean Hessian
:math:`\\bar H = \\frac1K \\sum_k H_k`, the excess risk has

* an **alignment term** :math:`\\operatorname{tr}(\\bar H^{-1}\\Sigma_g)`,
  :math:`\\Sigma_g = \\frac1K\\sum_k d_k d_k^\\top`. Since :math:`\\Sigma_g` has rank at most
  :math:`K - 1`, it equals :math:`\\frac1K\\sum_k d_k^\\top \\bar H^{-1} d_k`: K linear
  solves, by conjugate gradients on Hessian-vector products, no sampling;
* a **curvature term** controlled by :math:`\\bar H`: its trace (Hutchinson, or exact for small
  models) and its top eigenvalues (Lanczos).

:func:`decompose` measures both on a model and returns a :class:`DecompositionReport`. The building
blocks work on flat vectors and any symmetric ``matvec``: :func:`hessian_vector_product`,
:func:`conjugate_gradient`, :func:`hutchinson_trace` and :func:`lanczos`.

:mod:`torchsage.diagnostics.sandbox` is a problem where both terms and the held-out excess risk
are known in closed form (linear regression with distribution shift), with the counterexample
showing that neither term bounds the other; ``torchsage diagnose`` (:mod:`torchsage.cli.diagnose`) runs
:func:`decompose` on a saved model or reproduces the sandbox (see docs/theory.md).

Example:
    >>> import torch
    >>> from torchsage.diagnostics import conjugate_gradient
    >>> A = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> x, info = conjugate_gradient(lambda v: A @ v, torch.tensor([2.0, 2.0], dtype=torch.float64))
    >>> x
    tensor([1.0000, 0.5000], dtype=torch.float64)
"""

from torchsage.diagnostics._decompose import DecompositionReport, decompose
from torchsage.diagnostics._hessian import hessian_vector_product
from torchsage.diagnostics._krylov import CGInfo, conjugate_gradient, hutchinson_trace, lanczos

__all__ = [
    "CGInfo",
    "DecompositionReport",
    "conjugate_gradient",
    "decompose",
    "hessian_vector_product",
    "hutchinson_trace",
    "lanczos",
]
