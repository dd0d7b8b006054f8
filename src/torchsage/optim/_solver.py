"""Multi-task solvers inside the sharpness-aware step.

In multi-task learning the distributions are tasks that share some parameters (a trunk) and own
others (their heads). A *solver* turns the task losses into a descent direction: a torchjd
aggregator maps the Jacobian of the task losses with respect to the shared parameters (one row per
task) to one vector; a torchjd scalarizer maps the vector of task losses to one scalar whose
gradient is the direction. This module finds which parameters are shared, computes that Jacobian
with one batched backward pass, and applies the solver, so the optimizer can descend with any of
them at the perturbed weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TaskPass", "check_solver", "solver_kind", "task_pass"]


def solver_kind(solver: Any) -> str:
    """``"aggregator"``, ``"scalarizer"`` or ``"mean"``; ValueError for anything else.

    Recognised without importing torchjd: an aggregator maps a matrix to a vector, a scalarizer a
    vector to a scalar, and torchjd marks both by their base classes.
    """
    if isinstance(solver, str):
        if solver == "mean":
            return "mean"
        raise ValueError(f"solver must be a torchjd aggregator or scalarizer, 'mean' or None; got {solver!r}")
    for cls in type(solver).__mro__:
        module = cls.__module__ or ""
        if module.startswith("torchjd.aggregation") and cls.__name__ == "Aggregator":
            return "aggregator"
        if module.startswith("torchjd.scalarization") and cls.__name__ == "Scalarizer":
            return "scalarizer"
    raise ValueError(
        "solver must be a torchjd aggregator (torchjd.aggregation.UPGrad(), ...), a torchjd "
        f"scalarizer (torchjd.scalarization.UW(n_tasks), ...), 'mean' or None; got {solver!r}"
    )


def check_solver(solver: Any) -> Any:
    """Validates ``solver`` and resets its state if it keeps any (NashMTL, DWA, FAMO, ...)."""
    if solver is None:
        return None
    solver_kind(solver)
    reset = getattr(solver, "reset", None)
    if callable(reset):
        reset()
    return solver


def _reached(loss: Tensor, index: dict[int, int]) -> set[int]:
    """Indices (in ``index``, keyed by ``id``) of the leaf tensors ``loss`` depends on.

    Walks the autograd graph from ``loss`` to its gradient accumulators: no arithmetic, so it
    costs far less than a backward pass and is exact (a zero gradient does not fool it).
    """
    found: set[int] = set()
    stack = [loss.grad_fn]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            k = index.get(id(variable))
            if k is not None:
                found.add(k)
        stack.extend(child for child, _ in node.next_functions)
    return found


@dataclass
class TaskPass:
    """One evaluation of the task losses with their gradients.

    Attributes:
        names: task names.
        losses: detached task losses, shape ``(T,)``.
        shared: parameters reached by two or more tasks.
        jacobian: for each shared parameter, the gradients of every task, shape ``(T, *p.shape)``.
        owned: parameters reached by exactly one task, with that task's index and its gradient.
    """

    names: list[str]
    losses: Tensor
    shared: list[Tensor]
    jacobian: list[Tensor]
    owned: list[tuple[Tensor, int, Tensor]]

    def rows(self, k: int) -> list[Tensor]:
        """Task ``k``'s gradient of each shared parameter."""
        return [j[k] for j in self.jacobian]


def _batched_jacobian(losses: Tensor, params: list[Tensor], retain_graph: bool) -> list[Tensor]:
    """Jacobian of the ``(T,)`` losses with respect to ``params`` in one vectorised backward."""
    T = losses.shape[0]
    eye = torch.eye(T, dtype=losses.dtype, device=losses.device)
    try:
        grads = torch.autograd.grad(
            losses,
            params,
            grad_outputs=eye,
            is_grads_batched=True,
            retain_graph=retain_graph,
            allow_unused=True,
        )
    except RuntimeError:
        # Some operators have no batching rule: fall back to one backward per task.
        rows = [
            torch.autograd.grad(losses[k], params, retain_graph=retain_graph or k < T - 1, allow_unused=True)
            for k in range(T)
        ]
        grads = tuple(
            torch.stack([r[i] if r[i] is not None else torch.zeros_like(p) for r in rows])
            for i, p in enumerate(params)
        )
    return [g if g is not None else p.new_zeros((T, *p.shape)) for g, p in zip(grads, params)]


def task_pass(names: list[str], losses: Sequence[Tensor], params: list[Tensor]) -> TaskPass:
    """Differentiates the task losses: a Jacobian for the shared parameters, one gradient per
    task-owned parameter (no zero-filled rows for the heads), nothing for parameters no task uses.
    """
    index = {id(p): i for i, p in enumerate(params)}
    users: list[list[int]] = [[] for _ in params]
    for k, loss in enumerate(losses):
        for i in _reached(loss, index):
            users[i].append(k)
    shared = [p for p, u in zip(params, users) if len(u) >= 2]
    owned_params = [(p, u[0]) for p, u in zip(params, users) if len(u) == 1]
    stacked = torch.stack(list(losses))
    owned: list[tuple[Tensor, int, Tensor]] = []
    if owned_params:
        # Each owned parameter is reached by one loss only: the gradient of the sum is its task's.
        grads = torch.autograd.grad(stacked.sum(), [p for p, _ in owned_params], retain_graph=bool(shared))
        owned = [(p, k, g) for (p, k), g in zip(owned_params, grads)]
    jacobian = _batched_jacobian(stacked, shared, retain_graph=False) if shared else []
    return TaskPass(list(names), stacked.detach(), shared, jacobian, owned)


def _aggregate(aggregator: Any, tp: TaskPass) -> list[Tensor]:
    if not tp.shared:
        return []
    T = tp.losses.shape[0]
    matrix = torch.cat([j.reshape(T, -1) for j in tp.jacobian], dim=1)
    vector = aggregator(matrix)
    if vector.shape != (matrix.shape[1],):
        shape = tuple(vector.shape)
        raise ValueError(f"the aggregator {aggregator!r} returned shape {shape}, expected a vector")
    return [v.view_as(p) for v, p in zip(vector.split([p.numel() for p in tp.shared]), tp.shared)]


def solve(solver: Any, tp: TaskPass, optimized: set[int]) -> None:
    """Writes the solver's descent direction into ``.grad`` of every parameter ``tp`` reached.

    Aggregators: shared parameters get the aggregated Jacobian, each owned parameter its task's
    gradient (as torchjd's ``mtl_backward`` does). Scalarizers and ``"mean"``: every gradient is the
    chain rule of the scalarized loss through the task losses, ``sum_k (ds/dl_k) grad l_k``, which
    equals differentiating the scalarized loss; the scalarizer's own learnable parameters (UW's
    log-variances) receive their gradient too and must be among the optimized ones (``optimized``
    holds their ids).
    """
    kind = solver_kind(solver)
    if kind == "aggregator":
        for p, g in zip(tp.shared, _aggregate(solver, tp)):
            p.grad = g.contiguous()
        for p, _, g in tp.owned:
            p.grad = g
        return
    T = tp.losses.shape[0]
    if kind == "mean":
        weights = torch.full((T,), 1.0 / T, dtype=tp.losses.dtype, device=tp.losses.device)
    else:
        values = tp.losses.clone().requires_grad_(True)
        own = [q for q in solver.parameters() if q.requires_grad] if isinstance(solver, nn.Module) else []
        with torch.enable_grad():
            scalar = solver(values)
            if scalar.numel() != 1:
                shape = tuple(scalar.shape)
                raise ValueError(f"the scalarizer {solver!r} returned shape {shape}, expected a scalar")
            grads = torch.autograd.grad(scalar.reshape(()), [values, *own], allow_unused=True)
        weights = grads[0] if grads[0] is not None else torch.zeros_like(values)
        for q, g in zip(own, grads[1:]):
            if g is None:
                continue
            if id(q) not in optimized:
                raise ValueError(
                    f"the scalarizer {type(solver).__name__} has learnable parameters that the optimizer "
                    "does not update: pass them too, e.g. params=[{'params': model.parameters()}, "
                    "{'params': solver.parameters()}]"
                )
            q.grad = g
    for p, j in zip(tp.shared, tp.jacobian):
        p.grad = torch.tensordot(weights.to(j.dtype), j, dims=1)
    for p, k, g in tp.owned:
        p.grad = g * weights[k].to(g.dtype)
