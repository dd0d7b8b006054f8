"""``disagreement_scope`` with a solver, against a brute-force computation written here.

Two tasks share a trunk and own one head each. "all": every parameter, a task's gradient zero on
the other task's head; "shared": the trunk only. The brute force differentiates each task loss
with respect to every parameter (``allow_unused`` gives the zero rows) and applies the measure's
definition in float64; the streaming statistics agree with it to about 1e-15 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from _two_heads import two_task_problem

import torchsage


def setup(seed=0):
    return two_task_problem(seed, classify_b=True)


def brute(model, closure, scope, measure):
    params = list(model.trunk.parameters()) if scope == "shared" else list(model.parameters())
    losses = closure()
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])
        )
    mean = sum(rows) / len(rows)
    if measure == "cosine":
        a, b = rows
        return 1.0 - float(a @ b / (a.norm() * b.norm()))
    var = sum(float((r - mean).square().sum()) for r in rows) / len(rows)
    return math.sqrt(var) / (float(mean.norm()) + 1e-12)  # the measure's documented eps


@pytest.mark.parametrize("measure", ["normalized_std", "cosine"])
@pytest.mark.parametrize("scope", ["all", "shared"])
def test_disagreement_covers_the_scope(scope, measure):
    model, closure = setup()
    expected = brute(model, closure, scope, measure)
    opt = torchsage.SAGE(
        model.parameters(),
        torch.optim.SGD,
        rho=0.01,
        gamma=0.1,
        lr=0.01,
        disagreement=measure,
        solver="mean",
        disagreement_scope=scope,
    )
    info = opt.step(closure)
    assert info.disagreement == pytest.approx(expected, rel=1e-12)
    assert info.noise_std == pytest.approx(0.1 * expected, rel=1e-12)


def test_scopes_differ_and_shared_is_the_default_with_a_solver():
    model, closure = setup(1)
    values = {}
    for scope in ("all", "shared", None):
        m, c = setup(1)
        opt = torchsage.SAGE(
            m.parameters(), torch.optim.SGD, rho=0.01, lr=0.0, solver="mean", disagreement_scope=scope
        )
        values[scope] = opt.step(c).disagreement
    assert values[None] == values["shared"]
    assert abs(values["all"] - values["shared"]) > 1e-8 * values["shared"]  # float64 noise: 1e-15
    # Without a solver the statistics cover every parameter: the "all" number.
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.01, lr=0.0)
    assert opt.step(lambda: list(closure().values())).disagreement == pytest.approx(values["all"], rel=1e-12)


def test_scope_needs_a_solver_and_a_known_value():
    model, _ = setup()
    with pytest.raises(ValueError, match="needs a solver"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, disagreement_scope="all")
    with pytest.raises(ValueError, match="'all' or 'shared'"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, solver="mean", disagreement_scope="heads")
