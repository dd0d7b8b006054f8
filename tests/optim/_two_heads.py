"""A float64 trunk with two task heads, shared by the multi-task tests of this folder."""

from __future__ import annotations

import torch
from torch import nn

F64 = torch.float64


class TwoHeads(nn.Module):
    def __init__(self, outputs_b: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, outputs_b)})

    def forward(self, x):
        z = self.trunk(x)
        return {k: h(z) for k, h in self.heads.items()}


def two_task_problem(seed: int, classify_b: bool):
    """(model, closure): task a regresses, task b classifies (3 classes) or regresses (L1).

    A cross-entropy head's gradient has rank below its width (its rows sum to zero), and the polar
    factor of a rank-deficient matrix is not unique: tests of the ascent use ``classify_b=False``.
    """
    torch.manual_seed(seed)
    model = TwoHeads().double()
    x = torch.randn(16, 5, dtype=F64)
    ya = torch.randn(16, 2, dtype=F64)
    yb = torch.randint(0, 3, (16,)) if classify_b else torch.randn(16, 3, dtype=F64)
    loss_b = nn.functional.cross_entropy if classify_b else nn.functional.l1_loss

    def closure():
        out = model(x)
        return {"a": nn.functional.mse_loss(out["a"], ya), "b": loss_b(out["b"], yb)}

    return model, closure
