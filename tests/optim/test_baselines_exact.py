"""ASAM's two scale operators and GSAM's learning-rate-tied radius, step for step against an
independent implementation of their equations written here.

Everything runs in float64 for five steps of SGD with momentum and weight decay; the library and
the reference differ only in summation order and in the library's 1e-12 added to the ascent norm
(relative effect 1e-12 at norms near 1), so the parameters agree to about 1e-13; 1e-9 leaves a
wide margin.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchsage

F64 = torch.float64
STEPS, LR, MOMENTUM, WD = 5, 0.1, 0.9, 5e-4


def problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.GroupNorm(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = [(torch.randn(12, 5, dtype=F64), torch.randint(0, 3, (12,))) for _ in range(2)]

    def closure():
        return [nn.functional.cross_entropy(model(x), y) for x, y in data]

    return model, closure


def grads_at(model, closure, shift=None):
    """Gradient of the mean loss at w (+ shift)."""
    params = list(model.parameters())
    with torch.no_grad():
        if shift is not None:
            for p, e in zip(params, shift):
                p.add_(e)
    loss = torch.stack(closure()).mean()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        if shift is not None:
            for p, e in zip(params, shift):
                p.sub_(e)
    return list(grads)


def sgd(params, grads, buffers, lr):
    """torch.optim.SGD's update written out: d = g + wd w; b = m b + d; w -= lr b."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + WD * p
            buffers[i] = d.clone() if buffers[i] is None else MOMENTUM * buffers[i] + d
            p.sub_(lr * buffers[i])


def run_asam_reference(model, closure, rho, eta, scaled_names):
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    buffers = [None] * len(params)
    for _ in range(STEPS):
        g = grads_at(model, closure)
        T = [
            p.detach().abs() + eta if n in scaled_names else torch.ones_like(p) for n, p in zip(names, params)
        ]
        norm = math.sqrt(sum(float((t * x).square().sum()) for t, x in zip(T, g)))
        e = [rho * t * t * x / norm for t, x in zip(T, g)]
        sgd(params, grads_at(model, closure, e), buffers, LR)


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        (dict(eta=0.01, scaled="weights"), "weights"),  # the ASAM authors' code
        (dict(eta=0.0), "all"),  # the SAM package's adaptive mode: T = |w|
        (dict(eta=0.01), "all"),
    ],
)
def test_asam_matches_its_equations(kwargs, rule):
    model, closure = problem()
    ref, ref_closure = problem()
    names = {n for n, _ in ref.named_parameters() if rule == "all" or "weight" in n}
    assert rule == "all" or names == {"0.weight", "1.weight", "3.weight"}  # GroupNorm's weight too
    opt = torchsage.ASAM(
        model.parameters(), torch.optim.SGD, rho=0.5, model=model, update_bn_on_perturbed=True,
        lr=LR, momentum=MOMENTUM, weight_decay=WD, **kwargs,
    )  # fmt: skip
    for _ in range(STEPS):
        opt.step(closure)
    run_asam_reference(ref, ref_closure, 0.5, kwargs["eta"], names)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


class Recurrent(nn.Module):
    """A GRU over a short sequence and a linear head on its last output."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def recurrent_problem():
    torch.manual_seed(3)
    model = Recurrent().double()
    data = [(torch.randn(10, 4, 3, dtype=F64), torch.randint(0, 3, (10,))) for _ in range(2)]

    def closure():
        return [nn.functional.cross_entropy(model(x), y) for x, y in data]

    return model, closure


def test_asam_weights_rule_scales_recurrent_weights_as_the_authors_substring_test():
    """The ASAM authors scale every parameter whose name contains "weight": a GRU's
    ``weight_ih_l0`` and ``weight_hh_l0`` too, not only names ending in it."""
    model, closure = recurrent_problem()
    opt = torchsage.ASAM(
        model.parameters(), torch.optim.SGD, rho=0.5, scaled="weights", model=model,
        lr=LR, momentum=MOMENTUM, weight_decay=WD,
    )  # fmt: skip
    for _ in range(STEPS):
        opt.step(closure)
    authors = {"gru.weight_ih_l0", "gru.weight_hh_l0", "head.weight"}
    suffix_only = {"head.weight"}  # what a test of the name's ending would scale
    results = {}
    for key, names in (("authors", authors), ("suffix", suffix_only)):
        ref, ref_closure = recurrent_problem()
        run_asam_reference(ref, ref_closure, 0.5, 0.01, names)
        results[key] = list(ref.parameters())
    for p, q in zip(model.parameters(), results["authors"]):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # the two rules part by far more than the tolerance, so the check above can tell them apart
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(results["authors"], results["suffix"]))
    assert gap > 1e-6


def test_asam_weights_rule_differs_from_all_and_needs_the_model():
    a, closure = problem()
    b, closure_b = problem()
    opts = [
        torchsage.ASAM(m.parameters(), torch.optim.SGD, rho=0.5, model=m, lr=LR, **kw)
        for m, kw in ((a, dict(scaled="weights")), (b, {}))
    ]
    opts[0].step(closure)
    opts[1].step(closure_b)
    assert not torch.allclose(a[0].bias, b[0].bias, rtol=1e-6)
    with pytest.raises(ValueError, match="pass model=model"):
        torchsage.ASAM(a.parameters(), torch.optim.SGD, scaled="weights", lr=LR)
    with pytest.raises(ValueError, match="'all' or 'weights'"):
        torchsage.ASAM(a.parameters(), torch.optim.SGD, scaled="biases", model=a, lr=LR)


def test_gsam_radius_follows_the_learning_rate():
    rho_max, rho_min, alpha, lr_min = 0.1, 0.01, 0.3, 0.0
    lrs = [LR * 0.5 * (1 + math.cos(math.pi * t / STEPS)) for t in range(STEPS)]  # cosine to 0
    model, closure = problem(1)
    ref, ref_closure = problem(1)
    opt = torchsage.GSAM(
        model.parameters(), torch.optim.SGD, rho=rho_max, alpha=alpha, rho_min=rho_min,
        lr=LR, momentum=MOMENTUM, weight_decay=WD,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lrs[min(t, STEPS - 1)] / LR)
    norms = []
    for _ in range(STEPS):
        norms.append(opt.step(closure).perturbation_norm)
        sched.step()

    params = list(ref.parameters())
    buffers = [None] * len(params)
    for t in range(STEPS):
        rho = rho_min + (rho_max - rho_min) * (lrs[t] - lr_min) / (LR - lr_min)
        assert norms[t] == pytest.approx(rho, rel=1e-12)
        g = grads_at(ref, ref_closure)
        norm = math.sqrt(sum(float(x.square().sum()) for x in g))
        gp = grads_at(ref, ref_closure, [rho * x / norm for x in g])
        # GSAM's descent: g_p - alpha * (g - <g, g_p> / ||g_p||^2 g_p)
        dot = sum(float((a * b).sum()) for a, b in zip(g, gp))
        gp2 = sum(float(b.square().sum()) for b in gp)
        d = [b - alpha * (a - dot / gp2 * b) for a, b in zip(g, gp)]
        sgd(params, d, buffers, lrs[t])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_gsam_without_rho_min_keeps_rho_and_bad_options_are_refused():
    model, closure = problem()
    opt = torchsage.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.1)
    for _ in range(2):
        assert opt.step(closure).perturbation_norm == pytest.approx(0.05, rel=1e-12)
        sched.step()
    with pytest.raises(ValueError, match="rho_min must be a finite number"):
        torchsage.GSAM(model.parameters(), torch.optim.SGD, rho_min=-1.0, lr=LR)
    with pytest.raises(ValueError, match="pass rho_min too"):
        torchsage.GSAM(model.parameters(), torch.optim.SGD, lr_max=0.1, lr=LR)
    with pytest.raises(ValueError, match="must exceed lr_min"):
        torchsage.GSAM(model.parameters(), torch.optim.SGD, rho_min=0.01, lr_min=0.5, lr=LR)
    with pytest.raises(ValueError, match=r"rho_min \(0.1\) exceeds rho \(0.05\)"):
        torchsage.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, rho_min=0.1, lr=LR)
