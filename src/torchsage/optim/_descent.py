"""Where the descent direction comes from: the mean loss, or a multi-task solver.

The optimizer picks one of these strategies when it is built (:func:`make_descent`) and asks it,
in each step, for the clean pass, the perturbed pass and its descent gradient, the direction when
no parameter was perturbed, and what to do after the base optimizer stepped. Both leave the
descent gradient in ``p.grad``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchsage.disagreement import global_norm
from torchsage.optim._closure import Closure, Pass, Passes, _named_losses, frozen_bn_stats
from torchsage.optim._solver import TaskPass, solve

__all__ = ["MeanDescent", "SolverDescent", "make_descent"]


class MeanDescent:
    """Descends on the (weighted) mean of the distributions' losses."""

    def __init__(self, passes: Passes) -> None:
        self.passes = passes

    def clean(
        self,
        closure: Closure,
        params: list[Tensor],
        weights: list[float] | None,
        statistics: bool,
        ascent: bool,
    ) -> Pass:
        """The pass at the clean weights: a task pass when :meth:`tasks_at_clean` says so, else
        streamed when ``statistics`` are needed (``ascent``: some group has a radius, so a perturbed
        pass may follow)."""
        if self.tasks_at_clean(statistics, ascent):
            return self.passes.tasks(closure, params, statistics)
        if statistics:
            return self.passes.streamed(closure, params, weights)
        return self.passes.mean(closure, params, weights)

    def tasks_at_clean(self, statistics: bool, ascent: bool) -> bool:
        """Whether the clean pass differentiates every task's loss (a Jacobian)."""
        return False

    def perturbed(
        self, closure: Closure, params: list[Tensor], weights: list[float] | None
    ) -> tuple[Pass, Tensor]:
        """The pass at the perturbed weights and the global norm of its descent gradient."""
        record = self.passes.mean(closure, params, weights)
        return record, global_norm([p.grad for p in params if p.grad is not None])

    def without_ascent(
        self, closure: Closure, params: list[Tensor], clean: Pass, grad_norm: Tensor
    ) -> tuple[Pass, Tensor]:
        """No parameter was perturbed: the descent gradient is the clean one, already in ``p.grad``."""
        return clean, grad_norm

    def after_step(self, closure: Closure, clean: Tensor, perturbed: Tensor | None) -> None:
        """Runs after the base optimizer's step, given the clean and the perturbed losses."""


class SolverDescent(MeanDescent):
    """Descends along a multi-task solver's direction (see :mod:`torchsage.optim._solver`).

    Args:
        passes: runs the closure.
        solver: a torchjd aggregator or scalarizer, or ``"mean"``.
        update: the losses a self-updating solver (FAMO) sees before the step: ``"clean"`` or
            ``"perturbed"``.
    """

    def __init__(self, passes: Passes, solver: Any, update: str) -> None:
        super().__init__(passes)
        self.solver = solver
        self.update = update

    def tasks_at_clean(self, statistics: bool, ascent: bool) -> bool:
        # The ascent needs only the mean gradient: the task Jacobian is taken when the statistics
        # need it or when the solver will descend from these weights.
        return statistics or not ascent

    def perturbed(
        self, closure: Closure, params: list[Tensor], weights: list[float] | None
    ) -> tuple[Pass, Tensor]:
        record = self.passes.tasks(closure, params, False, mean=False)
        grad_norm = self._solve(record.tasks, params)  # type: ignore[arg-type]
        record.tasks = None  # the Jacobian is not needed any more
        return record, grad_norm

    def without_ascent(
        self, closure: Closure, params: list[Tensor], clean: Pass, grad_norm: Tensor
    ) -> tuple[Pass, Tensor]:
        if clean.tasks is None:  # rho > 0 only in groups without gradients: no perturbed pass after all
            with self.passes.communication(clean=True):
                clean = self.passes.tasks(closure, params, False, mean=False)
        grad_norm = self._solve(clean.tasks, params)  # type: ignore[arg-type]
        clean.tasks = None
        return clean, grad_norm

    def _solve(self, tp: TaskPass, params: list[Tensor]) -> Tensor:
        """Replaces ``p.grad`` by the solver's direction; returns its global norm."""
        for p in params:
            p.grad = None
        solve(self.solver, tp, {id(p) for p in params})
        return global_norm([p.grad for p in params if p.grad is not None])

    def after_step(self, closure: Closure, clean: Tensor, perturbed: Tensor | None) -> None:
        """Solvers that learn from the step's effect (FAMO) see the task losses before the step
        (``update`` says which) and the losses on the same batch after it (one forward,
        BatchNorm left alone)."""
        update = getattr(self.solver, "update", None)
        if not callable(update):
            return
        before = perturbed if self.update == "perturbed" and perturbed is not None else clean
        with torch.no_grad(), frozen_bn_stats(self.passes.model):
            self.solver(before)  # records the losses before the step
            _, after, _ = _named_losses(closure())
            after = torch.stack([x.detach().reshape(()) for x in after])
            if self.passes.parallel is not None:
                after = self.passes.parallel.reduce_losses(after)
        update(after)


def make_descent(passes: Passes, solver: Any, update: str) -> MeanDescent:
    """The strategy for ``solver`` (``None``: the mean loss)."""
    return MeanDescent(passes) if solver is None else SolverDescent(passes, solver, update)
