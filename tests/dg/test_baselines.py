"""DomainBed's classic baselines (IRM, VREx, GroupDRO, Mixup, MMD): one update step of each
against its equations written out here, on a tiny float64 network.

Every step uses SGD (momentum 0.9, no weight decay), whose first step is exactly
``w - lr * grad``; the reference gradient comes from a copy of the network taken before the step.
The two gradients follow different float64 formulas of the same quantity (a few hundred terms of
size O(1)), so they agree to ~1e-14 relative; 1e-10 leaves room without hiding a wrong term.
"""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchsage.dg.algorithms import ALGORITHMS, gaussian_mmd, irm_penalty, mixup_pairs
from torchsage.dg.hparams import default_hparams, random_hparams

LR = 0.1
TOL = dict(rtol=1e-10, atol=1e-12)


def build(name, num_domains=3, **overrides):
    hparams = default_hparams(name, "RotatedDigits") | {"cnn_width": 8, "optimizer": "sgd", "lr": LR}
    return ALGORITHMS[name]((1, 6, 6), 3, num_domains, hparams | overrides).double()


def batches(n_envs=3, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=g),
        )
        for _ in range(n_envs)
    ]


def sgd_step(network, objective):
    """The weights after one plain gradient step on ``objective(network)`` (network unchanged)."""
    params = list(network.parameters())
    grads = torch.autograd.grad(objective(network), params)
    return [(p - LR * g).detach() for p, g in zip(params, grads)]


def assert_weights(algorithm, expected):
    for p, e in zip(algorithm.network.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, **TOL)


def risks(network, minibatches):
    return torch.stack([F.cross_entropy(network(x), y) for x, y in minibatches])


def scale_derivative(logits, labels):
    """d/ds CE(s z, y) at s = 1, in closed form: mean_i (sum_c softmax(z_i)_c z_ic - z_i,y_i)."""
    expected_logit = (logits.softmax(1) * logits).sum(1)
    return (expected_logit - logits.gather(1, labels[:, None])[:, 0]).mean()


def test_irm_penalty_is_the_product_of_the_closed_form_scale_derivatives():
    logits = torch.randn(9, 4, dtype=torch.float64)
    labels = torch.randint(0, 4, (9,))
    expected = scale_derivative(logits[::2], labels[::2]) * scale_derivative(logits[1::2], labels[1::2])
    torch.testing.assert_close(irm_penalty(logits, labels), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("step, weight", [(0, 1.0), (3, 1.0), (5, 250.0), (9, 250.0)])
def test_irm_step(step, weight):
    algorithm = build("IRM", irm_lambda=250.0, irm_penalty_anneal_iters=5)
    data = batches()

    def objective(net):
        penalties = []
        for x, y in data:
            z = net(x)
            penalties.append(scale_derivative(z[::2], y[::2]) * scale_derivative(z[1::2], y[1::2]))
        return risks(net, data).mean() + weight * torch.stack(penalties).mean()

    expected = sgd_step(copy.deepcopy(algorithm.network), objective)
    logged = algorithm.update(data, step)
    assert_weights(algorithm, expected)
    assert logged["penalty"] != 0.0


def test_irm_and_vrex_restart_the_optimizer_when_the_penalty_switches_on():
    for name, prefix in (("IRM", "irm"), ("VREx", "vrex")):
        algorithm = build(name, **{f"{prefix}_penalty_anneal_iters": 1})
        data = batches()
        algorithm.update(data, 0)
        first = algorithm.optimizer
        assert first.state  # momentum buffers after one step
        algorithm.update(data, 1)
        assert algorithm.optimizer is not first
        algorithm.update(data, 2)


@pytest.mark.parametrize("step, weight", [(0, 1.0), (7, 40.0)])
def test_vrex_step(step, weight):
    algorithm = build("VREx", vrex_lambda=40.0, vrex_penalty_anneal_iters=7)
    data = batches()

    def objective(net):
        r = risks(net, data)
        # variance as the mean squared difference over ordered pairs, halved
        variance = sum((r[i] - r[j]) ** 2 for i in range(3) for j in range(3)) / (2 * 3**2)
        return r.mean() + weight * variance

    expected = sgd_step(copy.deepcopy(algorithm.network), objective)
    algorithm.update(data, step)
    assert_weights(algorithm, expected)


def test_groupdro_weights_follow_the_exponentiated_gradient_and_weight_the_step():
    eta = 0.7
    algorithm = build("GroupDRO", groupdro_eta=eta)
    first, second = batches(seed=1), batches(seed=2)

    net0 = copy.deepcopy(algorithm.network)
    r1 = risks(net0, first).detach().numpy()
    q1 = np.exp(eta * r1) / np.exp(eta * r1).sum()
    params0 = list(net0.parameters())
    g1 = torch.autograd.grad((torch.from_numpy(q1) * risks(net0, first)).sum(), params0)
    algorithm.update(first, 0)
    np.testing.assert_allclose(algorithm.q.numpy(), q1, rtol=1e-12)
    assert_weights(algorithm, [(p - LR * g).detach() for p, g in zip(params0, g1)])

    net1 = copy.deepcopy(algorithm.network)
    r2 = risks(net1, second).detach().numpy()
    q2 = np.exp(eta * (r1 + r2)) / np.exp(eta * (r1 + r2)).sum()  # the product of both updates
    params1 = list(net1.parameters())
    g2 = torch.autograd.grad((torch.from_numpy(q2) * risks(net1, second)).sum(), params1)
    algorithm.update(second, 1)
    np.testing.assert_allclose(algorithm.q.numpy(), q2, rtol=1e-12)
    # second SGD step: the momentum buffer is 0.9 g1 + g2
    assert_weights(algorithm, [(p - LR * (0.9 * a + b)).detach() for p, a, b in zip(params1, g1, g2)])


def test_groupdro_refuses_a_different_number_of_environments():
    with pytest.raises(ValueError, match="3 environments, got 2"):
        build("GroupDRO").update(batches(n_envs=2), 0)


def test_mixup_step_replays_its_documented_draws():
    alpha = 0.4
    algorithm = build("Mixup", mixup_alpha=alpha)
    data = batches()
    reference = copy.deepcopy(algorithm.network)
    torch.manual_seed(11)
    algorithm.update(data, 0)

    torch.manual_seed(11)
    order = torch.randperm(3).tolist()
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    lams = [float(beta.sample()) for _ in range(3)]

    def objective(net):
        total = 0.0
        for k in range(3):
            (xa, ya), (xb, yb) = data[order[k]], data[order[(k + 1) % 3]]
            mixed = net(lams[k] * xa + (1 - lams[k]) * xb)
            total = total + lams[k] * F.cross_entropy(mixed, ya) + (1 - lams[k]) * F.cross_entropy(mixed, yb)
        return total / 3

    assert_weights(algorithm, sgd_step(reference, objective))


def test_mixup_pairs_are_cyclic_and_cut_to_the_shorter_batch():
    data = [(torch.zeros(n, 1), torch.full((n,), n)) for n in (4, 2, 3)]
    pairs = mixup_pairs(data, [2, 0, 1])
    summary = [(len(a[0]), a[1][0].item(), b[1][0].item()) for a, b in pairs]
    assert summary == [(3, 3, 4), (2, 4, 2), (2, 2, 3)]


def test_gaussian_mmd_matches_a_brute_force_double_sum():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(7, 4)), rng.normal(size=(5, 4)) * 0.5 + 0.3
    gammas = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)

    def kernel_mean(u, v):
        total = 0.0
        for i, j in itertools.product(range(len(u)), range(len(v))):
            total += sum(np.exp(-g * np.sum((u[i] - v[j]) ** 2)) for g in gammas)
        return total / (len(u) * len(v))

    expected = kernel_mean(a, a) + kernel_mean(b, b) - 2 * kernel_mean(a, b)
    # the code expands ||u - v||^2 = |u|^2 + |v|^2 - 2 u.v: an absolute error ~1e-15 |u|^2 in the
    # exponent, times gamma <= 1000, so ~1e-11 relative on each kernel value
    got = gaussian_mmd(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert np.isclose(got, expected, rtol=1e-9, atol=1e-12)
    assert abs(gaussian_mmd(torch.from_numpy(a), torch.from_numpy(a)).item()) < 1e-12


def test_mmd_step():
    algorithm = build("MMD", mmd_gamma=3.0)
    data = batches()

    def mmd(u, v):
        def k(s, t):
            squared = (s[:, None, :] - t[None, :, :]).square().sum(-1)
            return sum(torch.exp(-g * squared) for g in (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)).mean()

        return k(u, u) + k(v, v) - 2 * k(u, v)

    def objective(net):
        feats = [net[0](x) for x, _ in data]
        penalty = sum(mmd(feats[i], feats[j]) for i, j in itertools.combinations(range(3), 2)) / 3
        return risks(net, data).mean() + 3.0 * penalty

    expected = sgd_step(copy.deepcopy(algorithm.network), objective)
    algorithm.update(data, 0)
    assert_weights(algorithm, expected)


def test_hparams_of_the_classics_follow_domainbed():
    defaults = {
        "IRM": {"irm_lambda": 1e2, "irm_penalty_anneal_iters": 500},
        "VREx": {"vrex_lambda": 1e1, "vrex_penalty_anneal_iters": 500},
        "GroupDRO": {"groupdro_eta": 1e-2},
        "Mixup": {"mixup_alpha": 0.2},
        "MMD": {"mmd_gamma": 1.0},
    }
    for name, values in defaults.items():
        assert default_hparams(name, "PACS").items() >= values.items()
    for seed in range(1, 30):
        irm = random_hparams("IRM", "PACS", seed)
        assert 0.1 <= irm["irm_lambda"] <= 1e5 and 1 <= irm["irm_penalty_anneal_iters"] < 1e4
        vrex = random_hparams("VREx", "PACS", seed)
        assert 0.1 <= vrex["vrex_lambda"] <= 1e5 and isinstance(vrex["vrex_penalty_anneal_iters"], int)
        assert 1e-3 <= random_hparams("GroupDRO", "PACS", seed)["groupdro_eta"] <= 0.1
        assert 0.1 <= random_hparams("Mixup", "PACS", seed)["mixup_alpha"] <= 10
        assert 0.1 <= random_hparams("MMD", "PACS", seed)["mmd_gamma"] <= 10
