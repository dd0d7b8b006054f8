"""SAGE's descent noise: isotropic, zero-mean, standard deviation gamma * disagreement."""

import pytest
import torch

import torchsage
from torchsage.optim import SAGEAlignmentOnly


def linear_problem(K=3, n=200_000):
    # L_k(w) = <a_k, w>: constant gradients a_k, so the disagreement is known in closed form.
    w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    a = torch.randn(K, n, dtype=torch.float64) * 0.01 + torch.linspace(0, 1, n, dtype=torch.float64)
    return w, a, lambda: [(ak * w).sum() for ak in a]


def brute_force(a, measure):
    g_bar = a.mean(0)
    var = (a - g_bar).square().sum(1).mean()
    if measure == "normalized_std":
        return float(var.sqrt() / g_bar.norm())
    if measure == "raw_std":
        return float(var.sqrt())
    if measure == "cosine":
        u = a / a.norm(dim=1, keepdim=True)
        K = len(a)
        return float(1 - ((u @ u.T).sum() - K) / (K * (K - 1)))
    raise AssertionError(measure)


@pytest.mark.parametrize("measure", ["normalized_std", "raw_std", "cosine"])
def test_noise_std_is_gamma_times_disagreement(measure):
    w, a, closure = linear_problem()
    gamma = 3.0
    opt = SAGEAlignmentOnly([w], torch.optim.SGD, gamma=gamma, lr=1.0, disagreement=measure, seed=0)
    info = opt.step(closure)
    noise = -w.detach() - a.mean(0)  # w_new = 0 - (g_bar + noise)
    expected = gamma * brute_force(a, measure)
    assert info.disagreement == pytest.approx(brute_force(a, measure), rel=1e-9)
    assert info.noise_std == pytest.approx(expected, rel=1e-9)
    # 200k samples: the empirical std is within ~0.3% of the truth (4 sigma).
    assert noise.std().item() == pytest.approx(expected, rel=0.006)
    assert abs(noise.mean().item()) < 4 * expected / len(noise) ** 0.5


def test_max_disagreement_clips_the_noise():
    w, a, closure = linear_problem()
    d = brute_force(a, "normalized_std")
    opt = SAGEAlignmentOnly([w], torch.optim.SGD, gamma=1.0, lr=1.0, max_disagreement=d / 2, seed=0)
    info = opt.step(closure)
    noise = -w.detach() - a.mean(0)
    assert info.disagreement == pytest.approx(d / 2)
    assert noise.std().item() == pytest.approx(d / 2, rel=0.006)


def test_noise_is_reproducible_from_the_seed_and_differs_across_seeds():
    def run(seed):
        torch.manual_seed(0)  # the same problem every time; only the noise seed varies
        w, _, closure = linear_problem(n=1000)
        SAGEAlignmentOnly([w], torch.optim.SGD, gamma=1.0, lr=1.0, seed=seed).step(closure)
        return w.detach().clone()

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_identical_distributions_get_no_noise():
    w = torch.zeros(50, requires_grad=True)
    target = torch.randn(50)
    opt = torchsage.SAGE([w], torch.optim.SGD, rho=0.0, gamma=10.0, lr=1.0)
    info = opt.step(lambda: [0.5 * (w - target).square().sum()] * 4)
    assert info.disagreement == 0.0
    torch.testing.assert_close(w.detach(), target)


def test_groups_have_their_own_gamma():
    w1 = torch.zeros(20_000, dtype=torch.float64, requires_grad=True)
    w2 = torch.zeros(20_000, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 40_000, dtype=torch.float64)
    opt = SAGEAlignmentOnly(
        [{"params": [w1], "gamma": 2.0}, {"params": [w2], "gamma": 0.0}], torch.optim.SGD, lr=1.0, seed=0
    )
    info = opt.step(lambda: [(ak * torch.cat([w1, w2])).sum() for ak in a])
    g_bar = a.mean(0)
    torch.testing.assert_close(-w2.detach(), g_bar[20_000:])
    noise1 = -w1.detach() - g_bar[:20_000]
    assert noise1.std().item() == pytest.approx(2.0 * info.disagreement, rel=0.03)


def test_default_seed_follows_manual_seed_without_consuming_random_numbers():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    opt = torchsage.SAGE([torch.zeros(2, requires_grad=True)], torch.optim.SGD, lr=0.1)
    assert torch.equal(torch.rand(3), expected)
    assert opt.seed == 11
