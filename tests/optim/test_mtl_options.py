"""Multi-task options: FAMO updated from the perturbed losses, linear scalarization as a sum, and
SAGEAlign with a solver and with plain ``g / ||g||`` on vectors; each against a reference step
written here from the equations, in float64 (the two sides differ by summation order only, about
1e-15 relative per operation, so 1e-9 leaves ample margin over a few steps)."""

from __future__ import annotations

import itertools

import pytest
import torch

import torchsage

torchjd = pytest.importorskip("torchjd")
from _two_heads import two_task_problem  # noqa: E402
from torchjd.scalarization import FAMO  # noqa: E402

from torchsage.mtl.solvers import make_solver  # noqa: E402


def setup(seed):
    return two_task_problem(seed, classify_b=False)


def task_rows(model, closure):
    """Each task's gradient on every parameter, zero where the task does not reach."""
    params = list(model.parameters())
    losses = closure()
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    return torch.stack([x.detach() for x in losses.values()]), rows


@pytest.mark.parametrize("update", ["clean", "perturbed"])
def test_famo_sees_the_chosen_losses_before_the_step(update):
    model, closure = setup(0)
    ref_model, ref_closure = setup(0)
    famo, ref_famo = FAMO(2).double(), FAMO(2).double()
    rho, lr = 0.05, 0.05
    opt = torchsage.SAM(
        model.parameters(), torch.optim.SGD, rho=rho, solver=famo, solver_update=update, lr=lr
    )
    params = list(ref_model.parameters())
    for _ in range(3):
        opt.step(closure)
        # reference: SAM ascent on the mean task loss, FAMO's direction at w + e, FAMO's update
        clean, rows = task_rows(ref_model, ref_closure)
        g = [(a + b) / 2 for a, b in zip(*rows)]
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        e = [rho * x / norm for x in g]
        with torch.no_grad():
            for p, x in zip(params, e):
                p.add_(x)
        perturbed = torch.stack(list(ref_closure().values()))
        grads = torch.autograd.grad(ref_famo(perturbed), params)
        with torch.no_grad():
            for p, x, d in zip(params, e, grads):
                p.sub_(x).sub_(lr * d)
            if update == "clean":
                ref_famo(clean)  # FAMO records the losses it is called with as "before"
            ref_famo.update(torch.stack(list(ref_closure().values())))
    torch.testing.assert_close(famo._w.detach(), ref_famo._w.detach(), rtol=1e-9, atol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_solver_update_is_checked():
    model, _ = setup(0)
    with pytest.raises(ValueError, match="solver_update must be 'clean' or 'perturbed'"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, solver="mean", solver_update="after")


def test_linear_scalarization_as_a_sum():
    model, closure = setup(1)
    _, rows = task_rows(model, closure)
    w0 = [p.detach().clone() for p in model.parameters()]
    lr = 0.1
    opt = torchsage.SAM(
        model.parameters(), torch.optim.SGD, rho=0.0, solver=make_solver("ls", 2, reduction="sum"), lr=lr
    )
    opt.step(closure)
    for p, w, a, b in zip(model.parameters(), w0, *rows):
        torch.testing.assert_close(p.detach(), w - lr * (a + b), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="reduction must be one of mean, sum"):
        make_solver("ls", 2, reduction="max")


def svd_direction(x):
    if x.ndim < 2:
        return x / x.norm()
    U, _, Vh = torch.linalg.svd(x.reshape(x.shape[0], -1), full_matrices=False)
    return (U @ Vh).reshape(x.shape)


@pytest.mark.parametrize("mix_vectors", [True, False])
def test_align_with_a_solver_matches_its_equations(mix_vectors):
    """Ascent: the align rule on the task gradients over every parameter (heads zero-filled for
    the other task); descent: the mean-solver direction at w + e; global rho scaling."""
    model, closure = setup(2)
    ref_model, ref_closure = setup(2)
    rho, lam_max, lr = 0.1, 0.8, 0.05
    opt = torchsage.SAGEAlign(
        model.parameters(),
        torch.optim.SGD,
        rho=rho,
        lambda_max=lam_max,
        mix_vectors=mix_vectors,
        solver="mean",
        polar_method="svd",
        lr=lr,
    )
    opt.step(closure)

    params = list(ref_model.parameters())
    _, rows = task_rows(ref_model, ref_closure)
    mean = [(a + b) / 2 for a, b in zip(*rows)]
    spread = [(((a - m) ** 2 + (b - m) ** 2) / 2).sqrt() * m.sign() for a, b, m in zip(*rows, mean)]
    flat = [torch.cat([x.reshape(-1) for x in r]) for r in rows]
    cos = [float(u @ v / (u.norm() * v.norm())) for u, v in itertools.combinations(flat, 2)]
    lam = min(max(lam_max * (1 - sum(cos) / len(cos)), 0.0), lam_max)
    dirs = [
        (1 - lam) * svd_direction(m) + lam * svd_direction(s)
        if (mix_vectors or m.ndim >= 2)
        else svd_direction(m)
        for m, s in zip(mean, spread)
    ]
    total = torch.sqrt(sum((d**2).sum() for d in dirs))
    e = [rho * d / total for d in dirs]
    with torch.no_grad():
        for p, x in zip(params, e):
            p.add_(x)
    losses = ref_closure()
    grads = torch.autograd.grad(torch.stack(list(losses.values())).mean(), params)
    with torch.no_grad():
        for p, x, d in zip(params, e, grads):
            p.sub_(x).sub_(lr * d)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert opt.disagreement_scope == "all"
