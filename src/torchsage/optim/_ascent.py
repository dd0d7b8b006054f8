"""Ascent rules: how the clean mean gradient becomes a weight perturbation.

* :class:`GradientAscent` (SAM): ``e = rho * g / ||g||`` with the norm over all parameters.
* :class:`GradientMatchingAscent` (SAGM): ``e = (rho / ||g|| - alpha) g``.
* :class:`AdaptiveGradientAscent` (ASAM): ``e = rho * T^2 g / ||T g||`` with ``T = |w| + eta``
  (``T = 1`` on the parameters it is told to leave unscaled).
* :class:`PolarAscent` (SAGE): every matrix moves along the polar factor of its gradient, every
  vector along its normalised gradient, then the whole is scaled (see ``RHO_SCALINGS``).
* :class:`AlignedPolarAscent` (SAGE "align"): mixes the polar factor of the mean gradient with
  the polar factor of the per-coordinate spread of the distributions' gradients.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from torchsage import polar as kernels
from torchsage.disagreement import GradientStatistics, global_norm
from torchsage.optim._core import AscentRule
from torchsage.polar import newton_schulz_coefficients

__all__ = [
    "ASCENT_DIRECTIONS",
    "RHO_SCALINGS",
    "AdaptiveGradientAscent",
    "AlignedPolarAscent",
    "GradientAscent",
    "GradientMatchingAscent",
    "PolarAscent",
    "check_direction",
]

#: ``"global"``: the whole perturbation has norm ``rho`` (as in SAM, so a SAM ``rho`` transfers);
#: ``"layer"``: every matrix moves by ``rho * polar(G)`` (norm ``rho * sqrt(rank)``);
#: ``"weight"``: every matrix moves by ``rho * ||W||_F * polar(G)``. Vectors move by
#: ``rho * g / ||g||`` in the last two.
RHO_SCALINGS: tuple[str, ...] = ("global", "layer", "weight")

#: What a parameter group's ``"ascent"`` key may say in SAGE: ``"polar"`` (default, the paper's
#: rule: the polar factor of each matrix's gradient, ``g / ||g||`` for vectors), ``"gradient"``
#: (every tensor, matrices too, along ``g / ||g||``: SAM's direction, per tensor) or ``"none"``
#: (the group is not perturbed and takes no share of a global ``rho``).
ASCENT_DIRECTIONS: tuple[str, ...] = ("polar", "gradient", "none")

Groups = Sequence[tuple[dict[str, Any], list[Tensor]]]


class GradientAscent(AscentRule):
    """SAM's ascent: ``rho * g / ||g||``, the norm taken over every parameter of every group."""

    def __init__(self, eps: float = 1e-12) -> None:
        self.eps = eps

    def perturbation(self, groups: Groups, stats: GradientStatistics | None) -> list[list[Tensor]]:
        norm = global_norm([p.grad for _, ps in groups for p in ps])
        return [
            torch._foreach_mul([p.grad for p in ps], float(g["rho"] / (norm + self.eps))) if ps else []
            for g, ps in groups
        ]


class GradientMatchingAscent(AscentRule):
    """SAGM's ascent: ``e = (rho / ||g|| - alpha) g``, SAM's step pulled back by ``alpha g``."""

    def __init__(self, alpha: float = 0.001, eps: float = 1e-12) -> None:
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.eps = eps

    def perturbation(self, groups: Groups, stats: GradientStatistics | None) -> list[list[Tensor]]:
        norm = global_norm([p.grad for _, ps in groups for p in ps])
        return [
            torch._foreach_mul([p.grad for p in ps], float(g["rho"] / (norm + self.eps) - self.alpha))
            if ps
            else []
            for g, ps in groups
        ]


class AdaptiveGradientAscent(AscentRule):
    """ASAM's ascent: ``rho * T^2 g / ||T g||`` with the scale operator ``T = |w| + eta``.

    Args:
        eta: the offset in ``T``.
        unscaled: parameters whose ``T`` is 1 (the ASAM authors' code scales only the parameters
            whose name contains ``weight``; biases keep ``T = 1``).
    """

    def __init__(self, eta: float = 0.01, eps: float = 1e-12, unscaled: Sequence[Tensor] = ()) -> None:
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta
        self.eps = eps
        self.unscaled = {id(p) for p in unscaled}

    def perturbation(self, groups: Groups, stats: GradientStatistics | None) -> list[list[Tensor]]:
        scales = [
            [None if id(p) in self.unscaled else p.detach().abs().add_(self.eta) for p in ps]
            for _, ps in groups
        ]
        scaled = [
            [p.grad if t is None else t * p.grad for t, p in zip(ts, ps)]
            for ts, (_, ps) in zip(scales, groups)
        ]
        norm = global_norm([x for xs in scaled for x in xs])
        out = []
        for (g, _), ts, xs in zip(groups, scales, scaled):
            factor = float(g["rho"] / (norm + self.eps))
            out.append([x * factor if t is None else t.mul_(x).mul_(factor) for t, x in zip(ts, xs)])
        return out


class PolarAscent(AscentRule):
    """SAGE's ascent: polar factor per matrix, normalised gradient per vector, then scaled.

    Matrices (parameters with 2 or more dimensions, conv kernels reshaped to ``(out, -1)``) of
    equal shape are stacked and orthogonalised in one call of :func:`torchsage.polar.polar_factor`
    (looked up on its module at each call, so a test can count the calls). A parameter group's
    ``"ascent"`` key chooses the direction of its tensors (:data:`ASCENT_DIRECTIONS`).

    Args:
        scaling: one of :data:`RHO_SCALINGS`.
        steps, coefficients, method, dtype, compile: passed to :func:`torchsage.polar_factor`
            (``compile=True`` runs the Newton-Schulz iterations through ``torch.compile``;
            ``method="auto"`` iterates on the Gram matrix where that was measured faster).
    """

    def __init__(
        self,
        scaling: str = "global",
        steps: int = 5,
        coefficients: Any = "muon",
        method: str = "auto",
        dtype: torch.dtype = torch.float32,
        eps: float = 1e-12,
        compile: bool = False,
    ) -> None:
        if scaling not in RHO_SCALINGS:
            raise ValueError(f"unknown rho scaling {scaling!r}: use one of {', '.join(RHO_SCALINGS)}")
        if method not in kernels.POLAR_METHODS:
            raise ValueError(
                f"unknown polar method {method!r}: use one of {', '.join(map(repr, kernels.POLAR_METHODS))}"
            )
        newton_schulz_coefficients(steps, coefficients)  # validates steps and coefficients
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        self.scaling = scaling
        self.polar_kwargs = dict(
            steps=steps, coefficients=coefficients, method=method, dtype=dtype, compile=compile
        )
        self.eps = eps

    def directions(self, tensors: Sequence[Tensor], kinds: Sequence[str] | None = None) -> list[Tensor]:
        """``polar(G)`` for each matrix, ``g / ||g||`` for each vector (zeros stay zeros).

        ``kinds`` gives each tensor's direction (see :data:`ASCENT_DIRECTIONS`); ``None`` means
        ``"polar"`` for all.
        """
        out: list[Tensor | None] = [None] * len(tensors)
        batches: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            kind = "polar" if kinds is None else kinds[i]
            if kind == "none":
                out[i] = torch.zeros_like(t)
            elif t.ndim >= 2 and kind == "polar":
                batches[(t.shape[0], t[0].numel(), t.dtype, t.device)].append(i)
            else:
                norm = t.norm()
                out[i] = t / torch.where(norm > 0, norm, 1.0)
        for (rows, cols, _, _), idx in batches.items():
            if len(idx) == 1:  # nothing to batch: skip the stacking copy
                (i,) = idx
                matrix = tensors[i].reshape(rows, cols)
                out[i] = kernels.polar_factor(matrix, **self.polar_kwargs).view_as(tensors[i])
                continue
            stacked = torch.stack([tensors[i].reshape(rows, cols) for i in idx])
            polar = kernels.polar_factor(stacked, **self.polar_kwargs)
            for j, i in enumerate(idx):
                out[i] = polar[j].view_as(tensors[i])
        return out  # type: ignore[return-value]

    def _scale(self, groups: Groups, directions: list[list[Tensor]]) -> list[list[Tensor]]:
        if self.scaling == "global":
            norm = global_norm([d for ds in directions for d in ds])
            return [
                torch._foreach_mul(ds, float(g["rho"] / (norm + self.eps))) if ds else []
                for (g, _), ds in zip(groups, directions)
            ]
        out = []
        for (g, ps), ds in zip(groups, directions):
            scaled = []
            for p, d in zip(ps, ds):
                factor = g["rho"] * (p.detach().norm() if self.scaling == "weight" and p.ndim >= 2 else 1.0)
                scaled.append(d.mul_(factor))
            out.append(scaled)
        return out

    def perturbation(self, groups: Groups, stats: GradientStatistics | None) -> list[list[Tensor]]:
        flat = self.directions([p.grad for _, ps in groups for p in ps], _kinds(groups))
        return self._scale(groups, _regroup(groups, flat))


def check_direction(value: Any) -> str:
    """``value`` if it names an ascent direction of a parameter group, else a ValueError."""
    if value not in ASCENT_DIRECTIONS:
        raise ValueError(
            f"unknown ascent direction {value!r} in a parameter group: use one of "
            f"{', '.join(map(repr, ASCENT_DIRECTIONS))}"
        )
    return value


def _kinds(groups: Groups) -> list[str]:
    return [g.get("ascent", "polar") for g, ps in groups for _ in ps]


def _regroup(groups: Groups, flat: list[Tensor]) -> list[list[Tensor]]:
    out, start = [], 0
    for _, ps in groups:
        out.append(flat[start : start + len(ps)])
        start += len(ps)
    return out


class AlignedPolarAscent(PolarAscent):
    """SAGE "align" ascent: ``(1 - lam) polar(g_bar) + lam polar(std_k(g_k) * sign(g_bar))``.

    The mixing weight ``lam = clamp(lambda_max * (1 - mean pairwise cosine), 0, lambda_max)``
    grows as the distributions' gradients disagree, steering the perturbation towards the
    coordinates where they differ most. Needs per-distribution statistics (two more
    gradient-sized buffers, independent of K). With ``mix_vectors=False`` only matrices mix;
    vectors move along ``g / ||g||``.
    """

    needs_statistics = True
    cosine = True
    elementwise = True

    def __init__(self, lambda_max: float = 0.8, mix_vectors: bool = True, **kwargs: Any) -> None:
        if not 0.0 <= lambda_max <= 1.0:
            raise ValueError(f"lambda_max must lie in [0, 1], got {lambda_max}")
        if not isinstance(mix_vectors, bool):
            raise ValueError(f"mix_vectors must be True or False, got {mix_vectors!r}")
        super().__init__(**kwargs)
        self.lambda_max = lambda_max
        self.mix_vectors = mix_vectors
        self.last_lambda = 0.0

    def perturbation(self, groups: Groups, stats: GradientStatistics | None) -> list[list[Tensor]]:
        if stats is None:
            raise ValueError("the align ascent needs per-distribution statistics")
        lam = float((self.lambda_max * (1.0 - stats.mean_cosine())).clamp(0.0, self.lambda_max))
        self.last_lambda = lam
        grads = [p.grad for _, ps in groups for p in ps]
        kinds = _kinds(groups)
        mean_dirs = self.directions(grads, kinds)
        if lam > 0:
            variance = dict(zip(map(id, stats.params), stats.elementwise_variance()))
            params = [p for _, ps in groups for p in ps]
            spread = [variance[id(p)].sqrt_().mul_(torch.sign(g)) for p, g in zip(params, grads)]
            spread_dirs = self.directions(spread, kinds)
            mixed = torch._foreach_mul(mean_dirs, 1.0 - lam)
            torch._foreach_add_(mixed, spread_dirs, alpha=lam)
            if not self.mix_vectors:  # vectors keep g / ||g||
                mixed = [x if g.ndim >= 2 else m for x, m, g in zip(mixed, mean_dirs, grads)]
            mean_dirs = mixed
        return self._scale(groups, _regroup(groups, mean_dirs))
