"""decompose against closed forms and dense Hessians (float64, small models)."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from torchsage.diagnostics import DecompositionReport, decompose
from torchsage.disagreement import MEASURES, disagreement

F64 = torch.float64
K, D, N = 3, 5, 20


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(*args, **kwargs) -> DecompositionReport:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("cg_tol", 1e-12)
    return decompose(*args, **kwargs)


# --- linear regression: H_k = (2/n) X_k^T X_k, g_k = (2/n) X_k^T (X_k w - y_k) ----------------------


@pytest.fixture
def regression():
    g = _gen(1)
    data = [
        (torch.randn(N, D, generator=g, dtype=F64), torch.randn(N, 1, generator=g, dtype=F64))
        for _ in range(K)
    ]
    data[1] = (data[1][0] * 2.0 + 0.5, data[1][1] - 1.0)  # distinct distributions
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, D, generator=g, dtype=F64))
    return model, data


def _regression_reference(model, data, damping=0.0):
    w = model.weight.detach().reshape(-1, 1)
    H = [2.0 / len(X) * X.T @ X for X, _ in data]
    G = torch.stack([(2.0 / len(X) * X.T @ (X @ w - y)).reshape(-1) for X, y in data])
    H_bar = torch.stack(H).mean(0)
    Dev = G - G.mean(0)
    Sigma = Dev.T @ Dev / len(data)
    A = H_bar + damping * torch.eye(len(H_bar), dtype=F64)
    return {
        "alignment": float(torch.linalg.solve(A, Sigma).trace()),
        "per": [float(d @ torch.linalg.solve(A, d)) for d in Dev],
        "H_bar": H_bar,
        "G": G,
        "losses": [float(((X @ w - y) ** 2).mean()) for X, y in data],
    }


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_alignment_matches_the_closed_form(regression, exact, damping):
    model, data = regression
    ref = _regression_reference(model, data, damping)
    report = _run(model, nn.functional.mse_loss, data, damping=damping, exact=exact, lanczos_steps=D)
    assert report.exact is exact and not report.negative_curvature and report.warnings == []
    assert report.alignment == pytest.approx(ref["alignment"], rel=1e-8)
    assert report.alignment_per_distribution == pytest.approx(ref["per"], rel=1e-8)
    assert report.alignment_residuals <= 1e-11
    assert report.damping == damping and report.K == K and report.num_params == D
    # Curvature of the undamped H_bar; Lanczos with D steps spans the whole space.
    evals = torch.linalg.eigvalsh(ref["H_bar"])
    assert report.curvature_top == pytest.approx([float(evals[-1])], rel=1e-10)
    assert report.curvature_min == pytest.approx(float(evals[0]), rel=1e-8)
    assert report.losses == pytest.approx(ref["losses"], rel=1e-12)
    assert report.grad_norms == pytest.approx(torch.linalg.norm(ref["G"], dim=1).tolist(), rel=1e-12)
    assert report.mean_grad_norm == pytest.approx(float(torch.linalg.norm(ref["G"].mean(0))), rel=1e-12)
    if exact:
        assert report.curvature_trace == pytest.approx(float(ref["H_bar"].trace()), rel=1e-12)
        assert report.curvature_trace_stderr == 0.0
        assert report.curvature_top_residuals == [0.0]
    else:
        assert report.curvature_top_residuals[0] < 1e-8
        trace = float(ref["H_bar"].trace())
        assert abs(report.curvature_trace - trace) <= 4 * report.curvature_trace_stderr


def test_one_distribution_or_identical_distributions_give_zero_alignment(regression):
    model, data = regression
    for batches in ([data[0]], [data[1]] * 4):
        report = _run(model, nn.functional.mse_loss, batches, exact=False)
        assert report.alignment == 0.0 and report.alignment_residuals == 0.0
        assert report.alignment_per_distribution == [0.0] * len(batches)
        assert report.cg_iterations == [0] * len(batches)
        assert report.disagreement["raw_var"] == 0.0 and report.disagreement["cosine"] == 0.0


def test_disagreement_and_cosines_match_the_reference_functions(regression):
    model, data = regression
    report = _run(model, nn.functional.mse_loss, data)
    G = _regression_reference(model, data)["G"]
    grads = list(G)
    assert set(report.disagreement) == set(MEASURES)
    for measure in MEASURES:
        assert report.disagreement[measure] == pytest.approx(float(disagreement(grads, measure)), rel=1e-10)
    for i in range(K):
        for j in range(K):
            cos = float(G[i] @ G[j] / (G[i].norm() * G[j].norm()))
            assert report.cosine_matrix[i][j] == pytest.approx(cos, rel=1e-12)


def test_a_loader_equals_one_concatenated_batch(regression):
    model, data = regression
    one = _run(model, nn.functional.mse_loss, data, exact=False, lanczos_steps=D)
    split = [list(zip(X.split(5), y.split(5))) for X, y in data]  # 4 equal batches each
    loaders = [
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10) for X, y in data
    ]
    two = [[(X[:10], y[:10]), (X[10:], y[10:])] for X, y in data]  # a list of two pairs is a loader
    for batches in (split, two, loaders):
        # float64 sums over 2 or 4 batches instead of one: a few 1e-16 per sum; 1e-10 has room for
        # the Lanczos iteration's growth
        many = _run(model, nn.functional.mse_loss, batches, exact=False, lanczos_steps=D)
        for field in ("alignment", "curvature_trace", "curvature_trace_stderr", "mean_grad_norm"):
            assert getattr(many, field) == pytest.approx(getattr(one, field), rel=1e-10), field
        for field in ("alignment_per_distribution", "grad_norms", "losses", "curvature_top"):
            assert getattr(many, field) == pytest.approx(getattr(one, field), rel=1e-10), field
    # A single pair and a one-batch list are the same thing.
    listed = _run(model, nn.functional.mse_loss, [[pair] for pair in data], exact=False, lanczos_steps=D)
    assert listed.as_dict() == one.as_dict()


# --- an explicit quadratic with an indefinite Hessian -------------------------------------------------


class Quadratic(nn.Module):
    """Output is the weight vector itself; with the loss below, L_k(w) = w^T A w / 2 - b_k^T w."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def _indefinite_problem(seed=20):
    g = _gen(seed)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.tensor([5.0, 4.0, 3.0, -0.5], dtype=F64)) @ Q.T
    targets = [torch.randn(4, generator=g, dtype=F64) for _ in range(3)]
    model = Quadratic(torch.randn(4, generator=g, dtype=F64))

    def loss_fn(out, b):
        return 0.5 * out @ A @ out - b @ out

    data = [(torch.zeros(1), b) for b in targets]
    return model, loss_fn, data, A, torch.stack(targets)


def _quadratic_alignment(A, B, damping):
    Dev = B - B.mean(0)  # d_k = A w - b_k - mean = -(b_k - b_bar)
    Sigma = Dev.T @ Dev / len(B)
    return float(torch.linalg.solve(A + damping * torch.eye(len(A), dtype=F64), Sigma).trace())


def _assert_finite_except_alignment(report):
    figures = report.as_dict()
    assert figures.pop("alignment") is None
    assert figures.pop("alignment_per_distribution") == [None] * report.K
    flat = json.dumps(figures, allow_nan=False)  # raises on any nan or inf left
    assert "null" not in flat


@pytest.mark.parametrize(
    "kwargs",
    [{"exact": True}, {"exact": False, "lanczos_steps": 4}, {"exact": False, "lanczos_steps": 1}],
    ids=["exact", "lanczos", "cg-detects"],
)
def test_indefinite_hessian_is_reported_not_nan(kwargs):
    model, loss_fn, data, _, _ = _indefinite_problem()
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        report = _run(model, loss_fn, data, **kwargs)
    assert report.negative_curvature and math.isnan(report.alignment)
    assert len(report.warnings) == 1 and "raise damping above" in report.warnings[0]
    _assert_finite_except_alignment(report)
    if kwargs["exact"] or kwargs["lanczos_steps"] == 4:
        assert report.curvature_min == pytest.approx(-0.5, rel=1e-8)
        assert report.cg_iterations == [0, 0, 0]  # known before any solve: skipped
    else:  # one Lanczos step cannot see it (a positive Rayleigh quotient); CG meets it
        assert report.curvature_min > 0
        assert "conjugate gradients met" in report.warnings[0]
        assert report.cg_iterations[0] > 0
    with pytest.raises(ValueError, match="not positive definite"):
        _run(model, loss_fn, data, strict=True, **kwargs)
    assert torch.equal(model.w, _indefinite_problem()[0].w) and model.w.grad is None


@pytest.mark.parametrize("exact", [True, False])
def test_enough_damping_gives_the_exact_damped_value(exact):
    model, loss_fn, data, A, B = _indefinite_problem()
    with pytest.warns(RuntimeWarning, match="H_bar is indefinite"):
        report = _run(model, loss_fn, data, damping=0.8, exact=exact, lanczos_steps=4, top_k=2)
    assert not report.negative_curvature
    assert report.alignment == pytest.approx(_quadratic_alignment(A, B, 0.8), rel=1e-8)
    assert report.curvature_top == pytest.approx([5.0, 4.0], rel=1e-8)
    assert report.curvature_min == pytest.approx(-0.5, rel=1e-8)


# --- a small tanh MLP against its dense Hessian ------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 4)).double()  # 224 parameters


@pytest.fixture(scope="module")
def mlp_problem():
    g = _gen(30)
    model = _mlp()
    data = [
        (torch.randn(16, 6, generator=g, dtype=F64), torch.randn(16, 4, generator=g, dtype=F64))
        for _ in range(3)
    ]
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_at(flat, x, y):
        tensors = [t.reshape(s) for t, s in zip(flat.split(sizes), shapes)]
        out = torch.func.functional_call(model, dict(zip(names, tensors)), (x,))
        return nn.functional.mse_loss(out, y)

    H = torch.stack(
        [torch.autograd.functional.hessian(lambda t, x=x, y=y: loss_at(t, x, y), theta) for x, y in data]
    )
    G = torch.stack([torch.func.grad(loss_at)(theta, x, y) for x, y in data])
    return model, data, H.mean(0), G


def test_mlp_exact_mode_matches_the_dense_hessian(mlp_problem):
    model, data, H_bar, _ = mlp_problem
    evals = torch.linalg.eigvalsh(H_bar)
    with pytest.warns(RuntimeWarning):  # a random tanh network is not at a minimum
        report = _run(model, nn.functional.mse_loss, data, exact="auto", top_k=3)
    assert report.exact and report.num_params == 224 and report.curvature_trace_stderr == 0.0
    assert report.curvature_trace == pytest.approx(float(H_bar.trace()), rel=1e-8, abs=1e-8)
    assert report.curvature_top == pytest.approx(evals.flip(0)[:3].tolist(), rel=1e-10)
    assert report.curvature_min == pytest.approx(float(evals[0]), rel=1e-8)
    assert float(evals[0]) < 0 and report.negative_curvature  # a saddle: no nan beyond the alignment
    _assert_finite_except_alignment(report)


def test_mlp_hutchinson_lanczos_and_damped_alignment(mlp_problem):
    model, data, H_bar, G = mlp_problem
    evals = torch.linalg.eigvalsh(H_bar)
    damping = max(0.0, -float(evals[0])) + 0.05 * float(evals[-1])
    Dev = G - G.mean(0)
    A = H_bar + damping * torch.eye(len(H_bar), dtype=F64)
    expected = float(torch.linalg.solve(A, Dev.T @ Dev / len(G)).trace())
    with pytest.warns(RuntimeWarning, match="H_bar is indefinite"):
        report = _run(
            model,
            nn.functional.mse_loss,
            data,
            exact=False,
            damping=damping,
            top_k=3,
            lanczos_steps=60,
            seed=1,
        )
    assert not report.negative_curvature and report.alignment_residuals <= 1e-11
    assert report.alignment == pytest.approx(expected, rel=1e-6)
    assert abs(report.curvature_trace - float(H_bar.trace())) <= 4 * report.curvature_trace_stderr
    assert report.curvature_trace_stderr > 0
    top = evals.flip(0)[:3]
    assert report.curvature_top[0] == pytest.approx(float(top[0]), rel=1e-6)
    assert report.curvature_top == pytest.approx(top.tolist(), rel=1e-6)
    assert report.hessian_vector_products == 60 + 100 + sum(report.cg_iterations) + K  # + true residuals


@pytest.mark.filterwarnings("ignore:H_bar is indefinite:RuntimeWarning")
def test_a_parameter_subset_uses_the_hessian_block(mlp_problem):
    model, data, H_bar, G = mlp_problem
    first = list(model[0].parameters())  # 6 * 20 + 20 = 140 leading parameters
    block, Gs = H_bar[:140, :140], G[:, :140]
    damping = max(0.0, -float(torch.linalg.eigvalsh(block)[0])) + 0.1
    Dev = Gs - Gs.mean(0)
    expected = float(torch.linalg.solve(block + damping * torch.eye(140, dtype=F64), Dev.T @ Dev / 3).trace())
    report = _run(model, nn.functional.mse_loss, data, params=first, damping=damping, exact=True)
    assert report.num_params == 140
    assert report.alignment == pytest.approx(expected, rel=1e-8)
    assert report.curvature_trace == pytest.approx(float(block.trace()), rel=1e-10)
    assert report.grad_norms == pytest.approx(torch.linalg.norm(Gs, dim=1).tolist(), rel=1e-12)


# --- the model is left as it was ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:H_bar is indefinite:RuntimeWarning")
def test_model_state_gradients_and_modes_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1)
    ).double()
    g = _gen(40)
    data = [
        (torch.randn(12, 4, generator=g, dtype=F64), torch.randn(12, 1, generator=g, dtype=F64))
        for _ in range(3)
    ]
    model.train()
    model(data[0][0])  # non-trivial running statistics
    model[3].eval()  # mixed modes must come back as they were
    model[0].weight.grad = torch.ones_like(model[0].weight)
    grad_object = model[0].weight.grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]

    report = _run(model, nn.functional.mse_loss, data, exact=False, damping=5.0, hutchinson_samples=4)
    assert not report.negative_curvature

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers, bit for bit
    assert [m.training for m in model.modules()] == modes
    assert model[0].weight.grad is grad_object and torch.equal(grad_object, torch.ones_like(grad_object))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.weight")

    # The gradients were taken in eval mode (running statistics, no dropout): deterministic.
    model.eval()
    for (x, y), norm in zip(data, report.grad_norms):
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
        assert norm == pytest.approx(float(torch.cat([t.reshape(-1) for t in grads]).norm()), rel=1e-12)
    model.train()
    model[3].eval()
    again = _run(model, nn.functional.mse_loss, data, exact=False, damping=5.0, hutchinson_samples=4)
    assert again.as_dict() == report.as_dict()


def test_report_is_frozen_and_json_ready(regression):
    model, data = regression
    report = _run(model, nn.functional.mse_loss, data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.alignment = 0.0  # type: ignore[misc]
    loaded = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert loaded["alignment"] == report.alignment and len(loaded["cosine_matrix"]) == K


def test_arguments_are_checked(regression):
    model, data = regression
    loss = nn.functional.mse_loss
    for kwargs, match in [
        ({"damping": -1.0}, "damping"),
        ({"exact": "yes"}, "exact"),
        ({"exact": False, "top_k": 5, "lanczos_steps": 3}, "lanczos_steps"),
        ({"exact": False, "hutchinson_samples": 1}, "hutchinson_samples"),
        ({"cg_max_iter": 0}, "cg_max_iter"),
    ]:
        with pytest.raises(ValueError, match=match):
            _run(model, loss, data, **kwargs)
    with pytest.raises(ValueError, match="non-empty"):
        _run(model, loss, [])
    with pytest.raises(ValueError, match="pair"):
        _run(model, loss, [[data[0][0]]])
    with pytest.raises(ValueError, match="not finite"):
        _run(model, loss, [(data[0][0], data[0][1] * math.inf)])


def test_unconverged_solves_are_reported(regression):
    model, data = regression
    with pytest.warns(RuntimeWarning, match="did not reach cg_tol"):
        report = _run(model, nn.functional.mse_loss, data, exact=False, cg_max_iter=1, lanczos_steps=D)
    assert not report.negative_curvature and math.isfinite(report.alignment)
    assert report.alignment_residuals > 1e-12 and report.cg_iterations == [1, 1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(regression):
    model, data = regression
    cpu = _run(model, nn.functional.mse_loss, data, exact=False, lanczos_steps=D)
    cuda = _run(model.cuda(), nn.functional.mse_loss, data, exact=False, lanczos_steps=D)  # inputs moved
    assert cuda.alignment == pytest.approx(cpu.alignment, rel=1e-8)
    assert cuda.curvature_trace == pytest.approx(cpu.curvature_trace, rel=1e-8)
    assert cuda.curvature_top == pytest.approx(cpu.curvature_top, rel=1e-8)


def test_exact_hessian_falls_back_to_single_products_without_vmap(regression, monkeypatch):
    model, data = regression
    batched = _run(model, nn.functional.mse_loss, data, exact=True)
    grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = _run(model, nn.functional.mse_loss, data, exact=True)
    assert looped.curvature_trace == pytest.approx(batched.curvature_trace, rel=1e-12)
    assert looped.alignment == pytest.approx(batched.alignment, rel=1e-10)
