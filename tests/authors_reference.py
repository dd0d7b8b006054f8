"""The SAGE authors' equations, written independently of torchsage: the reference that the fidelity
tests (tests/optim/test_fidelity.py) and the ResNet-50 step (tests/dg/test_torchvision_backbones.py)
compare the library with. Imported as ``authors_reference``: pytest puts tests/ on the path for its
conftest."""

from __future__ import annotations

import itertools

import torch
from torch import nn

F64 = torch.float64
MUON = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, ns_eps):
    """Muon's 5-step quintic on G reshaped (out, -1), after dividing by ||G||_F + ns_eps."""
    X = G.reshape(G.shape[0], -1)
    X = X / (X.norm() + ns_eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    a, b, c = MUON
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).reshape(G.shape)


def ascent(params, g, rho, ns_eps):
    return [
        rho * p.detach().norm() * newton_schulz(x, ns_eps) if p.ndim >= 2 else rho * x / x.norm()
        for p, x in zip(params, g)
    ]


def noise_like(params, gen, std):
    total = sum(p.numel() for p in params)
    draw = torch.randn(total, generator=gen, dtype=F64) * std
    return [n.view_as(p) for n, p in zip(draw.split([p.numel() for p in params]), params)]


def flat(grads):
    return torch.cat([x.reshape(-1) for x in grads])


def authors_dg_step(model, x, y, sizes, gen, buffers, ns_eps, gamma):
    """One step of the authors' DG optimizer on the merged batch ``x, y`` (domains of ``sizes``
    in order); ``buffers`` holds SGD's momentum per parameter (None before the first step)."""
    params = list(model.parameters())
    cuts = list(itertools.accumulate([0, *sizes]))
    N = sum(sizes)
    out = model(x)  # clean pass: BatchNorm in train mode, running statistics updated
    per_domain = [
        torch.autograd.grad(nn.functional.cross_entropy(out[a:b], y[a:b]), params, retain_graph=True)
        for a, b in itertools.pairwise(cuts)
    ]
    g = [sum(n / N * gk[i] for n, gk in zip(sizes, per_domain)) for i in range(len(params))]
    flats = [flat(gk) for gk in per_domain]
    cos = [float(u @ v / (u.norm() * v.norm())) for u, v in itertools.combinations(flats, 2)]
    D = 1.0 - sum(cos) / len(cos)
    e = ascent(params, g, 0.01, ns_eps)
    with torch.no_grad():
        for p, d in zip(params, e):
            p.add_(d)
    gp = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)  # merged batch
    with torch.no_grad():
        for p, d in zip(params, e):
            p.sub_(d)
        for i, (p, d, z) in enumerate(zip(params, gp, noise_like(params, gen, gamma * D))):
            d = d + z + 5e-4 * p  # noise before SGD: weight decay and momentum see it
            buffers[i] = d if buffers[i] is None else 0.9 * buffers[i] + d
            p.sub_(2e-3 * buffers[i])
