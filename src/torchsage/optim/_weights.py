"""Per-distribution weights of one step (``step(closure, weights=...)``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchsage.disagreement import check_weights

__all__ = ["check_count", "mean_loss", "step_weights"]


def step_weights(weights: Any, solver: Any, parallel: Any) -> list[float] | None:
    """The step's weights normalised to sum 1, or None (equal weights); ValueError where they
    cannot apply."""
    if weights is None:
        return None
    if solver is not None:
        raise ValueError(
            "weights= cannot be combined with a solver: the solver weighs the tasks (use a "
            "torchjd scalarizer such as torchjd.scalarization.Constant for fixed task weights)"
        )
    if parallel is not None and parallel.layout == "domains":
        raise ValueError(
            "weights= is not supported with layout='domains' (each process holds only some of the "
            "distributions): use layout='shards'"
        )
    return check_weights(weights)


def check_count(weights: list[float], count: int, partial: bool = False) -> None:
    """The closure returned ``count`` losses (so far, with ``partial``) for these weights."""
    if count > len(weights) or (not partial and count != len(weights)):
        raise ValueError(
            f"got {len(weights)} weights but the closure returned {count}{' or more' if partial else ''} "
            "losses: pass one weight per distribution"
        )


def mean_loss(losses: Tensor, weights: list[float] | None) -> float:
    """The (weighted) mean of the reported losses."""
    if weights is None:
        return float(losses.mean())
    return float((losses.double() * torch.tensor(weights, dtype=torch.float64, device=losses.device)).sum())
