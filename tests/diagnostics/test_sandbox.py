"""The sandbox against brute-force linear algebra, and the counterexample's claims, computed."""

import math

import pytest
import torch
from torch import nn

from torchsage.diagnostics import decompose
from torchsage.diagnostics import sandbox as S

F64 = torch.float64


def _box(d=6, c=0.3, seed=0):
    lam = torch.linspace(0.2, 3.0, d, dtype=F64).tolist()
    return S.Sandbox.build(lam, meta_scale=c, seed=seed)


def test_build_has_the_requested_spectrum_and_meta_covariance():
    lam = [0.5, 1.0, 2.0, 4.0]
    box = S.Sandbox.build(lam, meta_scale=0.1, hessian_scale=3.0, seed=3)
    assert torch.allclose(torch.linalg.eigvalsh(box.hessian), 3.0 * torch.tensor(lam, dtype=F64), atol=1e-12)
    assert torch.equal(box.meta_cov, 0.1 * torch.eye(4, dtype=F64))
    assert torch.equal(box.meta_mean, torch.zeros(4, dtype=F64))


def test_alignment_term_equals_trace_of_inverse_hessian_times_gradient_covariance():
    box = _box()
    g = torch.Generator().manual_seed(1)
    optima = box.draw_optima(4, g)
    w = torch.randn(box.dim, generator=g, dtype=F64)
    grads = (w - optima) @ box.hessian  # g_k = H (w - w_k), H symmetric
    dev = grads - grads.mean(0)
    sigma_g = dev.T @ dev / len(grads)
    brute = torch.trace(torch.linalg.solve(box.hessian, sigma_g))
    assert S.alignment_term(box.hessian, optima) == pytest.approx(float(brute), rel=1e-12)


def test_regression_batches_reproduce_the_population_losses_and_decompose_matches_the_closed_forms():
    box = _box(d=5)
    g = torch.Generator().manual_seed(2)
    optima = box.draw_optima(3, g)
    w = torch.randn(box.dim, generator=g, dtype=F64)
    model, loss_fn, batches = S.regression_batches(box, optima, w)
    for (x, y), wk in zip(batches, optima):
        e = w - wk
        assert float(loss_fn(model(x), y).detach()) == pytest.approx(
            0.5 * float(e @ box.hessian @ e), rel=1e-12
        )
    evals = torch.linalg.eigvalsh(box.hessian)
    for exact in (True, False):
        r = decompose(
            model, loss_fn, batches, exact=exact, cg_tol=1e-12, lanczos_steps=5, hutchinson_samples=200,
            top_k=2, progress=False,
        )  # fmt: skip
        assert r.alignment == pytest.approx(S.alignment_term(box.hessian, optima), rel=1e-9)
        assert r.curvature_top == pytest.approx(evals.flip(0)[:2].tolist(), rel=1e-9)
        if exact:
            assert r.curvature_trace == pytest.approx(float(evals.sum()), rel=1e-12)
        else:  # Hutchinson: within 4 of its own standard errors
            assert abs(r.curvature_trace - float(evals.sum())) < 4 * r.curvature_trace_stderr


def test_excess_risk_is_the_mean_held_out_loss_gap():
    """An antithetic pair of held-out optima m +- z cancels the cross term exactly."""
    box = _box()
    g = torch.Generator().manual_seed(3)
    w, z = torch.randn(box.dim, generator=g, dtype=F64), torch.randn(box.dim, generator=g, dtype=F64)
    m = box.meta_mean

    def loss(v, opt):
        return 0.5 * (v - opt) @ box.hessian @ (v - opt)

    gap = sum(loss(w, m + s * z) - loss(m, m + s * z) for s in (1.0, -1.0)) / 2
    assert float(box.excess_risk(w)) == pytest.approx(float(gap), rel=1e-12)


def test_expected_excess_and_alignment_match_monte_carlo():
    box, K, sigma2, R = _box(d=4, c=0.2), 3, 0.05, 20000
    g = torch.Generator().manual_seed(4)
    optima = box.draw_optima(K * R, g).reshape(R, K, box.dim)
    w = optima.mean(1) + math.sqrt(sigma2) * torch.randn(R, box.dim, generator=g, dtype=F64)
    excess = box.excess_risk(w)
    assert abs(float(excess.mean()) - box.expected_excess(K, sigma2)) < 4 * float(excess.std()) / math.sqrt(R)
    # closed forms written out independently: tr(HC)/(2K) + sigma^2 tr(H)/2 and (K-1)/K tr(HC)
    trHC = 0.2 * float(torch.trace(box.hessian))
    assert box.expected_excess(K, sigma2) == pytest.approx(
        trHC / (2 * K) + sigma2 * float(torch.trace(box.hessian)) / 2
    )
    align = torch.tensor([S.alignment_term(box.hessian, o) for o in optima[:4000]], dtype=F64)
    assert abs(float(align.mean()) - (K - 1) / K * trHC) < 4 * float(align.std()) / math.sqrt(len(align))
    assert box.expected_alignment(K) == pytest.approx((K - 1) / K * trHC)
    # so the two terms predict it without bias
    assert S.predicted_excess(box.expected_alignment(K), K, box.hessian, sigma2) == pytest.approx(
        box.expected_excess(K, sigma2)
    )


def test_prediction_experiment_rows_agree_with_closed_form_and_decompose():
    rows = S.prediction_experiment(
        K=4, dim=8, meta_scales=(1e-2, 1e-1), sigma2s=(0.0, 1e-2), spectra=("flat", "decaying"), repeats=2000,
        progress=False,
    )  # fmt: skip
    assert len(rows) == 8
    for r in rows:
        assert abs(r["measured_excess"] - r["closed_form_excess"]) < 4 * r["measured_excess_stderr"]
        assert r["predicted_excess"] == pytest.approx(r["alignment_part"] + r["curvature_part"])
        c = r["decompose_check"]
        if r["sigma2"] == 0.0:
            assert c["alignment_rel_error"] < 1e-8
            assert c["top_lanczos"] == pytest.approx(c["top_closed_form"], rel=1e-8)
            assert abs(c["trace_hutchinson"] - c["trace_closed_form"]) <= 4 * c["trace_stderr"] + 1e-9
        else:
            assert c is None


def test_counterexample_equalities_and_inequalities_hold():
    result = S.counterexample(K=5, dim=10, repeats=3000, scales=(0.01, 0.1, 1.0, 10.0, 100.0), progress=False)
    low_a, high_a, low_c, high_c = result["pairs"]
    # equal curvature (computed), alignment 100x apart, excess far apart
    assert low_a["curvature_part"] == high_a["curvature_part"]
    assert high_a["expected_alignment"] / low_a["expected_alignment"] == pytest.approx(100.0)
    assert high_a["measured_excess"] > 5 * low_a["measured_excess"]
    # equal alignment, curvature 100x apart, excess far apart
    assert low_c["expected_alignment"] == pytest.approx(high_c["expected_alignment"], rel=1e-12)
    assert high_c["curvature_part"] / low_c["curvature_part"] == pytest.approx(100.0)
    assert high_c["measured_excess"] > 3 * low_c["measured_excess"]
    # neither bounds the other: the ratio of the two parts lies far on both sides of 1
    ratios = [r["alignment_part"] / r["curvature_part"] for r in result["pairs"]]
    assert min(ratios) < 0.5 and max(ratios) > 10
    for r in result["pairs"] + result["sweep"]:
        assert abs(r["measured_excess"] - r["closed_form_excess"]) < 4 * r["measured_excess_stderr"]
    # at fixed gradient covariance the excess is smallest at an intermediate Hessian scale
    excess = [r["measured_excess"] for r in result["sweep"]]
    best = excess.index(min(excess))
    assert 0 < best < len(excess) - 1


def test_method_experiment_every_method_sees_the_same_alignment_term():
    rows = S.method_experiment(K=3, dim=6, steps=40, seeds=(0,), progress=False)
    assert [r["method"] for r in rows][:4] == ["ERM", "SAM", "SAGE_AlignmentOnly", "SAGE"]
    for r in rows:  # the alignment term of the shared-Hessian sandbox does not depend on w
        assert r["alignment"] == pytest.approx(rows[0]["alignment"], rel=1e-6)
        assert r["alignment_part"] == rows[0]["alignment_part"]
        assert r["curvature_part"] >= 0
    assert math.isnan(rows[0]["noise_std"]) or rows[0]["noise_std"] == 0.0  # plain SGD adds no noise


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hessian=torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)), "symmetric"),
        (dict(hessian=torch.diag(torch.tensor([1.0, -1.0], dtype=F64))), "positive definite"),
        (dict(meta_mean=torch.zeros(3, dtype=F64)), "meta_mean must have shape"),
        (dict(meta_cov=-torch.eye(2, dtype=F64)), "positive semi-definite"),
    ],
)
def test_sandbox_rejects_bad_matrices(kwargs, match):
    base = dict(
        hessian=torch.eye(2, dtype=F64), meta_mean=torch.zeros(2, dtype=F64), meta_cov=torch.eye(2, dtype=F64)
    )
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        S.Sandbox(**base)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive numbers"):
        S.Sandbox.build([1.0, 0.0])
    with pytest.raises(ValueError, match="hessian_scale"):
        S.Sandbox.build([1.0], hessian_scale=0.0)
    with pytest.raises(ValueError, match="at least 2 distributions"):
        S.predicted_excess(0.1, 1, torch.eye(2, dtype=F64), 0.0)
    with pytest.raises(ValueError, match="unknown spectrum"):
        S.prediction_experiment(spectra=("bumpy",), repeats=2, progress=False)


def test_decompose_with_one_loss_function_per_distribution():
    """A two-head model with a dict output; reference: dense Hessian by autograd.functional."""
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(3, 2).double()
            self.a = nn.Linear(2, 1).double()
            self.b = nn.Linear(2, 1).double()

        def forward(self, x):
            h = torch.tanh(self.trunk(x))
            return {"a": self.a(h), "b": self.b(h)}

    model = TwoHeads()
    x = torch.randn(10, 3, dtype=F64)
    ya, yb = torch.randn(10, 1, dtype=F64), torch.randn(10, 1, dtype=F64)
    fns = [lambda o, y: nn.functional.mse_loss(o["a"], y), lambda o, y: nn.functional.mse_loss(o["b"], y)]
    with pytest.warns(RuntimeWarning, match="indefinite"):  # not a minimum: damped, and reported
        report = decompose(model, fns, [(x, ya), (x, yb)], damping=1.0, progress=False, cg_tol=1e-12)

    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def task_loss(flat, head, y):
        parts, i = [], 0
        for s in shapes:
            n = math.prod(s)
            parts.append(flat[i : i + n].reshape(s))
            i += n
        names = [n for n, _ in model.named_parameters()]
        out = torch.func.functional_call(model, dict(zip(names, parts)), (x,))
        return nn.functional.mse_loss(out[head], y)

    losses = [lambda f: task_loss(f, "a", ya), lambda f: task_loss(f, "b", yb)]
    grads = torch.stack([torch.autograd.functional.jacobian(fn, flat0) for fn in losses])
    H = sum(torch.autograd.functional.hessian(fn, flat0) for fn in losses) / 2
    dev = grads - grads.mean(0)
    ref = torch.trace(torch.linalg.solve(H + torch.eye(len(flat0), dtype=F64), dev.T @ dev / 2))
    assert report.alignment == pytest.approx(float(ref), rel=1e-8)
    assert report.grad_norms == pytest.approx(grads.norm(dim=1).tolist(), rel=1e-10)
    with pytest.raises(ValueError, match="lists 1 functions but batches has 2"):
        decompose(model, fns[:1], [(x, ya), (x, yb)], progress=False)
    with pytest.raises(ValueError, match=r"loss_fn\[1\] is not callable"):
        decompose(model, [fns[0], 3], [(x, ya), (x, yb)], progress=False)
