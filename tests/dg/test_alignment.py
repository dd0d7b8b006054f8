"""The gradient-alignment baselines (Fish, AND-mask, SAND-mask, IGA, GGA): masks against
coordinate-by-coordinate loops, and one update step of each against its equations written out
here, on a tiny float64 network (helpers and tolerances as in test_baselines.py).
"""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_baselines import LR, assert_weights, batches, build, risks, sgd_step
from torch.func import functional_call, grad

from torchsage.dg.algorithms_alignment import and_mask, min_pairwise_cosine, sand_mask
from torchsage.dg.hparams import default_hparams, random_hparams


def environment_grads(network, data):
    """[env] list of flattened-per-parameter gradients (plain autograd, one env at a time)."""
    out = []
    for x, y in data:
        network.zero_grad()
        F.cross_entropy(network(x), y).backward()
        out.append([p.grad.detach().clone() for p in network.parameters()])
    network.zero_grad()
    return out


def brute_and_mask(g, tau):
    """g: (E, n) numpy array; the AND-mask, one coordinate at a time."""
    n_env, n = g.shape
    mask = np.zeros(n)
    for c in range(n):
        agreement = abs(sum(np.sign(g[e, c]) for e in range(n_env)) / n_env)
        mask[c] = 1.0 if agreement >= tau else 0.0
    return mask * g.mean(0) / (1e-10 + mask.sum() / n)


def brute_sand_mask(g, tau, k):
    n_env, n = g.shape
    mask = np.zeros(n)
    for c in range(n):
        column = g[:, c]
        agreement = abs(np.sign(column).sum() / n_env)
        variance = column.var(ddof=1) if n_env > 1 else 1e-17
        with np.errstate(divide="ignore", invalid="ignore"):
            value = np.tanh(k * (1.0 / variance) * (agreement - tau))
        mask[c] = 1e-17 if np.isnan(value) else max(value, 0.0)
    return mask * g.mean(0) / (1e-10 + mask.sum() / n)


def sample_gradients(rng, n_env=4, n=40):
    g = rng.normal(size=(n_env, n))
    g[:, :5] = np.abs(g[:, :5])  # all agree
    g[:2, 5] = 0.0  # zeros have sign 0
    g[:, 6] = 0.3  # all equal: zero variance, full agreement
    g[:, 7] = [0.3, -0.3, 0.3, -0.3]  # no agreement
    return g


@pytest.mark.parametrize("tau", [0.5, 0.75, 1.0])
def test_and_mask_matches_a_coordinate_loop(tau):
    g = sample_gradients(np.random.default_rng(1))
    got = and_mask(torch.from_numpy(g).reshape(4, 5, 8), tau).reshape(-1).numpy()
    np.testing.assert_allclose(got, brute_and_mask(g, tau), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("tau, k", [(0.5, 10.0), (1.0, 10.0), (0.0, 1e-3), (0.3, 1e5)])
def test_sand_mask_matches_a_coordinate_loop(tau, k):
    g = sample_gradients(np.random.default_rng(2))
    got = sand_mask(torch.from_numpy(g), tau, k).numpy()
    # tanh of the same argument computed as k (a - tau) / v against k (1 / v) (a - tau): ~1e-16
    np.testing.assert_allclose(got, brute_sand_mask(g, tau, k), rtol=1e-12, atol=1e-15)
    one_env = g[:1]
    np.testing.assert_allclose(
        sand_mask(torch.from_numpy(one_env), tau, k).numpy(), brute_sand_mask(one_env, tau, k)
    )


@pytest.mark.parametrize("name, mask", [("ANDMask", "and"), ("SANDMask", "sand")])
def test_masked_steps(name, mask):
    hp = {"tau": 0.6} if mask == "and" else {"tau": 0.4, "k": 50.0}
    algorithm = build(name, **hp)
    data = batches()
    reference = copy.deepcopy(algorithm.network)
    grads = environment_grads(reference, data)
    expected = []
    for i, p in enumerate(reference.parameters()):
        g = np.stack([env[i].reshape(-1).numpy() for env in grads])
        masked = brute_and_mask(g, 0.6) if mask == "and" else brute_sand_mask(g, 0.4, 50.0)
        expected.append(p.detach() - LR * torch.from_numpy(masked).reshape(p.shape))
    algorithm.update(data, 0)
    assert_weights(algorithm, expected)


def test_sand_mask_with_domainbeds_default_tau_does_not_move_the_weights():
    with pytest.warns(UserWarning, match="will not progress"):
        algorithm = build("SANDMask")  # tau = 1.0
    before = [p.detach().clone() for p in algorithm.network.parameters()]
    algorithm.update(batches(), 0)
    for p, b in zip(algorithm.network.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-15)  # 1e-17-masked coordinates at most


def test_iga_step_against_functional_second_derivatives():
    lam = 30.0
    algorithm = build("IGA", penalty=lam)
    data = batches()
    net = copy.deepcopy(algorithm.network)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def env_loss(p, x, y):
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    # the mean gradient is a constant of the penalty
    per_env = [grad(env_loss)(params, x, y) for x, y in data]
    mean = {k: sum(g[k] for g in per_env) / len(data) for k in params}

    def objective(p):
        total = sum(env_loss(p, x, y) for x, y in data) / len(data)
        for x, y in data:
            g = grad(env_loss)(p, x, y)
            total = total + lam * sum(((g[k] - mean[k]) ** 2).sum() for k in p)
        return total

    gradient = grad(objective)(params)
    expected = [params[k] - LR * gradient[k] for k, _ in net.named_parameters()]
    algorithm.update(data, 0)
    # second derivatives through GroupNorm by two autograd routes: a few 1e-15 relative
    assert_weights(algorithm, expected)


def adam(param, g, state, lr=LR, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step on a tensor, by hand (state: m, v, t)."""
    state["t"] += 1
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["v"] = b2 * state["v"] + (1 - b2) * g * g
    m_hat = state["m"] / (1 - b1 ** state["t"])
    v_hat = state["v"] / (1 - b2 ** state["t"])
    return param - lr * m_hat / (v_hat.sqrt() + eps)


def test_fish_meta_update_against_a_hand_loop_over_two_steps():
    meta_lr = 0.3
    algorithm = build("Fish", meta_lr=meta_lr, optimizer="adam")
    steps = [batches(seed=3), batches(seed=4)]
    net = copy.deepcopy(algorithm.network)
    weights = [p.detach().clone() for p in net.parameters()]
    states = [{"t": 0, "m": torch.zeros_like(w), "v": torch.zeros_like(w)} for w in weights]
    for data in steps:
        inner = [w.clone() for w in weights]
        for x, y in data:  # one Adam step per environment, in order, state kept across steps
            with torch.no_grad():
                for p, w in zip(net.parameters(), inner):
                    p.copy_(w)
            g = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
            inner = [adam(w, gi, s) for w, gi, s in zip(inner, g, states)]
        weights = [w + meta_lr * (wi - w) for w, wi in zip(weights, inner)]
    for data in steps:
        algorithm.update(data, 0)
    # Adam's m / sqrt(v) by two float64 formulas: ~1e-15 relative per step
    assert_weights(algorithm, weights)
    assert not any(
        p.grad is not None for p in algorithm.network.parameters()
    )  # moved by the meta-update only


def cosine(a, b):
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_min_pairwise_cosine_against_numpy():
    rng = np.random.default_rng(5)
    vectors = [rng.normal(size=12) for _ in range(4)]
    expected = min(
        a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.combinations(vectors, 2)
    )
    got = min_pairwise_cosine([torch.from_numpy(v) for v in vectors]).item()
    assert np.isclose(got, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="at least two"):
        min_pairwise_cosine([torch.ones(3)])


def flat_cosine_and_loss(net, data):
    grads = environment_grads(net, data)
    flat = [np.concatenate([g.reshape(-1).numpy() for g in env]) for env in grads]
    worst = min(cosine(a, b) for a, b in itertools.combinations(flat, 2))
    return worst, risks(net, data).mean().item()


def test_gga_search_then_erm_step_against_a_hand_walk():
    moves, radius, tolerance = 12, 0.05, 0.1
    algorithm = build(
        "GGA",
        gga_start_step=3,
        gga_end_step=4,
        gga_search_steps=moves,
        gga_neighborhood=radius,
        gga_loss_tolerance=tolerance,
    )
    data = batches()
    net = copy.deepcopy(algorithm.network)
    torch.manual_seed(21)
    logged = algorithm.update(data, 4)

    torch.manual_seed(21)
    start = [p.detach().clone() for p in net.parameters()]
    best, (best_cosine, best_loss), accepted = start, flat_cosine_and_loss(net, data), 0
    for _ in range(moves):
        with torch.no_grad():
            for p in net.parameters():
                p += (torch.rand(p.shape, dtype=p.dtype) * 2 - 1) * radius
        worst, loss = flat_cosine_and_loss(net, data)
        if loss - best_loss < tolerance and worst > best_cosine:
            best_cosine, best_loss, accepted = worst, loss, accepted + 1
            best = [p.detach().clone() for p in net.parameters()]
            with torch.no_grad():
                for p, s in zip(net.parameters(), start):
                    p.copy_(s)
    with torch.no_grad():
        for p, b in zip(net.parameters(), best):
            p.copy_(b)
    assert 0 < accepted < moves  # the walk both accepts and rejects: the test sees both branches
    assert logged["gga_accepted"] == accepted and np.isclose(logged["gga_alignment"], best_cosine, rtol=1e-10)
    assert_weights(algorithm, sgd_step(net, lambda n: risks(n, data).mean()))


@pytest.mark.parametrize("step, tolerance", [(2, 0.1), (5, 0.1), (3, -1e9)])
def test_gga_outside_its_window_or_without_acceptance_is_one_erm_step(step, tolerance):
    algorithm = build(  # tolerance -1e9: every move is rejected
        "GGA",
        gga_start_step=3,
        gga_end_step=4,
        gga_search_steps=4,
        gga_neighborhood=0.05,
        gga_loss_tolerance=tolerance,
    )
    data = batches()
    expected = sgd_step(copy.deepcopy(algorithm.network), lambda n: risks(n, data).mean())
    logged = algorithm.update(data, step)
    assert_weights(algorithm, expected)  # a rejected search leaves no weight perturbed
    assert ("gga_accepted" in logged) == (step == 3)


def test_gga_needs_two_environments():
    with pytest.raises(ValueError, match="2\\+ training environments, got 1"):
        build("GGA", num_domains=1)


def test_hparams_of_the_alignment_family():
    assert default_hparams("Fish", "PACS")["meta_lr"] == 0.5
    assert default_hparams("ANDMask", "PACS")["tau"] == 1.0
    assert default_hparams("SANDMask", "PACS").items() >= {"tau": 1.0, "k": 10.0}.items()
    assert default_hparams("IGA", "PACS")["penalty"] == 1000.0
    gga = {"gga_start_step": 100, "gga_end_step": 150, "gga_search_steps": 250, "gga_neighborhood": 1e-6}
    assert default_hparams("GGA", "PACS").items() >= gga.items()
    for seed in range(1, 30):
        assert random_hparams("Fish", "PACS", seed)["meta_lr"] in (0.05, 0.1, 0.5)
        assert 0.5 <= random_hparams("ANDMask", "PACS", seed)["tau"] <= 1.0
        sand = random_hparams("SANDMask", "PACS", seed)
        assert 0.0 <= sand["tau"] <= 1.0 and 1e-3 <= sand["k"] <= 1e5
        assert 10 <= random_hparams("IGA", "PACS", seed)["penalty"] <= 1e5
        assert random_hparams("GGA", "PACS", seed).items() >= gga.items()  # no search space
