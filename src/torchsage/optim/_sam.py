"""SAM and its variants: ASAM, GSAM and SAGM, the sharpness-aware baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchsage.optim._ascent import AdaptiveGradientAscent, GradientAscent, GradientMatchingAscent
from torchsage.optim._checks import check_nonnegative
from torchsage.optim._core import SharpnessAware, shares_options

__all__ = ["ASAM", "GSAM", "SAGM", "SAM"]


@shares_options
class SAM(SharpnessAware):
    r"""Sharpness-Aware Minimization (Foret et al., 2021) as a drop-in optimizer.

    The ascent moves the weights to :math:`w + \rho\, g / \lVert g \rVert` (the norm over all
    parameters), the gradient is taken there, the weights are restored and the base optimizer
    steps with that gradient. With ``adaptive=True`` it is ASAM (Kwon et al., 2021):
    :math:`e = \rho\, T^2 g / \lVert T g \rVert` with :math:`T = |w| + \eta`.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base_optimizer: a :class:`torch.optim.Optimizer` class, built with ``**base_kwargs``.
        rho: ascent radius.
        adaptive: ASAM's scale-invariant ascent.
        eta: ASAM's offset in ``T = |w| + eta``.
        scaled: which parameters ASAM scales: ``"all"`` (default: ``T = |w| + eta`` for every
            parameter; with ``eta=0`` it is the adaptive mode of the widely used SAM package,
            ``T = |w|``) or ``"weights"`` (the ASAM authors' code: ``T = |w| + eta`` for the
            parameters whose name in ``model.named_parameters()`` contains ``weight`` anywhere,
            ``T = 1`` for the others, biases among them; a recurrent layer's ``weight_ih_l0``
            and ``weight_hh_l0`` are scaled, and so is a norm layer's ``weight``, and the bias of
            a submodule whose own name contains ``weight``; names are read from ``model=``, which
            is then required).
        model, update_bn_on_perturbed, max_grad_norm, on_nonfinite, solver_update: see
            :class:`torchsage.optim.SharpnessAware`.
        solver: multi-task learning: a torchjd aggregator or scalarizer (or ``"mean"``) that
            forms the descent direction from the perturbed task losses. With ``rho=0`` a step is
            exactly the solver's plain step, in one pass.
        process_group, layout: data-parallel training over ``torch.distributed`` (see
            :class:`torchsage.optim.SharpnessAware` and docs/distributed.md).

    The closure returns one scalar loss per distribution (or one scalar); SAM descends on their
    mean, like SAGE, so the two compare on equal terms. Every option after ``rho`` is
    keyword-only, in every torchsage optimizer.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> info = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        >>> round(info.perturbation_norm, 6)
        0.05
    """

    supports_sharded_parameters = True

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        eta: float = 0.01,
        scaled: str = "all",
        **options: Any,
    ) -> None:
        if scaled not in ("all", "weights"):
            raise ValueError(f"scaled must be 'all' or 'weights', got {scaled!r}")
        model = options.get("model")
        if scaled == "weights" and model is None:
            raise ValueError(
                "scaled='weights' reads the parameters' names from the model: pass model=model "
                "(and update_bn_on_perturbed=True to keep BatchNorm updated on both passes)"
            )
        # the ASAM authors test `'weight' in name`, a substring, not a suffix
        unscaled = [] if scaled == "all" else [p for n, p in model.named_parameters() if "weight" not in n]
        ascent = AdaptiveGradientAscent(eta=eta, unscaled=unscaled) if adaptive else GradientAscent()
        super().__init__(params, base_optimizer, ascent, dict(rho=rho), **options)
        self.adaptive = adaptive


class ASAM(SAM):
    """Adaptive SAM: :class:`SAM` with ``adaptive=True``; its radius is usually larger (0.5).

    ``ASAM(..., eta=0)`` is the adaptive mode of the widely used SAM package (``T = |w|`` on every
    parameter); ``ASAM(..., scaled="weights", model=model)`` is the ASAM authors' own rule
    (``T = |w| + eta`` on the parameters whose name contains ``weight``, ``T = 1`` on the others).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, scaled="weights", model=model, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> info = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        >>> info.perturbation_norm > 0
        True
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.5,
        *,
        eta: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **kwargs)


class GSAM(SAM):
    r"""Surrogate-gap guided SAM (Zhuang et al., 2022).

    The ascent is SAM's. The descent uses the perturbed gradient :math:`g_p` minus ``alpha``
    times the part of the clean gradient :math:`g` orthogonal to it,
    :math:`g_p - \alpha (g - \frac{\langle g, g_p \rangle}{\lVert g_p \rVert^2} g_p)`, which
    lowers the surrogate gap :math:`L(w + e) - L(w)` without changing the perturbed loss to
    first order.

    GSAM's authors tie the radius to the learning rate: with ``rho_min`` given, every step sets
    each group's radius to
    :math:`\rho_t = \rho_{min} + (\rho_{max} - \rho_{min}) (lr_t - lr_{min}) / (lr_{max} - lr_{min})`,
    :math:`\rho_{max}` the group's ``rho`` and :math:`lr_t` its learning rate at that step (as an LR
    scheduler left it), so ``rho`` decays with the learning rate, linearly in it. The radius is
    that of the learning rate the step uses, as with the GSAM repository's ``ProportionScheduler``
    over a torch scheduler; its own schedulers start ``rho`` at ``rho_min`` (their learning rate
    reads 0 before the first scheduler step) or one step ahead of the learning rate, an artefact
    of that code not followed here.

    Args:
        alpha: weight of the orthogonal correction.
        rho_min: radius at ``lr_min``, at most ``rho``; ``None`` (default) keeps ``rho`` fixed.
        lr_max: learning rate at which the radius is ``rho`` (default: each group's learning rate
            when the optimizer is built).
        lr_min: learning rate at which the radius is ``rho_min`` (default 0, the end of a cosine
            or linear decay).
        Other arguments as :class:`SAM`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.02, lr=0.1)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 4)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> for _ in range(3):
        ...     info = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        ...     sched.step()
        >>> round(info.perturbation_norm, 6)  # lr 0.05 = halfway: rho 0.02 + 0.08 / 2
        0.06
    """

    needs_clean_gradient = True

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        alpha: float = 0.01,
        rho_min: float | None = None,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.alpha = check_nonnegative("alpha", alpha)
        for name, value in (("rho_min", rho_min), ("lr_max", lr_max), ("lr_min", lr_min)):
            if value is not None:
                check_nonnegative(name, value)
        if rho_min is None and lr_max is not None:
            raise ValueError("lr_max ties rho to the learning rate only with rho_min: pass rho_min too")
        self.rho_min = rho_min
        self.lr_min = float(lr_min)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        if rho_min is not None:
            for group in self.param_groups:  # saved with the groups, so a resumed run keeps them
                group.setdefault("rho_max", group["rho"])
                group.setdefault("lr_max", group["lr"] if lr_max is None else float(lr_max))
                if not group["lr_max"] > self.lr_min:
                    raise ValueError(f"lr_max ({group['lr_max']}) must exceed lr_min ({self.lr_min})")
                if rho_min > group["rho_max"]:  # the GSAM authors' scheduler refuses it too
                    raise ValueError(
                        f"rho_min ({rho_min}) exceeds rho ({group['rho_max']}): the radius would grow as "
                        "the learning rate falls; pass rho_min <= rho"
                    )

    def step(self, closure: Any = None, **kwargs: Any) -> Any:
        if self.rho_min is not None:
            for group in self.param_groups:
                group.setdefault("rho_max", group["rho"])  # a group added after building
                group.setdefault("lr_max", group["lr"])
                share = (group["lr"] - self.lr_min) / (group["lr_max"] - self.lr_min)
                # below lr_min the line would give a negative radius
                group["rho"] = max(0.0, self.rho_min + (group["rho_max"] - self.rho_min) * share)
        return super().step(closure, **kwargs)

    def _descent(self, groups, measured, clean: dict[Tensor, Tensor] | None) -> dict[str, float]:
        if clean is None or self.alpha == 0:
            return {}
        params = [p for _, ps in groups for p in ps if p in clean]
        perturbed = [p.grad for p in params]
        original = [clean[p] for p in params]
        dot = self.passes.inner(original, perturbed)
        coefficient = float(dot / self.passes.norm(perturbed).square().clamp_min(1e-24))
        # g_orth = g - coefficient * g_p, so g_p - alpha g_orth = (1 + alpha c) g_p - alpha g
        torch._foreach_mul_(perturbed, 1.0 + self.alpha * coefficient)
        torch._foreach_add_(perturbed, original, alpha=-self.alpha)
        return {}


class SAGM(SAM):
    r"""Sharpness-Aware Gradient Matching (Wang et al., 2023).

    The ascent is :math:`e = (\rho / \lVert g \rVert - \alpha)\, g`; the descent gradient is
    the average of the clean and the perturbed gradients, :math:`(g + g_p) / 2`, so the empirical
    loss, the perturbed loss and the gap between them are minimised together.

    Args:
        alpha: pull-back of the ascent along the gradient.
        Other arguments as :class:`SAM`.
    """

    needs_clean_gradient = True

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        alpha: float = 0.001,
        **kwargs: Any,
    ) -> None:
        self.alpha = check_nonnegative("alpha", alpha)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        self.ascent = GradientMatchingAscent(alpha=self.alpha)

    def _descent(self, groups, measured, clean: dict[Tensor, Tensor] | None) -> dict[str, float]:
        if clean is None:
            return {}
        params = [p for _, ps in groups for p in ps if p in clean]
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, [clean[p] for p in params])
        torch._foreach_mul_(grads, 0.5)
        return {}
