"""The public contracts of the optimizers (docs/usage.md): base-optimizer equivalence, exact
restoration, non-finite handling, resume, schedulers, BatchNorm, clipping, groups, arguments."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsage
from torchsage.optim import SAGEAlign, SAGEAlignmentOnly, SAGECurvatureOnly

ALL = [
    ("SAM", lambda ps, **kw: torchsage.SAM(ps, **kw)),
    ("ASAM", lambda ps, **kw: torchsage.ASAM(ps, **kw)),
    ("SAGE", lambda ps, **kw: torchsage.SAGE(ps, seed=1, **kw)),
    ("SAGECurvatureOnly", lambda ps, **kw: SAGECurvatureOnly(ps, **kw)),
    ("SAGEAlignmentOnly", lambda ps, **kw: SAGEAlignmentOnly(ps, seed=1, **kw)),
    ("SAGEAlign", lambda ps, **kw: SAGEAlign(ps, **kw)),
    ("GSAM", lambda ps, **kw: torchsage.optim.GSAM(ps, **kw)),
    ("SAGM", lambda ps, **kw: torchsage.optim.SAGM(ps, **kw)),
]


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def domains(K=3, n=8):
    return [(torch.randn(n, 1, 8, 8), torch.randint(0, 3, (n,))) for _ in range(K)]


def closure_for(model, data):
    return lambda: [F.cross_entropy(model(x), y) for x, y in data]


@pytest.mark.parametrize(
    "base, kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=1e-2))]
)
def test_rho_and_gamma_zero_equal_the_base_optimizer(base, kw):
    model = small_net()
    reference = copy.deepcopy(model)
    data = domains()
    opt = torchsage.SAGE(model.parameters(), base, rho=0.0, gamma=0.0, **kw)
    ref_opt = base(reference.parameters(), **kw)
    for _ in range(5):
        info = opt.step(closure_for(model, data))
        ref_opt.zero_grad()
        torch.stack([F.cross_entropy(reference(x), y) for x, y in data]).mean().backward()
        ref_opt.step()
        assert math.isnan(info.perturbed_loss)  # no second pass when rho = 0
    # SAGE's mean gradient is a running (Welford) mean of 3 float32 gradients, the reference's one
    # backward of the mean loss: a few ulp apart per step; 5 steps (no zero-gradient coordinate for
    # Adam to amplify: no normalisation layer): 1e-5
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sam_with_rho_zero_equals_the_base_optimizer():
    model = small_net()
    reference = copy.deepcopy(model)
    data = domains()
    opt = torchsage.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        opt.step(closure_for(model, data))
        ref_opt.zero_grad()
        torch.stack([F.cross_entropy(reference(x), y) for x, y in data]).mean().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name, make", ALL)
def test_weights_are_restored_bit_for_bit_after_the_perturbed_pass(name, make):
    model = small_net()
    before = [p.detach().clone() for p in model.parameters()]
    # lr = 0 makes the descent a no-op, so only the restoration can change the weights.
    opt = make(model.parameters(), base_optimizer=torch.optim.SGD, lr=0.0)
    info = opt.step(closure_for(model, domains()))
    assert info.perturbation_norm > 0 or name == "SAGEAlignmentOnly"
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_weights_are_restored_when_the_closure_fails_at_the_perturbed_point():
    model = small_net()
    before = [p.detach().clone() for p in model.parameters()]
    data = domains()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader died")
        return [F.cross_entropy(model(x), y) for x, y in data]

    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def _trained_adam(make):
    model = small_net()
    data = domains()
    opt = make(model.parameters(), base_optimizer=torch.optim.Adam, lr=1e-2)
    opt.step(closure_for(model, data))
    return model, data, opt


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snapshot):
    params, state = snapshot
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p, b)
    now = opt.state_dict()
    for key, entry in state["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(now["state"][key][name]), torch.as_tensor(value))
    gens = state.get("torchsage", {}).get("generators", {})
    for dev, gen_state in gens.items():
        assert torch.equal(now["torchsage"]["generators"][dev], gen_state)


@pytest.mark.parametrize("name, make", ALL)
def test_nonfinite_loss_raises_naming_the_distribution_and_changes_nothing(name, make):
    model, data, opt = _trained_adam(make)
    snapshot = _snapshot(model, opt)

    def closure():
        losses = [F.cross_entropy(model(x), y) for x, y in data]
        losses[1] = losses[1] * float("nan")
        return losses

    with pytest.raises(FloatingPointError, match=r"loss .* distribution 1 at the clean weights"):
        opt.step(closure)
    _assert_unchanged(model, opt, snapshot)


def test_nonfinite_loss_is_named_by_dict_key():
    model, data, opt = _trained_adam(lambda ps, **kw: torchsage.SAGE(ps, **kw))

    def closure():
        names = ["photo", "sketch", "cartoon"]
        losses = {n: F.cross_entropy(model(x), y) for n, (x, y) in zip(names, data)}
        losses["sketch"] = losses["sketch"] + float("inf")
        return losses

    with pytest.raises(FloatingPointError, match="distribution sketch"):
        opt.step(closure)


def _nan_gradient_term(model):
    # sqrt(0 * s) has value 0 but gradient 0 * inf = nan: a finite loss with a non-finite gradient.
    return torch.sqrt(0.0 * sum(p.sum() for p in model.parameters()))


@pytest.mark.parametrize("name, make", ALL)
def test_nonfinite_gradient_is_named_and_changes_nothing(name, make):
    model, data, opt = _trained_adam(make)
    snapshot = _snapshot(model, opt)

    def closure():
        losses = [F.cross_entropy(model(x), y) for x, y in data]
        losses[2] = losses[2] + _nan_gradient_term(model)
        return losses

    with pytest.raises(FloatingPointError, match="gradient in distribution 2 at the clean weights"):
        opt.step(closure)
    _assert_unchanged(model, opt, snapshot)


def test_nonfinite_at_the_perturbed_weights_restores_and_names():
    model, data, opt = _trained_adam(lambda ps, **kw: torchsage.SAGE(ps, seed=3, **kw))
    snapshot = _snapshot(model, opt)
    calls = []

    def closure():
        calls.append(1)
        losses = [F.cross_entropy(model(x), y) for x, y in data]
        if len(calls) >= 2:  # only at the perturbed weights (and the diagnostic pass there)
            losses[0] = losses[0] + _nan_gradient_term(model)
        return losses

    with pytest.raises(FloatingPointError, match="gradient in distribution 0 at the perturbed weights"):
        opt.step(closure)
    _assert_unchanged(model, opt, snapshot)


def test_skip_on_nonfinite_returns_a_skipped_step():
    model = small_net()
    data = domains()
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, on_nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        losses = [F.cross_entropy(model(x), y) for x, y in data]
        return [losses[0] * float("nan"), *losses[1:]]

    info = opt.step(closure)
    assert info.skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.step(closure_for(model, data)).skipped


@pytest.mark.parametrize("name, make", ALL)
def test_resume_from_state_dict_reproduces_the_uninterrupted_run(name, make):
    data = domains()
    torch.manual_seed(5)
    model = small_net()
    start = copy.deepcopy(model.state_dict())

    opt = make(model.parameters(), base_optimizer=torch.optim.Adam, lr=1e-2)
    for _ in range(4):
        opt.step(closure_for(model, data))
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(start)
    opt = make(model.parameters(), base_optimizer=torch.optim.Adam, lr=1e-2)
    for _ in range(2):
        opt.step(closure_for(model, data))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    torch.manual_seed(123)  # a different global state must not matter
    resumed_model = small_net()
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model.parameters(), base_optimizer=torch.optim.Adam, lr=1e-2)
    if hasattr(resumed, "seed"):
        resumed.seed = 999  # overwritten by the state
    resumed.load_state_dict(saved["opt"])
    assert len(resumed.state) > 0  # Adam's moments came back
    for _ in range(2):
        resumed.step(closure_for(resumed_model, data))
    for p, q in zip(resumed_model.parameters(), uninterrupted):
        assert torch.equal(p, q)


def test_lr_scheduler_attached_to_the_wrapper_drives_the_base_optimizer():
    model = small_net()
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            opt.step(closure_for(model, domains()))
            scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    state = opt.state_dict()
    assert state["param_groups"][0]["lr"] == pytest.approx(0.025)
    assert state["param_groups"][0]["rho"] == 0.05


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


@pytest.mark.parametrize("update_bn_on_perturbed", [False, True])
def test_batchnorm_statistics_are_not_updated_on_the_perturbed_pass(update_bn_on_perturbed):
    model = BNNet()
    expected = copy.deepcopy(model)
    data = domains()
    opt = torchsage.SAGE(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        model=model,
        update_bn_on_perturbed=update_bn_on_perturbed,
    )
    opt.step(closure_for(model, data))
    with torch.no_grad():
        for x, _ in data:  # what one clean forward pass does to the statistics
            expected(x)
    same = torch.allclose(model.bn.running_mean, expected.bn.running_mean, atol=1e-7)
    assert same != update_bn_on_perturbed
    assert model.bn.track_running_stats
    expected_batches = len(data) * (2 if update_bn_on_perturbed else 1)
    assert int(model.bn.num_batches_tracked) == expected_batches


def test_max_grad_norm_clips_the_descent_gradient():
    w = torch.zeros(10, requires_grad=True)
    target = torch.full((10,), 5.0)
    opt = SAGEAlignmentOnly([w], torch.optim.SGD, gamma=0.0, lr=1.0, max_grad_norm=0.5)
    info = opt.step(lambda: [0.5 * (w - target).square().sum()] * 2)
    assert info.grad_norm == pytest.approx(5.0 * math.sqrt(10))
    assert w.detach().norm().item() == pytest.approx(0.5, rel=1e-6)


def test_parameters_without_gradients_are_left_alone():
    used = nn.Linear(4, 2)
    unused = nn.Linear(4, 2)
    frozen = nn.Linear(4, 2)
    frozen.requires_grad_(False)
    before = [p.detach().clone() for p in [*unused.parameters(), *frozen.parameters()]]
    params = [*used.parameters(), *unused.parameters(), *frozen.parameters()]
    for make in (torchsage.SAGE, torchsage.SAM, SAGEAlign):
        opt = make(params, torch.optim.SGD, lr=0.1, weight_decay=0.1)
        data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
        opt.step(lambda data=data: [F.cross_entropy(used(x), y) for x, y in data])
        for p, b in zip([*unused.parameters(), *frozen.parameters()], before):
            assert torch.equal(p, b)
            assert p.grad is None


def test_list_generator_and_shared_graph_closures_agree():
    data = domains()
    results = []
    for style in ("list", "generator", "shared"):
        torch.manual_seed(0)
        model = small_net()
        opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, gamma=0.01, seed=4)

        def closure(style=style, model=model):
            if style == "list":
                return [F.cross_entropy(model(x), y) for x, y in data]
            if style == "generator":
                return (F.cross_entropy(model(x), y) for x, y in data)
            out = model(torch.cat([x for x, _ in data]))  # one joint forward graph
            return [F.cross_entropy(o, y) for o, (_, y) in zip(out.split(8), data)]

        info = opt.step(closure)
        results.append((info, [p.detach().clone() for p in model.parameters()]))
    (ref_info, ref_params), *others = results
    for info, params in others:
        # the joint forward computes the same float32 losses with other matmul shapes (a few ulp);
        # the disagreement's condition number is a few: 1e-5; one SGD step of lr 0.1: 1e-5 on weights
        assert info.disagreement == pytest.approx(ref_info.disagreement, rel=1e-5)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_single_scalar_closure_means_one_distribution():
    model = small_net()
    x, y = domains(K=1)[0]
    info = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1).step(
        lambda: F.cross_entropy(model(x), y)
    )
    assert info.disagreement == 0.0
    assert info.noise_std == 0.0
    assert len(info.losses) == 1


def test_step_info_reports_the_losses_and_disagreement():
    model = small_net()
    data = domains(K=4)
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, gamma=0.5, disagreement="cosine")
    with torch.no_grad():
        expected_losses = [F.cross_entropy(model(x), y).item() for x, y in data]
    grads = []
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    unit = torch.stack([g / g.norm() for g in grads])
    mean_cos = ((unit @ unit.T).sum() - 4) / 12
    info = opt.step(closure_for(model, data))
    # the same float32 forward: equal up to a few ulp (1.2e-7); the cosine measure from float32
    # gradients against a float64 formula: a 1 - cos of ~0.1 loses a digit to cancellation: 1e-4
    assert info.losses == pytest.approx(expected_losses, rel=1e-6)
    assert info.loss == pytest.approx(sum(expected_losses) / 4, rel=1e-6)
    assert info.disagreement == pytest.approx(1 - float(mean_cos), rel=1e-4)
    assert info.noise_std == pytest.approx(0.5 * info.disagreement)
    assert info.names == ("0", "1", "2", "3")
    assert set(info.as_dict()) >= {"loss", "disagreement", "noise_std", "perturbation_norm"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(gamma=-1.0), "gamma"),
        (dict(gamma=float("inf")), "gamma"),
        (dict(disagreement="euclid"), "disagreement measure"),
        (dict(rho_scaling="spectral"), "rho scaling"),
        (dict(ns_steps=0), "steps"),
        (dict(ns_coefficients="fast"), "coefficients"),
        (dict(polar_method="qr"), "polar method"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_disagreement=-1.0), "max_disagreement"),
        (dict(seed=-3), "seed"),
        (dict(model="net"), "model"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torchsage.SAGE(small_net().parameters(), torch.optim.SGD, **{"lr": 0.1, **kwargs})


def test_invalid_group_options_and_base_optimizer_raise_value_error():
    net = small_net()
    with pytest.raises(ValueError, match="gamma"):
        torchsage.SAGE([{"params": list(net.parameters()), "gamma": -1}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        torchsage.SAM(net.parameters(), nn.Linear, lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer"):
        torchsage.SAM(net.parameters(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        torchsage.ASAM(net.parameters(), torch.optim.SGD, eta=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="lambda_max"):
        SAGEAlign(net.parameters(), torch.optim.SGD, lambda_max=2.0, lr=0.1)
    with pytest.raises(ValueError, match="fixes gamma"):
        SAGECurvatureOnly(net.parameters(), torch.optim.SGD, gamma=0.1, lr=0.1)


def test_invalid_closures_raise_value_error():
    net = small_net()
    x = torch.randn(4, 1, 8, 8)
    opt = torchsage.SAGE(net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="shape"):
        opt.step(lambda: net(x).sum(1))
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: [torch.tensor(1.0)])
    with pytest.raises(ValueError, match="no loss"):
        opt.step(lambda: [])
    with pytest.raises(ValueError, match="closure must return"):
        opt.step(lambda: 3.0)
