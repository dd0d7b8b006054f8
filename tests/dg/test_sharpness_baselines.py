"""The harness's ASAM and GSAM are their authors' definitions.

Each is held twice: against the library optimizer in its documented authors' mode, stepped on a
copy of the same network (the same arithmetic, so bit for bit), and against the authors' equations
written out here in float64 (ASAM: ``T = |w| + eta`` on the parameters whose name contains
"weight"; GSAM: the radius linear in the learning rate, the descent ``g_p - alpha g_orth``), with
torch's Adam as the base optimizer of both. The library and the reference differ in summation order
and in the library's 1e-12 added to the ascent norm, a relative 1e-12 at norms of order 1, and
Adam's first steps move each weight by about ``lr`` whatever the gradient's size, so the weights
agree to ~1e-15; 1e-10 leaves room without hiding a wrong term (a wrong radius or rule moves them
by 4e-5 or more, checked below).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import torchsage
from torchsage.dg.algorithms import ALGORITHMS, gsam_lr_min
from torchsage.dg.hparams import default_hparams, parse_hparams, random_hparams
from torchsage.dg.train import _ScheduledLR, lr_factor

LR, STEPS = 1e-3, 5
TOL = dict(rtol=1e-10, atol=1e-10)


def build(name, **overrides):
    hparams = default_hparams(name, "RotatedDigits") | {"cnn_width": 8, "lr": LR} | overrides
    return ALGORITHMS[name]((1, 6, 6), 3, 3, hparams).double()


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
        for _ in range(3)
    ]


def closure_of(network, minibatches):
    return lambda: [F.cross_entropy(network(x), y) for x, y in minibatches]


def train_harness(algorithm, schedule="none"):
    with _ScheduledLR() as scheduled:
        for t in range(STEPS):
            scheduled.factor = lr_factor(schedule, t, STEPS)
            algorithm.update(batches(t), t)
    return [p.detach() for p in algorithm.network.parameters()]


def lr_at(schedule, t):
    """The learning rate of step ``t``, written out: constant; x0.1 from 80% of the steps on; cosine."""
    if schedule == "step":
        return LR * (0.1 if t >= 4 else 1.0)
    if schedule == "cosine":
        return LR * 0.5 * (1 + math.cos(math.pi * t / STEPS))
    return LR


def mean_loss_grad(network, minibatches, shift=None):
    params = list(network.parameters())
    with torch.no_grad():
        for p, e in zip(params, shift or []):
            p.add_(e)
    loss = torch.stack([F.cross_entropy(network(x), y) for x, y in minibatches]).mean()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, e in zip(params, shift or []):
            p.sub_(e)
    return [g.detach() for g in grads]


def adam_step(adam, params, grads, lr):
    for group in adam.param_groups:
        group["lr"] = lr
    for p, g in zip(params, grads):
        p.grad = g.clone()
    adam.step()


def dot(a, b):
    return sum(float((x * y).sum()) for x, y in zip(a, b))


def asam_reference(network, rho, eta, scaled):
    """The ASAM authors' step: ``T = |w| + eta`` where the name contains "weight" (every
    parameter with ``scaled="all"``), ``e = rho T^2 g / ||T g||``, descent on the gradient at w + e."""
    names = [n for n, _ in network.named_parameters()]
    params = list(network.parameters())
    adam = torch.optim.Adam(params, lr=LR)
    for t in range(STEPS):
        data = batches(t)
        g = mean_loss_grad(network, data)
        T = [
            p.detach().abs() + eta if scaled == "all" or "weight" in n else torch.ones_like(p)
            for n, p in zip(names, params)
        ]
        norm = math.sqrt(sum(float((s * x).square().sum()) for s, x in zip(T, g)))
        e = [rho * s * s * x / norm for s, x in zip(T, g)]
        adam_step(adam, params, mean_loss_grad(network, data, e), LR)
    return [p.detach() for p in params]


def gsam_reference(network, schedule, rho_max, rho_min, alpha, adaptive):
    """The GSAM authors' step: ``rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) /
    (lr_max - lr_min)`` with lr_min the schedule's lowest learning rate (fixed at rho_max without
    rho_min), ``e = rho_t g / ||g||`` (adaptive: ``rho_t w^2 g / ||w g||``), descent
    ``g_p - alpha (g - <g, g_p> / ||g_p||^2 g_p)``."""
    params = list(network.parameters())
    adam = torch.optim.Adam(params, lr=LR)
    lr_min = {"step": 0.1 * LR, "cosine": 0.0, "none": 0.0}[schedule]
    for t in range(STEPS):
        data, lr = batches(t), lr_at(schedule, t)
        rho = rho_max if rho_min is None else rho_min + (rho_max - rho_min) * (lr - lr_min) / (LR - lr_min)
        g = mean_loss_grad(network, data)
        w = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
        norm = math.sqrt(sum(float((s * x).square().sum()) for s, x in zip(w, g)))
        gp = mean_loss_grad(network, data, [rho * s * s * x / norm for s, x in zip(w, g)])
        c = dot(g, gp) / dot(gp, gp)
        adam_step(adam, params, [b - alpha * (a - c * b) for a, b in zip(g, gp)], lr)
    return [p.detach() for p in params]


def test_defaults_are_the_authors_and_their_names():
    asam = default_hparams("ASAM", "PACS")
    assert (asam["rho"], asam["eta"], asam["scaled"]) == (0.5, 0.01, "weights")  # SamsungLabs/ASAM
    gsam = default_hparams("GSAM", "PACS")
    # the GSAM paper's ResNet values (its Table 4), named as in its code
    assert (gsam["rho_max"], gsam["rho_min"], gsam["alpha"], gsam["adaptive"]) == (0.04, 0.02, 0.01, False)
    renamed = r"hyperparameter\(s\) rho for GSAM on PACS; known:.*rho_max, rho_min"
    with pytest.raises(ValueError, match=renamed):
        parse_hparams('{"rho": 0.05}', "GSAM", "PACS")
    for seed in range(1, 30):  # the search never draws a radius that grows as the lr falls
        h = random_hparams("GSAM", "PACS", seed)
        assert 0 <= h["rho_min"] <= h["rho_max"]


@pytest.mark.parametrize("overrides", [{}, {"scaled": "all", "eta": 0.0}])
def test_harness_asam_is_the_library_authors_mode_and_their_equations(overrides):
    algorithm = build("ASAM", **overrides)
    twin = copy.deepcopy(algorithm.network)
    reference = copy.deepcopy(algorithm.network)
    hp = algorithm.hparams
    # the library's documented authors' mode (docs/usage.md): ASAM(..., scaled="weights", model=model)
    library = torchsage.ASAM(
        twin.parameters(), torch.optim.Adam, rho=0.5, eta=hp["eta"], scaled=hp["scaled"], model=twin,
        lr=LR, weight_decay=0.0,
    )  # fmt: skip
    assert type(algorithm.optimizer) is torchsage.ASAM
    for t in range(STEPS):
        library.step(closure_of(twin, batches(t)))
    trained = train_harness(algorithm)
    for p, q in zip(trained, twin.parameters()):
        assert torch.equal(p, q.detach())
    expected = asam_reference(reference, 0.5, hp["eta"], hp["scaled"])
    for p, q in zip(trained, expected):
        torch.testing.assert_close(p, q, **TOL)


def test_harness_asam_rule_is_not_the_scale_everything_rule():
    """The reference tells the two rules apart by far more than its tolerance."""
    network = build("ASAM").network
    names = [n for n, _ in network.named_parameters()]
    assert any("weight" not in n for n in names) and any("weight" in n for n in names)
    a = asam_reference(copy.deepcopy(network), 0.5, 0.01, "weights")
    b = asam_reference(copy.deepcopy(network), 0.5, 0.01, "all")
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) > 1e-6


GSAM_CASES = [
    ("step", {}),  # the radius reaches rho_min when the learning rate drops to 0.1 lr
    ("cosine", {}),
    ("cosine", {"adaptive": True}),
    ("cosine", {"rho_min": None}),  # the fixed-radius variant
    ("none", {}),  # a constant learning rate keeps the radius at rho_max
]


@pytest.mark.parametrize(("schedule", "overrides"), GSAM_CASES)
def test_harness_gsam_is_the_library_authors_mode_and_their_equations(schedule, overrides):
    algorithm = build("GSAM", lr_schedule=schedule, **overrides)
    twin = copy.deepcopy(algorithm.network)
    reference = copy.deepcopy(algorithm.network)
    hp = algorithm.hparams
    # the library's documented authors' mode (docs/usage.md): GSAM(..., rho_min=r) with lr_min
    options = {} if hp["rho_min"] is None else dict(rho_min=hp["rho_min"], lr_min=gsam_lr_min(hp))
    if hp["adaptive"]:
        options.update(adaptive=True, eta=0.0)
    library = torchsage.GSAM(
        twin.parameters(), torch.optim.Adam, rho=hp["rho_max"], alpha=hp["alpha"], model=twin, lr=LR,
        weight_decay=0.0, **options,
    )  # fmt: skip
    assert type(algorithm.optimizer) is torchsage.GSAM
    radii = []
    for t in range(STEPS):
        for group in library.param_groups:
            group["lr"] = lr_at(schedule, t)
        info = library.step(closure_of(twin, batches(t)))
        radii.append(info.perturbation_norm)
    trained = train_harness(algorithm, schedule)
    for p, q in zip(trained, twin.parameters()):
        assert torch.equal(p, q.detach())
    expected = gsam_reference(reference, schedule, hp["rho_max"], hp["rho_min"], hp["alpha"], hp["adaptive"])
    for p, q in zip(trained, expected):
        torch.testing.assert_close(p, q, **TOL)
    if not hp["adaptive"]:  # SAM's ascent: the perturbation's norm is the radius
        lr_min = {"step": 0.1 * LR, "cosine": 0.0, "none": 0.0}[schedule]
        for t, radius in enumerate(radii):
            share = (lr_at(schedule, t) - lr_min) / (LR - lr_min)
            rho = 0.04 if hp["rho_min"] is None else 0.02 + 0.02 * share
            assert radius == pytest.approx(rho, rel=1e-9)


def test_harness_gsam_radius_matters_and_bad_rho_min_is_refused():
    network = build("GSAM").network
    tied = gsam_reference(copy.deepcopy(network), "step", 0.04, 0.02, 0.01, False)
    fixed = gsam_reference(copy.deepcopy(network), "step", 0.04, None, 0.01, False)
    assert max(float((x - y).abs().max()) for x, y in zip(tied, fixed)) > 1e-6
    with pytest.raises(ValueError, match=r"rho_min \(0.1\) must lie in \[0, rho_max \(0.04\)\]"):
        build("GSAM", rho_min=0.1)
