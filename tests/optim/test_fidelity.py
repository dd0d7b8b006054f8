"""Each preset's step against the authors' equations, implemented here independently.

DG (``"authors-dg"``): one merged batch from all domains (BatchNorm sees it whole, in train mode on
both passes); the clean mean gradient is the per-domain gradients weighted by ``n_k / N``; every
matrix moves by ``rho * ||W||_F * polar(G)``, ``polar`` being 5 steps of Muon's quintic after
dividing ``G`` (reshaped ``(out, -1)``) by ``||G||_F + 1e-7``, every vector by ``rho g / ||g||``;
``D = 1 - mean pairwise cosine`` of the flattened per-domain gradients; the gradient of the merged
batch's cross-entropy at ``w + e``, plus Gaussian noise of std ``gamma D``, goes to SGD with
momentum and weight decay.

MTL (``"authors-mtl"``): the same ascent on the mean task gradient; ``D = normalized_std`` over
every parameter, each task's gradient zero on the other task's head; the descent is linear
scalarization as the SUM of the perturbed task losses plus noise ``gamma D``, stepped by Adam.

Precision and tolerance. Both sides run in float64 (``ns_dtype=torch.float64`` replaces the
presets' float32 / bfloat16 iteration: those dtypes only round the same iteration), and both draw
the noise from a ``torch.Generator`` seeded with ``seed``, one ``randn`` over the parameters in
order. The library divides by ``||G||_F`` exactly, not by ``||G||_F + 1e-7``: the test compares it
with the reference without the 1e-7 to float64 rounding (rtol 1e-10: three steps of about a
hundred float64 operations per coordinate, each rounding at 1e-16, amplified at most ~500-fold by
five quintic steps), and bounds separately how far the 1e-7 moves the authors' own trajectory.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import torchsage
from authors_reference import F64, ascent, authors_dg_step, flat, noise_like

STEPS, SEED = 3, 5


# -- domain generalization ----------------------------------------------------------------------


def dg_problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()  # no conv bias: BatchNorm makes its gradient zero up to rounding, and g / ||g|| of
    # rounding noise is a rounding-dependent unit vector (in the authors' rule as here)
    sizes = [5, 9, 4]  # unequal shares of one batch of 18
    xs = [torch.randn(n, 1, 8, 8, dtype=F64) for n in sizes]
    ys = [torch.randint(0, 3, (n,)) for n in sizes]
    return model, sizes, xs, ys


def dg_reference(ns_eps, gamma):
    model, sizes, xs, ys = dg_problem()
    x, y = torch.cat(xs), torch.cat(ys)
    gen = torch.Generator().manual_seed(SEED)
    buffers = [None] * len(list(model.parameters()))
    for _ in range(STEPS):
        authors_dg_step(model, x, y, sizes, gen, buffers, ns_eps, gamma)
    return model


def dg_library(gamma):
    model, sizes, xs, ys = dg_problem()
    x, y = torch.cat(xs), torch.cat(ys)
    cuts = list(itertools.accumulate([0, *sizes]))

    def closure():  # one forward of the merged batch, split into the domains' losses
        out = model(x)
        return [nn.functional.cross_entropy(out[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]

    kwargs = {**torchsage.preset("authors-dg"), "ns_dtype": F64, "gamma": gamma, "seed": SEED}
    opt = torchsage.SAGE(model.parameters(), **kwargs, model=model)
    for _ in range(STEPS):
        opt.step(closure, weights=sizes)
    return model


def assert_models_close(a, b, rtol):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-2, msg=name)
        else:
            assert torch.equal(p, q), name  # BatchNorm's counter: two forwards per step


def relative_distance(a, b):
    pa = flat([p.detach() for p in a.parameters()])
    pb = flat([p.detach() for p in b.parameters()])
    return float((pa - pb).norm() / pa.norm())


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_authors_dg_step_is_the_authors_equations(gamma):
    library = dg_library(gamma)
    reference = dg_reference(ns_eps=0.0, gamma=gamma)
    assert_models_close(library, reference, rtol=1e-10)
    assert int(library[1].num_batches_tracked) == 2 * STEPS
    # The authors' 1e-7 in the Newton-Schulz normalisation moves their own trajectory by less
    # than 1e-6 relative on this problem (gradient norms near 1e-1..1): immaterial.
    assert relative_distance(dg_reference(ns_eps=1e-7, gamma=gamma), reference) < 1e-6


# -- multi-task learning ------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 2)})

    def forward(self, x):
        z = self.trunk(x)
        return {k: h(z) for k, h in self.heads.items()}


def mtl_problem():
    torch.manual_seed(1)
    model = TwoHeads().double()
    x, ya, yb = torch.randn(10, 6, dtype=F64), torch.randn(10, 3, dtype=F64), torch.randn(10, 2, dtype=F64)

    def closure():
        out = model(x)
        return {"a": nn.functional.mse_loss(out["a"], ya), "b": nn.functional.l1_loss(out["b"], yb)}

    return model, closure


def mtl_reference(ns_eps):
    model, closure = mtl_problem()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(SEED)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, STEPS + 1):
        losses = closure()
        rows = []
        for loss in losses.values():  # zero where a task does not reach (the other head)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            rows.append([torch.zeros_like(p) if x is None else x for x, p in zip(grads, params)])
        g = [(a + b) / 2 for a, b in zip(*rows)]
        mean = flat(g)
        variance = sum(float((flat(r) - mean).square().sum()) for r in rows) / len(rows)
        D = math.sqrt(variance) / float(mean.norm())
        e = ascent(params, g, 5e-4, ns_eps)
        with torch.no_grad():
            for p, d in zip(params, e):
                p.add_(d)
        perturbed = closure()
        gp = torch.autograd.grad(sum(perturbed.values()), params)  # LS: the sum of the task losses
        with torch.no_grad():
            for p, d in zip(params, e):
                p.sub_(d)
            for i, (p, d, z) in enumerate(zip(params, gp, noise_like(params, gen, 1e-4 * D))):
                d = d + z
                m[i] = 0.9 * m[i] + 0.1 * d
                v[i] = 0.999 * v[i] + 0.001 * d * d
                denom = (v[i] / (1 - 0.999**t)).sqrt() + 1e-8
                p.sub_(1e-4 / (1 - 0.9**t) * m[i] / denom)
    return model


def test_authors_mtl_step_is_the_authors_equations():
    pytest.importorskip("torchjd")
    from torchsage.mtl.solvers import make_solver

    model, closure = mtl_problem()
    kwargs = {**torchsage.preset("authors-mtl"), "ns_dtype": F64, "seed": SEED}
    opt = torchsage.SAGE(model.parameters(), **kwargs, solver=make_solver("ls", 2, reduction="sum"))
    for _ in range(STEPS):
        info = opt.step(closure)
    assert info.noise_std > 0
    reference = mtl_reference(ns_eps=0.0)
    # Adam divides by sqrt(v) + 1e-8 with v ~ d^2: relative rounding of the update stays ~1e-15.
    assert_models_close(model, reference, rtol=1e-10)
    assert relative_distance(mtl_reference(ns_eps=1e-7), reference) < 1e-6
