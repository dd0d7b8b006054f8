"""Disagreement of per-distribution gradients, computed as streaming statistics.

With K distributions, per-distribution gradients ``g_k`` (flattened over all parameters) and
their mean ``g_bar``, the measures are

* ``raw_var``: ``V = (1/K) sum_k ||g_k - g_bar||^2`` (the trace of the gradient covariance),
* ``raw_std``: ``sqrt(V)``,
* ``normalized_var``: ``V / ||g_bar||^2``,
* ``normalized_std``: ``sqrt(V) / ||g_bar||``,
* ``cosine``: ``1 - mean pairwise cosine similarity`` of the ``g_k`` (range ``[0, 2]``).

All are 0 for K = 1 or for identical non-zero gradients (a zero gradient has cosine 0 with
everything, itself included). Norms are taken per parameter in the gradients' dtype and summed in
float64: float32 gradients with a norm below about 1e-22 count as zero.

:class:`GradientStatistics` takes the gradients one distribution at a time, so memory does not
grow with K. Welford's update keeps the variance non-negative and precise when the gradients
nearly agree (the textbook ``mean ||g_k||^2 - ||g_bar||^2`` cancels catastrophically there). The
cosine measure is the same variance taken over the normalised gradients ``u_k = g_k / ||g_k||``:
``sum_{i<j} (1 - cos_ij) = (K / 2) sum_k ||u_k - u_bar||^2`` when no ``g_k`` is zero, so
``cosine = sum_k ||u_k - u_bar||^2 / (K - 1)`` (a zero gradient counts as cosine 0 with the rest).

**Weights.** Distributions may carry positive weights ``w_k`` (normalised to sum 1), e.g. their
shares ``n_k / N`` of a batch of unequal parts. The mean is then ``g_bar = sum_k w_k g_k`` and the
variance ``V = sum_k w_k ||g_k - g_bar||^2`` (West's weighted update); equal weights give the
formulas above. The ``cosine`` measure stays the mean over pairs of distributions, each pair
counted once: a gradient's direction has no batch size (the authors' DG code averages the
pairwise cosines the same way while weighting the mean gradient by ``n_k / N``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["MEASURES", "GradientStatistics", "disagreement", "sum_of_squares"]

MEASURES: tuple[str, ...] = ("normalized_std", "cosine", "normalized_var", "raw_std", "raw_var")


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown disagreement measure {measure!r}: use one of {', '.join(MEASURES)}")
    return measure


def check_weights(weights: Sequence[float] | Tensor, count: int | None = None) -> list[float]:
    """Per-distribution weights as Python floats normalised to sum 1; ValueError unless they are
    ``count`` (when given) positive finite numbers."""
    if isinstance(weights, Tensor):
        if weights.ndim != 1:
            raise ValueError(f"weights must be a 1-d sequence, got a tensor of shape {tuple(weights.shape)}")
        weights = weights.tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a sequence of positive numbers, got {weights!r}")
    values = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and math.isfinite(w)):
            raise ValueError(
                f"weights must be positive finite numbers (leave out a distribution with no samples), "
                f"got {list(weights)!r}"
            )
        values.append(float(w))
    if not values:
        raise ValueError("weights must not be empty")
    if count is not None and len(values) != count:
        raise ValueError(f"got {len(values)} weights for {count} distributions")
    total = math.fsum(values)
    return [w / total for w in values]


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norm of the concatenation of ``tensors``: per-tensor norms summed in float64
    (also used by the data-parallel statistics of :mod:`torchsage.optim`).

    Example:
        >>> sum_of_squares([torch.tensor([3.0]), torch.tensor([4.0, 0.0])])
        tensor(25., dtype=torch.float64)
    """
    norms = torch._foreach_norm(list(tensors))
    device = norms[0].device
    if any(n.device != device for n in norms):  # model parallel: gather the scalars on one device
        norms = [n.to(device) for n in norms]
    return torch.stack(norms).to(torch.float64).square().sum()


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of the concatenation of ``tensors`` (float64 scalar; 0 for an empty list)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    return sum_of_squares(tensors).sqrt()


class GradientStatistics:
    """Running mean and spread of per-distribution gradients, fed one distribution at a time.

    Args:
        like: tensors giving the shape, dtype and device of each parameter's gradient.
        cosine: also track the normalised gradients (one more gradient-sized buffer), for the
            ``cosine`` measure.
        elementwise: also track the per-coordinate variance (one more gradient-sized buffer).
        eps: added to ``||g_bar||`` (``||g_bar||^2`` for ``normalized_var``).

    Example:
        >>> stats = GradientStatistics([torch.zeros(3)], cosine=True)
        >>> for g in ([torch.tensor([1.0, 0.0, 0.0])], [torch.tensor([0.0, 1.0, 0.0])]):
        ...     _ = stats.update(g)
        >>> stats.mean
        [tensor([0.5000, 0.5000, 0.0000])]
        >>> round(stats.disagreement("raw_var").item(), 6)
        0.5
        >>> round(stats.disagreement("cosine").item(), 6)
        1.0
    """

    def __init__(
        self,
        like: Sequence[Tensor],
        cosine: bool = False,
        elementwise: bool = False,
        eps: float = 1e-12,
    ) -> None:
        self.mean = [torch.zeros_like(t) for t in like]
        self.params: Sequence[Tensor] = like
        self.count = 0
        #: sum of the weights seen (equals ``count`` when every weight is 1)
        self.total = 0.0
        self.eps = eps
        device = self.mean[0].device if self.mean else torch.device("cpu")
        self._m2 = torch.zeros((), dtype=torch.float64, device=device)
        self._unit_mean = [torch.zeros_like(t) for t in like] if cosine else None
        self._unit_m2 = torch.zeros((), dtype=torch.float64, device=device)
        self._nonzero = torch.zeros((), dtype=torch.float64, device=device)
        self._elementwise_m2 = [torch.zeros_like(t) for t in like] if elementwise else None

    def _grads(self, grads: Sequence[Tensor | None]) -> list[Tensor]:
        if len(grads) != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} gradient tensors, got {len(grads)}")
        return [torch.zeros_like(m) if g is None else g for g, m in zip(grads, self.mean)]

    #: the squared norm of a gradient given as a list of tensors; statistics kept on shards of the
    #: gradients (FSDP2) replace it with one that also sums over the shards
    _sum_of_squares: Callable[[Sequence[Tensor]], Tensor] = staticmethod(sum_of_squares)

    def _welford(self, mean: list[Tensor], delta: list[Tensor], weight: float, total: float) -> Tensor:
        """Folds ``delta = x - mean`` with ``weight`` into ``mean`` (``total`` weights including
        this one); returns the increment of the weighted sum of squares (West, 1979)."""
        increment = self._sum_of_squares(delta) * (weight * (total - weight) / total)
        torch._foreach_add_(mean, delta, alpha=weight / total)
        return increment

    @torch.no_grad()
    def update(self, grads: Sequence[Tensor | None], inplace: bool = False, weight: float = 1.0) -> Tensor:
        """Adds one distribution's gradients (``None`` counts as zero) with a positive ``weight``.

        With ``inplace=True`` the given tensors are overwritten (they end up holding
        ``g_k - mean``); the optimizer uses this to avoid a copy. Returns ``||g_k||`` (float64).
        """
        weight = float(weight)
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"the weight of a distribution must be a positive finite number, got {weight}")
        grads = self._grads(grads)
        self.count += 1
        self.total += weight
        k = self.count
        norm = self._sum_of_squares(grads).sqrt()
        if self._unit_mean is not None:
            nonzero = norm > 0
            inv = torch.where(nonzero, 1.0 / torch.where(nonzero, norm, 1.0), 0.0)
            units = torch._foreach_mul(grads, inv.to(grads[0].dtype)) if grads else []
            torch._foreach_sub_(units, self._unit_mean)
            self._unit_m2 += self._welford(self._unit_mean, units, 1.0, float(k))  # pairs count once
            self._nonzero += nonzero.to(torch.float64)
        delta = grads if inplace else [g.clone() for g in grads]
        torch._foreach_sub_(delta, self.mean)
        if self._elementwise_m2 is not None:
            torch._foreach_addcmul_(
                self._elementwise_m2, delta, delta, value=weight * (self.total - weight) / self.total
            )
        self._m2 += self._welford(self.mean, delta, weight, self.total)
        return norm

    @torch.no_grad()
    def merge(self, sum_over_workers: Callable[[list[Tensor]], list[Tensor]], total: int) -> None:
        """Merges statistics kept by several workers over disjoint sets of distributions, in place.

        Every worker calls it on its own statistics (equal weights, ``count`` distributions each)
        with ``sum_over_workers``, which sums a list of tensors over the workers and returns the
        sums (called two or three times, in the same order on every worker); afterwards each holds
        the statistics of all ``total`` distributions. The parallel form of Welford's update: with
        ``n_r`` distributions and mean ``g_r`` on worker ``r``, ``g_bar = sum_r n_r g_r / n`` and
        ``M2 = sum_r (M2_r + n_r ||g_r - g_bar||^2)``; the normalised gradients likewise.
        """
        n = self.count
        units = self._unit_mean if self._unit_mean is not None else []
        local = [*self.mean, *units]
        merged = sum_over_workers(torch._foreach_mul(local, float(n)) if local else [])
        if merged:
            merged = torch._foreach_div(merged, float(total))
        mean, unit_mean = merged[: len(self.mean)], merged[len(self.mean) :]
        delta = torch._foreach_sub(self.mean, mean) if self.mean else []
        scalars = [self._m2 + n * sum_of_squares(delta) if delta else self._m2]
        if units:
            scalars.append(self._unit_m2 + n * sum_of_squares(torch._foreach_sub(units, unit_mean)))
            scalars.append(self._nonzero)
        if self._elementwise_m2 is not None:
            spread = torch._foreach_addcmul(self._elementwise_m2, delta, delta, value=float(n))
            self._elementwise_m2 = sum_over_workers(spread)
        (reduced,) = sum_over_workers([torch.stack([s.to(torch.float64).reshape(()) for s in scalars])])
        self.mean = mean
        self._m2 = reduced[0]
        if units:
            self._unit_mean = unit_mean
            self._unit_m2, self._nonzero = reduced[1], reduced[2]
        self.count = total
        self.total = float(total)

    def variance(self) -> Tensor:
        """``V = sum_k w_k ||g_k - g_bar||^2`` with weights normalised to sum 1 (float64)."""
        return self._m2 / self.total if self.total > 0 else self._m2

    def mean_norm(self) -> Tensor:
        return self._sum_of_squares(self.mean).sqrt()

    def mean_cosine(self) -> Tensor:
        """Mean pairwise cosine similarity of the gradients (1 for K = 1)."""
        return 1.0 - self.cosine_disagreement()

    def cosine_disagreement(self) -> Tensor:
        if self._unit_mean is None:
            raise ValueError("cosine statistics were not tracked: build with cosine=True")
        k = self.count
        if k < 2:
            return torch.zeros_like(self._unit_m2)
        # (K - n_nonzero) / K corrects for zero gradients, whose cosine with the rest counts as 0.
        return (k - self._nonzero) / k + self._unit_m2 / (k - 1)

    def elementwise_variance(self) -> list[Tensor]:
        """Per-coordinate variance ``sum_k w_k (g_k - g_bar)^2`` (weights summing to 1), one tensor
        per parameter."""
        if self._elementwise_m2 is None:
            raise ValueError("per-coordinate statistics were not tracked: build with elementwise=True")
        return torch._foreach_div(self._elementwise_m2, self.total if self.total > 0 else 1.0)

    def disagreement(self, measure: str = "normalized_std") -> Tensor:
        """The disagreement ``measure`` of the gradients seen so far, as a float64 scalar."""
        check_measure(measure)
        if measure == "cosine":
            return self.cosine_disagreement()
        var = self.variance()
        if measure == "raw_var":
            return var
        if measure == "raw_std":
            return var.sqrt()
        norm = self.mean_norm()
        if measure == "normalized_var":
            return var / (norm.square() + self.eps)
        return var.sqrt() / (norm + self.eps)


def disagreement(
    grads: Sequence[Tensor | Sequence[Tensor]],
    measure: str = "normalized_std",
    eps: float = 1e-12,
    weights: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Disagreement of per-distribution gradients.

    Args:
        grads: one entry per distribution: a tensor (a flattened gradient) or a sequence of
            tensors (one per parameter), all entries laid out alike.
        measure: ``"normalized_std"`` (default), ``"cosine"``, ``"normalized_var"``,
            ``"raw_std"`` or ``"raw_var"``.
        eps: added to ``||g_bar||`` in the normalised measures.
        weights: one positive weight per distribution (normalised to sum 1; e.g. the batch sizes
            ``n_k``) for the mean and the variance; ``None`` weighs them equally. The ``cosine``
            measure counts every pair once whatever the weights (see the module docstring).

    Returns:
        A float64 scalar tensor; 0 for one distribution or identical gradients.

    Example:
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
        >>> disagreement([g1, g2], "cosine").item()
        2.0
        >>> disagreement([g1, g1], "normalized_std").item()
        0.0
    """
    check_measure(measure)
    if len(grads) == 0:
        raise ValueError("disagreement needs the gradient of at least one distribution")
    entries = [[g] if isinstance(g, Tensor) else list(g) for g in grads]
    shapes = [tuple(t.shape) for t in entries[0]]
    for k, entry in enumerate(entries):
        if [tuple(t.shape) for t in entry] != shapes:
            raise ValueError(f"gradient of distribution {k} is laid out differently from distribution 0")
    ws = check_weights(weights, len(entries)) if weights is not None else [1.0] * len(entries)
    stats = GradientStatistics(entries[0], cosine=measure == "cosine", eps=eps)
    for entry, w in zip(entries, ws):
        stats.update(entry, weight=w)
    return stats.disagreement(measure)
