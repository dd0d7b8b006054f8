"""Per-group ascent directions of SAGE (``"polar"``, ``"gradient"``, ``"none"``), read off exactly.

The quadratic problem of ``test_ascent_exact`` reveals the perturbation ``e`` of one SGD step
(``lr = 1``, no noise): it lands on ``C_bar - e``. Each group's ``e`` is compared with a formula
computed here from a float64 SVD.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_ascent_exact import quadratic_problem, revealed_perturbation, svd_polar

import torchsage
from torchsage.optim import ASCENT_DIRECTIONS

SHAPES = ((5, 7), (4, 3, 2, 2), (6,), (3, 8), (9,))


def expected_perturbation(w0, grads, kinds, rho, scaling):
    directions = []
    for g, kind in zip(grads, kinds):
        if kind == "none":
            directions.append(torch.zeros_like(g))
        elif kind == "polar" and g.ndim >= 2:
            directions.append(svd_polar(g))
        else:
            directions.append(g / g.norm())
    if scaling == "global":
        total = math.sqrt(sum(float(d.square().sum()) for d in directions))
        return [rho * d / total for d in directions]
    if scaling == "layer":
        return [rho * d for d in directions]
    return [rho * (w.norm() if w.ndim >= 2 else 1.0) * d for w, d in zip(w0, directions)]


@pytest.mark.parametrize("scaling", ["global", "layer", "weight"])
def test_each_group_moves_along_its_own_direction(scaling):
    torch.manual_seed(0)
    params, _, mean_targets, closure = quadratic_problem(shapes=SHAPES)
    w0 = [p.detach().clone() for p in params]
    grads = [w - c for w, c in zip(w0, mean_targets)]
    groups = [
        {"params": params[:3]},  # the default: polar
        {"params": params[3:4], "ascent": "gradient"},
        {"params": params[4:], "ascent": "none"},
    ]
    kinds = ["polar"] * 3 + ["gradient", "none"]
    rho = 0.3
    opt = torchsage.SAGE(
        groups, torch.optim.SGD, rho=rho, gamma=0.0, lr=1.0, polar_method="svd", rho_scaling=scaling
    )
    got = revealed_perturbation(opt, params, mean_targets, closure)
    for e, x in zip(got, expected_perturbation(w0, grads, kinds, rho, scaling)):
        torch.testing.assert_close(e, x, rtol=1e-9, atol=1e-10)


def test_the_default_direction_of_every_group_can_be_set_once():
    torch.manual_seed(1)
    params, _, mean_targets, closure = quadratic_problem(shapes=SHAPES)
    w0 = [p.detach().clone() for p in params]
    grads = [w - c for w, c in zip(w0, mean_targets)]
    opt = torchsage.SAGE(params, torch.optim.SGD, rho=0.2, gamma=0.0, lr=1.0, ascent="gradient")
    got = revealed_perturbation(opt, params, mean_targets, closure)
    for e, x in zip(got, expected_perturbation(w0, grads, ["gradient"] * 5, 0.2, "global")):
        torch.testing.assert_close(e, x, rtol=1e-9, atol=1e-10)


def test_a_group_without_ascent_is_neither_moved_nor_iterated(monkeypatch):
    from torchsage import polar

    calls = []
    real = polar.polar_factor
    monkeypatch.setattr(polar, "polar_factor", lambda G, **kw: calls.append(tuple(G.shape)) or real(G, **kw))
    embedding, head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3)
    seen = []

    def closure():
        seen.append(embedding.weight.detach().clone())
        return [head(embedding(torch.tensor([1, 2, 3]))).square().mean()]

    opt = torchsage.SAGE(
        [{"params": embedding.parameters(), "ascent": "none"}, {"params": head.parameters()}],
        torch.optim.SGD,
        gamma=0.0,
        lr=0.0,
    )
    info = opt.step(closure)
    assert torch.equal(seen[0], seen[1])  # the embedding was not perturbed on the second pass
    assert calls == [(3, 8)]  # only the head's matrix was orthogonalised
    assert info.perturbation_norm == pytest.approx(0.05, rel=1e-6)  # the head takes all of rho


def test_unknown_direction_is_refused_with_the_choices():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"unknown ascent direction 'sam'.*'polar', 'gradient', 'none'"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, ascent="sam")
    with pytest.raises(ValueError, match=r"unknown ascent direction 'Polar'"):
        torchsage.SAGE([{"params": model.parameters(), "ascent": "Polar"}], torch.optim.SGD, lr=0.1)
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"unknown ascent direction None"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "ascent": None})
    assert ASCENT_DIRECTIONS == ("polar", "gradient", "none")


def test_direction_is_a_group_option_saved_and_restored_with_the_state():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    groups = [{"params": model[0].parameters(), "ascent": "gradient"}, {"params": model[1].parameters()}]
    opt = torchsage.SAGE(groups, torch.optim.SGD, lr=0.1, seed=0)
    assert [g["ascent"] for g in opt.param_groups] == ["gradient", "polar"]
    state = copy.deepcopy(opt.state_dict())
    assert [g["ascent"] for g in state["param_groups"]] == ["gradient", "polar"]
    other = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, seed=0)  # one group, but two saved
    fresh = torchsage.SAGE(
        [{"params": model[0].parameters()}, {"params": model[1].parameters()}],
        torch.optim.SGD,
        lr=0.1,
        seed=0,
    )
    fresh.load_state_dict(state)
    assert [g["ascent"] for g in fresh.param_groups] == ["gradient", "polar"]
    with pytest.raises(ValueError):
        other.load_state_dict(state)


@pytest.mark.parametrize("name", ["authors-dg", "authors-mtl"])
def test_presets_keep_the_polar_direction_everywhere(name):
    model = torch.nn.Linear(3, 2)
    kw = torchsage.preset(name)
    kw.pop("disagreement_scope", None)
    assert "ascent" not in kw
    opt = torchsage.SAGE(model.parameters(), **kw)
    assert all(g["ascent"] == "polar" for g in opt.param_groups)
