"""FSDP2 (``fully_shard``) parameters in the two-pass step.

Under FSDP2 every parameter is a DTensor sharded by rows (``Shard(0)``) over a 1-D device mesh:
process ``r`` keeps rows ``R_r`` of every parameter and, after each backward, the rows ``R_r`` of
the gradient averaged over the processes (FSDP's reduce-scatter). So each per-distribution
backward of the clean pass leaves every process with its rows of the whole batch's gradient
``g_k``, and the step works on those rows (the local shards):

* elementwise work (the Welford update of the statistics, the perturbation, the restore, the
  noise) is local;
* every sum over coordinates (the squared norms inside the disagreement statistics, the global
  norm of the perturbation, a vector's norm, ``||W||_F``) is the local sum all-reduced over the
  mesh: a float64 scalar per sum;
* the polar factor of a row-sharded matrix ``G`` is never gathered: Newton-Schulz runs on the rows,
  ``X_r <- a X_r + X_r (b A + c A^2)`` with the Gram matrix ``A = X^T X = sum_r X_r^T X_r``, one
  all-reduce of an ``n x n`` matrix (``n`` columns) per iteration. Since
  ``X p(X^T X) = p(X X^T) X`` for every polynomial ``p``, this is the single-process iteration
  (which works on ``X X^T`` for a wide matrix) in exact arithmetic; float rounding differs. For
  a wide matrix (``m < n``) the Gram matrix is larger than the single-process one: the price of
  never gathering the matrix.
* SAGE's noise is drawn on each process's rows from its own stream (seed and rank): independent
  Gaussians of the same standard deviation, the single-process noise in distribution, not the
  same draw (see docs/distributed.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchsage.optim._core import AscentRule
from torchsage.optim._shards import ShardSums
from torchsage.polar import newton_schulz_coefficients

__all__ = ["ShardedAlignedAscent", "ShardedPolarAscent", "sharded_polar_factor"]


def sharded_polar_factor(
    rows: Tensor, group: Any, steps: int = 5, coefficients: Any = "muon", dtype: torch.dtype = torch.float32
) -> Tensor:
    """This process's rows of ``polar(G)``, given its rows of the ``(m, n)`` matrix ``G``.

    Newton-Schulz with the Gram matrix of the columns (see the module docstring); the
    normalisation by the largest entry and then the Frobenius norm is the single-process one, with
    both reduced over the processes. Zero rows are dropped before iterating (exact: they stay zero).
    Every process must call it with its rows of the same matrix.
    """
    table = newton_schulz_coefficients(steps, coefficients, dtype)
    # a zero row contributes nothing to the Gram matrix and stays zero under X_r (a I + B): iterate
    # on this process's non-zero rows only (an embedding's gradient holds the batch's tokens' rows)
    live = rows.ne(0).any(dim=1)
    if rows.shape[0] and not bool(live.all()):
        index = live.nonzero().squeeze(1)
        polar = sharded_polar_factor(rows.index_select(0, index), group, steps, coefficients, dtype)
        return torch.zeros_like(rows).index_copy_(0, index, polar)
    X = rows.to(dtype)
    wide = torch.promote_types(dtype, torch.float32)
    scale = X.abs().amax() if X.numel() else torch.zeros((), dtype=dtype, device=X.device)
    scale = scale.to(wide)
    dist.all_reduce(scale, op=dist.ReduceOp.MAX, group=group)
    X = X / torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype)
    norm = X.to(wide).square().sum()
    dist.all_reduce(norm, group=group)
    norm = norm.sqrt().to(dtype)
    X = X / torch.where(norm > 0, norm, torch.ones_like(norm))
    for a, b, c in table:
        A = X.mT @ X
        dist.all_reduce(A, group=group)
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, X, B, beta=a)
    return X.to(rows.dtype)


class ShardedPolarAscent(AscentRule):
    """SAGE's ascent on FSDP2 shards: the polar factor of each matrix from its row shards, each
    vector's normalised gradient with the norm over every shard, then SAGE's scaling. A parameter
    group's ``"ascent"`` key chooses its tensors' direction as in one process
    (``"gradient"``: ``g / ||g||`` with the norm over every shard; ``"none"``: zero).

    Args:
        group: the process group of the mesh.
        scaling, steps, coefficients, method, dtype: as for SAGE's ascent. Every Newton-Schulz
            method (``"auto"``, the default, ``"newton_schulz"``, ``"gram_newton_schulz"``) runs as
            the Gram form of the row shards here; ``method="svd"`` would gather each matrix: refused.
    """

    def __init__(
        self,
        group: Any,
        scaling: str = "global",
        steps: int = 5,
        coefficients: Any = "muon",
        method: str = "auto",
        dtype: torch.dtype = torch.float32,
        eps: float = 1e-12,
        **_: Any,
    ) -> None:
        if method not in ("auto", "newton_schulz", "gram_newton_schulz"):
            raise ValueError(
                f"polar_method={method!r} would gather every matrix on FSDP2 shards: "
                "use 'auto' or 'newton_schulz'"
            )
        self.group = group
        self.scaling = scaling
        self.polar = dict(steps=steps, coefficients=coefficients, dtype=dtype)
        self.eps = eps
        self.sums = ShardSums(group)

    def _direction(self, g: Tensor, kind: str = "polar") -> Tensor:
        """This process's rows of ``g``'s direction; ``kind``: the group's ``"ascent"`` key, as in
        :meth:`torchsage.optim.PolarAscent.directions` (every process calls it for every tensor, in
        the same order: each all-reduces)."""
        if kind == "none":
            return torch.zeros_like(g)
        if g.ndim >= 2 and kind == "polar":
            return sharded_polar_factor(g.reshape(g.shape[0], -1), self.group, **self.polar).view_as(g)
        norm = self.sums([g]).sqrt().to(g.dtype)
        return g / torch.where(norm > 0, norm, torch.ones_like(norm))

    def perturbation(
        self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]], stats: Any
    ) -> list[list[Tensor]]:
        return self._scale(
            groups,
            [[self._direction(p.grad.to_local(), g.get("ascent", "polar")) for p in ps] for g, ps in groups],
        )

    def _scale(
        self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]], directions: list[list[Tensor]]
    ) -> list[list[Tensor]]:
        if self.scaling == "global":
            norm = float(self.sums([d for ds in directions for d in ds]).sqrt())
            return [
                [d.mul_(g["rho"] / (norm + self.eps)) for d in ds] for (g, _), ds in zip(groups, directions)
            ]
        out = []
        for (g, ps), ds in zip(groups, directions):
            scaled = []
            for p, d in zip(ps, ds):
                weight = self.scaling == "weight" and p.ndim >= 2
                size = math.sqrt(float(self.sums([p.detach().to_local()]))) if weight else 1.0
                scaled.append(d.mul_(g["rho"] * size))
            out.append(scaled)
        return out


class ShardedAlignedAscent(ShardedPolarAscent):
    """SAGEAlign's ascent on FSDP2 shards: ``(1 - lam) polar(g_bar) + lam polar(std_k(g_k) * sign(g_bar))``
    with the per-coordinate spread kept on each process's rows and the mixing weight from the mean
    cosine (whose sums run over every shard); see :class:`torchsage.optim.AlignedPolarAscent`."""

    needs_statistics = True
    cosine = True
    elementwise = True

    def __init__(self, group: Any, lambda_max: float = 0.8, mix_vectors: bool = True, **options: Any) -> None:
        super().__init__(group, **options)
        self.lambda_max = lambda_max
        self.mix_vectors = mix_vectors
        self.last_lambda = 0.0

    def perturbation(
        self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]], stats: Any
    ) -> list[list[Tensor]]:
        lam = float((self.lambda_max * (1.0 - stats.mean_cosine())).clamp(0.0, self.lambda_max))
        self.last_lambda = lam
        out = []
        variance = dict(zip(map(id, stats.params), stats.elementwise_variance())) if lam > 0 else {}
        for group, ps in groups:
            kind = group.get("ascent", "polar")
            mixed = []
            for p in ps:
                g = p.grad.to_local()
                direction = self._direction(g, kind)
                if lam > 0 and (self.mix_vectors or g.ndim >= 2):
                    spread = self._direction(variance[id(p)].sqrt().mul_(torch.sign(g)), kind)
                    direction = direction.mul_(1.0 - lam).add_(spread, alpha=lam)
                mixed.append(direction)
            out.append(mixed)
        return self._scale(groups, out)
