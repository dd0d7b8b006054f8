"""``torchsage.preset``: the named SAGE configurations, their values and their contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchsage


def test_names_and_unknown_name():
    assert set(torchsage.PRESETS) == {"authors-dg", "authors-mtl", "authors-mtl-cityscapes"}
    with pytest.raises(ValueError, match="authors-dg, authors-mtl, authors-mtl-cityscapes"):
        torchsage.preset("authors")
    with pytest.raises(ValueError, match="unknown preset"):
        torchsage.preset(None)


def test_authors_dg_values():
    kw = torchsage.preset("authors-dg")
    expected = dict(
        base_optimizer=torch.optim.SGD,
        lr=2e-3,
        momentum=0.9,
        weight_decay=5e-4,
        rho=0.01,
        rho_scaling="weight",
        disagreement="cosine",
        gamma=1.0,
        ns_steps=5,
        ns_coefficients="muon",
        ns_dtype=torch.float32,
        update_bn_on_perturbed=True,
    )
    assert {k: kw[k] for k in expected} == expected


@pytest.mark.parametrize(("name", "rho"), [("authors-mtl", 5e-4), ("authors-mtl-cityscapes", 3e-3)])
def test_authors_mtl_values(name, rho):
    kw = torchsage.preset(name)
    expected = dict(
        base_optimizer=torch.optim.Adam,
        lr=1e-4,
        rho=rho,
        rho_scaling="weight",
        disagreement="normalized_std",
        disagreement_scope="all",
        max_disagreement=None,
        gamma=1e-4,
        ns_dtype=torch.bfloat16,
    )
    assert {k: kw[k] for k in expected} == expected


def test_each_call_returns_a_new_dict_and_values_override():
    a = torchsage.preset("authors-dg")
    a["lr"] = 99.0
    assert torchsage.preset("authors-dg")["lr"] == 2e-3
    model = nn.Linear(3, 2)
    opt = torchsage.SAGE(model.parameters(), **{**torchsage.preset("authors-dg"), "lr": 1e-3})
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["rho"]) == (1e-3, 0.9, 5e-4, 0.01)
    assert opt.measure == "cosine" and opt.ascent.scaling == "weight"


def test_mtl_presets_build_with_a_solver_and_say_so_without():
    model = nn.Linear(3, 2)
    opt = torchsage.SAGE(model.parameters(), **torchsage.preset("authors-mtl"), solver="mean")
    assert opt.disagreement_scope == "all" and isinstance(opt.base_optimizer, torch.optim.Adam)
    with pytest.raises(ValueError, match="needs a solver"):
        torchsage.SAGE(model.parameters(), **torchsage.preset("authors-mtl"))


def test_authors_dg_updates_batchnorm_on_both_passes_even_with_model():
    """Two forward passes per step in train mode: the BatchNorm counter moves by 2 per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    bn = model[1]
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]

    def closure():
        return [nn.functional.cross_entropy(model(x), y) for x, y in data]

    opt = torchsage.SAGE(model.parameters(), **torchsage.preset("authors-dg"), model=model)
    before = int(bn.num_batches_tracked)
    opt.step(closure)
    assert int(bn.num_batches_tracked) - before == 2 * len(data)
    # The library's default with model= freezes them on the perturbed pass: one update per forward.
    frozen = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    before = int(bn.num_batches_tracked)
    frozen.step(closure)
    assert int(bn.num_batches_tracked) - before == len(data)
