"""Multi-task solvers inside SAGE and SAM, checked against torchjd's own engine and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchsage

torchjd = pytest.importorskip("torchjd")
from torchjd.aggregation import IMTLG, MGDA, Mean, UPGrad  # noqa: E402
from torchjd.autojac import backward as jd_backward  # noqa: E402
from torchjd.autojac import jac_to_grad  # noqa: E402
from torchjd.scalarization import FAMO, UW  # noqa: E402
from torchjd.scalarization import Mean as MeanScalarizer  # noqa: E402


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)})

    def forward(self, x):
        z = self.trunk(x)
        return {k: h(z) for k, h in self.heads.items()}


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = TwoHeads().double()
    x = torch.randn(16, 5, dtype=torch.float64)
    ya = torch.randn(16, 1, dtype=torch.float64)
    yb = torch.randint(0, 2, (16,))

    def closure():
        out = model(x)
        return {
            "a": nn.functional.mse_loss(out["a"], ya),
            "b": nn.functional.cross_entropy(out["b"], yb),
        }

    return model, closure


def _reference_grads(model, closure, solver):
    """The direction torchjd's own engine gives: Jacobian on the trunk, own gradients on heads."""
    model.zero_grad(set_to_none=True)
    losses = closure()
    trunk = list(model.trunk.parameters())
    heads = {k: list(h.parameters()) for k, h in model.heads.items()}
    for k, ps in heads.items():
        for p, g in zip(ps, torch.autograd.grad(losses[k], ps, retain_graph=True)):
            p.grad = g
    jd_backward(list(losses.values()), inputs=trunk)
    jac_to_grad(trunk, solver)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [Mean, UPGrad, MGDA, IMTLG], ids=lambda f: f.__name__)
def test_plain_step_equals_the_solver_step(make):
    model, closure = _problem()
    lr = 0.1
    expected = {
        n: p.detach() - lr * g
        for (n, p), g in zip(model.named_parameters(), _reference_grads(model, closure, make()).values())
    }
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.0, gamma=0.0, solver=make(), lr=lr)
    info = opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-9, atol=1e-12, msg=n)
    assert info.names == ("a", "b")
    assert math.isnan(info.perturbed_loss)


def test_sam_with_rho_zero_is_the_plain_solver_step():
    model, closure = _problem(1)
    ref = _reference_grads(model, closure, UPGrad())
    expected = {n: p.detach() - 0.05 * ref[n] for n, p in model.named_parameters()}
    torchsage.SAM(model.parameters(), torch.optim.SGD, rho=0.0, solver=UPGrad(), lr=0.05).step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-9, atol=1e-12)


def test_sam_descends_with_the_solver_at_the_perturbed_point():
    model, closure = _problem(2)
    rho, lr = 0.3, 0.1
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The clean mean gradient, by hand: d/dw of (l_a + l_b) / 2.
    model.zero_grad(set_to_none=True)
    losses = closure()
    (sum(losses.values()) / 2).backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(rho * g[n] / norm)
    ref = _reference_grads(model, closure, UPGrad())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(w0[n])
    opt = torchsage.SAM(model.parameters(), torch.optim.SGD, rho=rho, solver=UPGrad(), lr=lr)
    info = opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w0[n] - lr * ref[n], rtol=1e-8, atol=1e-11, msg=n)
    assert info.perturbation_norm == pytest.approx(rho)


def test_scalarizer_gradient_equals_differentiating_the_scalarized_loss():
    model, closure = _problem(3)
    uw = UW(2).double()
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.3, -0.7]))
    params = [{"params": model.parameters()}, {"params": uw.parameters()}]
    ref_model, ref_closure = _problem(3)
    ref_uw = UW(2).double()
    with torch.no_grad():
        ref_uw.log_var.copy_(torch.tensor([0.3, -0.7]))
    ref_uw(torch.stack(list(ref_closure().values()))).backward()
    lr = 0.01
    opt = torchsage.SAGE(params, torch.optim.SGD, rho=0.0, gamma=0.0, solver=uw, lr=lr)
    # check_solver resets UW's state (log-variances back to 0): set them again after building.
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.3, -0.7]))
    opt.step(closure)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - lr * q.grad, rtol=1e-9, atol=1e-12, msg=n)
    torch.testing.assert_close(
        uw.log_var.detach(), torch.tensor([0.3, -0.7], dtype=torch.float64) - lr * ref_uw.log_var.grad
    )


def test_scalarizer_parameters_must_be_optimized():
    model, closure = _problem(4)
    opt = torchsage.SAM(model.parameters(), torch.optim.SGD, rho=0.0, solver=UW(2).double(), lr=0.1)
    with pytest.raises(ValueError, match=r"solver\.parameters"):
        opt.step(closure)


def test_disagreement_is_measured_on_the_shared_parameters():
    model, closure = _problem(5)
    losses = closure()
    trunk = list(model.trunk.parameters())
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, trunk, retain_graph=True)])
        for loss in losses.values()
    ]
    mean = (rows[0] + rows[1]) / 2
    variance = sum(((r - mean) ** 2).sum() for r in rows) / 2
    expected = float(variance.sqrt() / mean.norm())
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.0, solver="mean", lr=0.0)
    info = opt.step(closure)
    assert info.disagreement == pytest.approx(expected, rel=1e-9)
    # Without a solver the heads' zero rows enter the disagreement: a different number.
    model2, closure2 = _problem(5)
    plain = torchsage.SAGE(model2.parameters(), torch.optim.SGD, rho=0.05, gamma=0.0, lr=0.0).step(closure2)
    assert plain.disagreement != pytest.approx(expected, rel=1e-3)


def test_mean_solver_equals_no_solver_when_gamma_is_zero():
    model, closure = _problem(6)
    model2, closure2 = _problem(6)
    a = torchsage.SAGE(
        model.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, solver=MeanScalarizer(), lr=0.1
    )
    b = torchsage.SAGE(model2.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, lr=0.1)
    for _ in range(3):
        a.step(closure)
        b.step(closure2)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_famo_is_updated_with_the_clean_losses_before_and_after_the_step():
    model, closure = _problem(7)
    ref_model, ref_closure = _problem(7)
    famo, ref_famo = FAMO(2).double(), FAMO(2).double()
    lr = 0.05
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.0, gamma=0.0, solver=famo, lr=lr)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=lr)
    for _ in range(3):
        opt.step(closure)
        ref_opt.zero_grad()
        ref_famo(torch.stack(list(ref_closure().values()))).backward()
        ref_opt.step()
        with torch.no_grad():
            ref_famo.update(torch.stack(list(ref_closure().values())))
    torch.testing.assert_close(famo._w.detach(), ref_famo._w.detach(), rtol=1e-9, atol=1e-12)
    assert not torch.equal(famo._w.detach(), torch.zeros(2, dtype=torch.float64))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_sage_with_a_solver_keeps_every_contract():
    model, closure = _problem(8)
    opt = torchsage.SAGE(
        model.parameters(), torch.optim.Adam, rho=0.05, gamma=1e-3, solver=UPGrad(), lr=1e-2, seed=0
    )
    before = [p.detach().clone() for p in model.parameters()]
    info = opt.step(closure)
    assert info.perturbation_norm == pytest.approx(0.05)
    assert info.noise_std == pytest.approx(1e-3 * info.disagreement)
    assert info.disagreement > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bad_solvers_are_refused():
    model, _ = _problem()
    with pytest.raises(ValueError, match="torchjd aggregator"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, solver="upgrad", lr=0.1)
    with pytest.raises(ValueError, match="torchjd aggregator"):
        torchsage.SAM(model.parameters(), torch.optim.SGD, solver=object(), lr=0.1)
    with pytest.raises(ValueError, match="needs disagreement_scope='all'"):
        torchsage.SAGEAlign(
            model.parameters(), torch.optim.SGD, solver=UPGrad(), disagreement_scope="shared", lr=0.1
        )


def test_nonfinite_task_loss_is_named_and_nothing_moves():
    model, closure = _problem(9)

    def bad():
        losses = closure()
        losses["b"] = losses["b"] * float("nan")
        return losses

    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, solver=UPGrad(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="distribution b"):
        opt.step(bad)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
