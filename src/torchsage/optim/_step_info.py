"""What one step measured (:class:`StepInfo`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """What one step measured. Values are Python floats (``nan`` where not measured).

    Attributes:
        loss: mean loss at the clean weights.
        losses: per-distribution losses at the clean weights.
        perturbed_loss: mean loss at the perturbed weights (``nan`` when there was no second pass).
        disagreement: disagreement of the per-distribution gradients (after clipping).
        noise_std: standard deviation of the descent noise (first param group).
        perturbation_norm: L2 norm of the whole perturbation.
        grad_norm: L2 norm of the descent gradient before clipping and noise.
        skipped: True when a non-finite value made the step a no-op (``on_nonfinite="skip"``).
        names: names of the distributions, in order.
    """

    loss: float
    losses: tuple[float, ...]
    perturbed_loss: float = math.nan
    disagreement: float = math.nan
    noise_std: float = math.nan
    perturbation_norm: float = 0.0
    grad_norm: float = math.nan
    skipped: bool = False
    names: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """Flat dict for logging."""
        return asdict(self)
