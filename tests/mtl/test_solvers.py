"""The solver registry: names, options, flags, missing dependencies, and one step of every solver
with and without SAGE on a tiny MultiDigits batch."""

import math

import pytest
import torch
from torch import nn

import torchsage
from torchsage.mtl.data import multi_digits
from torchsage.mtl.networks import MultiLeNet
from torchsage.mtl.solvers import SOLVER_NAMES, SOLVERS, make_solver, solver_spec

torchjd = pytest.importorskip("torchjd")
from torchjd.aggregation import CAGrad, NashMTL, UPGrad  # noqa: E402
from torchjd.scalarization import DWA, FAMO, UW, Mean, Random  # noqa: E402

ALL = sorted(SOLVERS)
EXPECTED = {
    "upgrad", "mgda", "pcgrad", "cagrad", "imtlg", "nashmtl", "graddrop", "alignedmtl", "dualproj",
    "ls", "uw", "dwa", "rlw", "famo",
}  # fmt: skip


def test_registry_holds_exactly_the_named_solvers_and_stl_last():
    assert set(SOLVERS) == EXPECTED
    assert SOLVER_NAMES[-1] == "stl" and set(SOLVER_NAMES) == EXPECTED | {"stl"}


def test_factories_build_the_right_torchjd_objects_with_the_right_options():
    assert isinstance(make_solver("upgrad", 2), UPGrad)
    cagrad = make_solver("cagrad", 3)
    assert isinstance(cagrad, CAGrad) and cagrad.c == 0.4
    assert make_solver("cagrad", 3, c=0.7).c == 0.7  # options reach the constructor
    nash = make_solver("nashmtl", 3)
    assert isinstance(nash, NashMTL) and "n_tasks=3" in repr(nash)
    uw = make_solver("uw", 3)
    assert isinstance(uw, UW) and tuple(uw.log_var.shape) == (3,)
    famo = make_solver("famo", 4)
    assert isinstance(famo, FAMO) and "shape=(4,)" in repr(famo)
    assert isinstance(make_solver("dwa", 2), DWA) and make_solver("dwa", 2).temperature == 2.0
    assert type(make_solver("ls", 2)) is Mean and type(make_solver("rlw", 2)) is Random


def test_flags_say_what_the_caller_must_do():
    assert [n for n, s in SOLVERS.items() if s.needs_parameters] == ["uw"]
    assert [n for n, s in SOLVERS.items() if s.epoch_step] == ["dwa"]
    assert [n for n, s in SOLVERS.items() if s.self_updating] == ["famo"]
    assert {n for n, s in SOLVERS.items() if s.stateful} == {"nashmtl", "uw", "dwa", "famo"}
    for name, spec in SOLVERS.items():  # stateful objects really are torchjd Stateful
        assert spec.stateful == isinstance(make_solver(name, 2), torchjd.Stateful) or name == "nashmtl"
    assert {n for n, s in SOLVERS.items() if s.kind == "scalarizer"} == {"ls", "uw", "dwa", "rlw", "famo"}


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown solver 'nope'") as info:
        make_solver("nope", 2)
    for name in SOLVER_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="one model per task"):
        make_solver("stl", 2)
    with pytest.raises(ValueError, match="n_tasks"):
        make_solver("ls", 0)
    with pytest.raises(ValueError, match="bad options"):
        make_solver("ls", 2, nonsense=1)
    assert solver_spec("UPGrad").name == "upgrad"  # names are case-insensitive


@pytest.mark.parametrize(
    ("name", "package"), [("nashmtl", "cvxpy"), ("cagrad", "cvxpy"), ("upgrad", "quadprog")]
)
def test_missing_optional_dependency_says_what_to_install(monkeypatch, name, package):
    import torchjd._mixins as mixins

    real = mixins.find_spec
    monkeypatch.setattr(mixins, "find_spec", lambda mod: None if mod == package else real(mod))
    with pytest.raises(ImportError, match=r'pip install "torchsage\[mtl\]"') as info:
        make_solver(name, 2)
    assert package in str(info.value) and name in str(info.value)


@pytest.fixture(scope="module")
def batch():
    x, left, right = multi_digits("train", n=16).tensors  # built once: a few seconds on a busy CPU
    return x, {"left": left, "right": right}


def _optimizer(model, name, sage, lr=1e-3):
    spec = SOLVERS[name]
    solver = make_solver(name, 2)
    params = model.parameters()
    if spec.needs_parameters:
        params = [{"params": list(model.parameters())}, {"params": list(solver.parameters())}]
    if sage:
        opt = torchsage.SAGE(params, torch.optim.Adam, rho=0.05, gamma=1e-3, solver=solver, seed=0, lr=lr)
    else:
        opt = torchsage.SAM(params, torch.optim.Adam, rho=0.0, solver=solver, lr=lr)
    return solver, opt


@pytest.mark.parametrize("sage", [False, True], ids=["plain", "sage"])
@pytest.mark.parametrize("name", ALL)
def test_every_solver_steps_with_and_without_sage(name, sage, batch):
    x, targets = batch
    model = MultiLeNet()
    before = [p.detach().clone() for p in model.parameters()]
    solver, opt = _optimizer(model, name, sage)
    ce = nn.functional.cross_entropy

    def closure():
        out = model(x)
        return {t: ce(out[t], targets[t]) for t in ("left", "right")}

    with torch.no_grad():  # the reported losses are the clean losses of the batch
        out = model(x)
        clean = [ce(out[t], targets[t]).item() for t in ("left", "right")]
    info = opt.step(closure)
    assert info.names == ("left", "right")
    # the same float32 forward, one batched and one not under no_grad: a few ulp; 1e-5 for margin
    assert info.losses == pytest.approx(clean, rel=1e-5)
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(moved[:6])  # every encoder tensor moved (conv, conv, linear: weight and bias)
    if sage:
        assert info.disagreement > 0 and math.isclose(info.noise_std, 1e-3 * info.disagreement, rel_tol=1e-6)
    if name == "dwa":  # the epoch boundary the harness drives, then a step with DWA's weights
        solver.step()
        assert all(math.isfinite(v) for v in opt.step(closure).losses)


def test_uw_log_variances_are_learned_by_the_optimizer(batch):
    # UW: L = sum 0.5 exp(-s) L_k + 0.5 s, so dL/ds_k = 0.5 (1 - L_k) at s = 0, negative for
    # losses above 1; Adam's first step moves each s_k by lr * sign(-grad) = +lr.
    x, targets = batch
    model = MultiLeNet()
    solver, opt = _optimizer(model, "uw", sage=False, lr=0.01)

    def closure():
        out = model(x)
        return {t: nn.functional.cross_entropy(out[t], targets[t]) for t in ("left", "right")}

    info = opt.step(closure)
    assert min(info.losses) > 1.0  # ln(10) at initialisation, roughly
    assert solver.log_var.detach().tolist() == pytest.approx([0.01, 0.01], rel=1e-4)
