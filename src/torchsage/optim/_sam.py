"""SAM and ASAM: the reference sharpness-aware baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from torchsage.optim._ascent import AdaptiveGradientAscent, GradientAscent
from torchsage.optim._core import SharpnessAware

__all__ = ["ASAM", "SAM"]


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
        model, update_bn_on_perturbed, max_grad_norm, on_nonfinite: see
            :class:`torchsage.optim.SharpnessAware`.

    The closure returns one scalar loss per distribution (or one scalar); SAM descends on their
    mean, like SAGE, so the two compare on equal terms.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> info = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        >>> round(info.perturbation_norm, 6)
        0.05
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        *,
        model: nn.Module | None = None,
        update_bn_on_perturbed: bool = False,
        max_grad_norm: float | None = None,
        on_nonfinite: str = "raise",
        **base_kwargs: Any,
    ) -> None:
        ascent = AdaptiveGradientAscent(eta=eta) if adaptive else GradientAscent()
        super().__init__(
            params,
            base_optimizer,
            ascent,
            dict(rho=rho),
            model=model,
            update_bn_on_perturbed=update_bn_on_perturbed,
            max_grad_norm=max_grad_norm,
            on_nonfinite=on_nonfinite,
            **base_kwargs,
        )
        self.adaptive = adaptive


class ASAM(SAM):
    """Adaptive SAM: :class:`SAM` with ``adaptive=True``; its radius is usually larger (0.5)."""

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.5,
        eta: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **kwargs)
