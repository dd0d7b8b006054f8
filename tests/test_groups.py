"""``group_losses`` against a brute-force computation with Python loops, and inside a SAGE step."""

import math

import pytest
import torch
import torch.nn.functional as F

import torchsage

F64 = torch.float64


def brute_force(losses: list[float], ids: list, groups: list, weighting: str) -> dict[str, float]:
    """Each requested group present in the batch: the mean of its samples' losses (times K n_k / N
    for "count"), by explicit loops."""
    present = [g for g in groups if any(i == g for i in ids)]
    K, N = len(present), len(ids)
    out = {}
    for g in present:
        total, n = 0.0, 0
        for loss, i in zip(losses, ids):
            if i == g:
                total += loss
                n += 1
        mean = total / n
        out[str(g)] = mean * K * n / N if weighting == "count" else mean
    return out


# Both sides sum at most N = 40 float64 terms of size < 10 in different orders: rounding is below
# 40 * 10 * 2**-52 ~ 1e-13; the factor K n_k / N adds one more rounding.
TOL = dict(rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("weighting", ["uniform", "count"])
@pytest.mark.parametrize("seed", range(5))
def test_values_match_brute_force_with_absent_groups(weighting, seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    ids = torch.randint(0, 6, (n,), generator=g) * 2  # ids 0, 2, ..., 10: odd ids are never present
    loss = torch.rand(n, generator=g, dtype=F64) * 10
    groups = list(range(12))
    got = torchsage.group_losses(loss, ids, groups, weighting=weighting)
    expected = brute_force(loss.tolist(), ids.tolist(), groups, weighting)
    assert list(got) == list(expected)  # the order of groups, absent ones left out
    for name, value in expected.items():
        assert math.isclose(got[name].item(), value, **TOL), name


@pytest.mark.parametrize("weighting", ["uniform", "count"])
def test_gradients_match_brute_force(weighting):
    ids = [3, 1, 3, 3, 7, 1]
    loss = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0], dtype=F64, requires_grad=True)
    out = torchsage.group_losses(loss, torch.tensor(ids), weighting=weighting)
    assert list(out) == ["1", "3", "7"]  # groups=None: the ids present, sorted
    for name, value in out.items():
        (grad,) = torch.autograd.grad(value, loss, retain_graph=True)
        n_k = ids.count(int(name))
        scale = 3 * n_k / len(ids) if weighting == "count" else 1.0
        expected = [scale / n_k if i == int(name) else 0.0 for i in ids]
        assert grad.tolist() == pytest.approx(expected, rel=1e-15, abs=0)


def test_count_weighting_mean_is_the_per_sample_mean():
    g = torch.Generator().manual_seed(1)
    loss = torch.rand(37, generator=g, dtype=F64)
    ids = torch.randint(0, 4, (37,), generator=g)
    out = torchsage.group_losses(loss, ids, weighting="count")
    assert torch.stack(list(out.values())).mean().item() == pytest.approx(loss.mean().item(), rel=1e-13)
    uniform = torchsage.group_losses(loss, ids)
    per_group = [loss[ids == k].mean().item() for k in range(4) if (ids == k).any()]
    assert torch.stack(list(uniform.values())).mean().item() == pytest.approx(
        sum(per_group) / len(per_group), rel=1e-13
    )


@pytest.mark.parametrize("weighting", ["uniform", "count"])
def test_single_group(weighting):
    loss = torch.tensor([1.0, 2.0, 6.0], dtype=F64)
    out = torchsage.group_losses(loss, torch.tensor([4, 4, 4]), [2, 4, 9], weighting=weighting)
    assert list(out) == ["4"]
    assert out["4"].item() == pytest.approx(3.0, rel=1e-15)  # K = 1 and n_k = N: both weightings agree


def test_labels_and_names():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = torchsage.group_losses(loss, ["art", "photo", "art", "sketch"])
    assert list(out) == ["art", "photo", "sketch"]  # order of first appearance
    assert [v.item() for v in out.values()] == [2.0, 2.0, 4.0]
    named = torchsage.group_losses(loss, torch.tensor([0, 1, 0, 1]), {1: "photo", 0: "art", 5: "cartoon"})
    assert list(named) == ["photo", "art"]
    assert [v.item() for v in named.values()] == [3.0, 2.0]


def test_absent_error_names_the_missing_groups():
    loss = torch.ones(4)
    with pytest.raises(ValueError, match=r"groups \[1, 3\] have no sample in this batch"):
        torchsage.group_losses(loss, torch.tensor([0, 0, 2, 2]), [0, 1, 2, 3], absent="error")
    out = torchsage.group_losses(loss, torch.tensor([0, 1, 2, 3]), [0, 1, 2, 3], absent="error")
    assert list(out) == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("loss", "ids", "kwargs", "message"),
    [
        (torch.ones(4, 2), torch.zeros(4, dtype=torch.long), {}, "reduction='none'"),
        (torch.ones(()), torch.zeros(1, dtype=torch.long), {}, r"shape \(N,\)"),
        (torch.ones(0), torch.zeros(0, dtype=torch.long), {}, "the batch is empty"),
        (torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), {}, "floating-point"),
        (torch.ones(4), torch.zeros(3, dtype=torch.long), {}, r"one id per sample, shape \(4,\)"),
        (torch.ones(4), torch.zeros(4), {}, "integer ids"),
        (torch.ones(4), [0, 1, 2], {}, r"one id per sample \(4\)"),
        (torch.ones(2), torch.tensor([0, 5]), {"groups": [0, 1]}, r"groups \[5\] that are not in groups"),
        (torch.ones(2), torch.tensor([0, 1]), {"groups": ["a"]}, "must be integers"),
        (torch.ones(2), torch.tensor([0, 1]), {"groups": [0, 0, 1]}, "lists an id twice"),
        (torch.ones(2), [1, "1"], {}, "the same name"),
        (torch.ones(2), torch.tensor([0, 1]), {"weighting": "size"}, "weighting must be one of"),
        (torch.ones(2), torch.tensor([0, 1]), {"absent": "nan"}, "absent must be one of"),
    ],
)
def test_bad_input(loss, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        torchsage.group_losses(loss, ids, **kwargs)


def _masked(loss: torch.Tensor, ids: torch.Tensor, groups) -> dict[str, torch.Tensor]:
    """The hand-written grouping: one boolean mask per group present."""
    return {str(g): loss[ids == g].mean() for g in groups if (ids == g).any()}


@pytest.mark.parametrize("absent_domain", [False, True])
def test_sage_step_on_a_mixed_batch_equals_the_hand_grouped_step(absent_domain):
    torch.manual_seed(0)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    ids = torch.randint(0, 3, (24,))
    if absent_domain:
        ids[ids == 1] = 2  # domain 1 has no sample: the step must use domains 0 and 2 only
    weights = []
    for grouping in (torchsage.group_losses, _masked):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.1, seed=0, lr=0.1)

        def closure(model=model, grouping=grouping):
            return grouping(F.cross_entropy(model(x), y, reduction="none"), ids, [0, 1, 2])

        info = opt.step(closure)
        assert info.names == (("0", "2") if absent_domain else ("0", "1", "2"))
        assert all(math.isfinite(v) for v in info.losses) and info.disagreement > 0
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    # Same gradients (d mean / d loss_i = 1 / n_k either way); the losses differ only in the
    # summation order (float32, 24 terms of size ~1), which reaches the weights through nothing.
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_counts_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 5, (30,), generator=g) * 3).tolist()  # ids 0, 3, ..., 12
    groups = list(range(14))
    expected = [sum(1 for i in ids if i == k) for k in groups if k in ids]
    assert torchsage.group_counts(torch.tensor(ids), groups) == expected
    assert torchsage.group_counts([str(i) for i in ids], [str(k) for k in groups]) == expected
    named = torchsage.group_losses(torch.ones(30), torch.tensor(ids), groups)
    assert list(named) == [str(k) for k in groups if k in ids]  # the same order as group_losses
    with pytest.raises(ValueError, match="have no sample in this batch"):
        torchsage.group_counts(torch.tensor(ids), groups, absent="error")


def _sgd_on_the_per_sample_mean(x, y):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("how", ["count", "weights"])
def test_count_weighting_descends_on_the_per_sample_mean(how):
    """rho = gamma = 0: the step is SGD on the optimizer's mean, which either way of weighting by
    counts makes the batch's per-sample mean."""
    torch.manual_seed(0)
    x, y, ids = torch.randn(30, 5), torch.randint(0, 3, (30,)), torch.tensor([0] * 4 + [1] * 20 + [2] * 6)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.0, gamma=0.0, lr=0.1)
    with torch.no_grad():
        plain_loss = F.cross_entropy(model(x), y).item()

    def closure():
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        return torchsage.group_losses(per_sample, ids, weighting="count" if how == "count" else "uniform")

    info = opt.step(closure, weights=torchsage.group_counts(ids) if how == "weights" else None)
    # float32 sums of 30 terms of size ~1 in different orders: a few 1e-7.
    assert info.loss == pytest.approx(plain_loss, rel=1e-6)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, _sgd_on_the_per_sample_mean(x, y), rtol=1e-6, atol=1e-6)


def test_count_scaling_and_step_weights_take_the_same_sage_step_without_noise():
    """With gamma = 0 the disagreement is not used: both ways give the same mean gradient, the
    same ascent and the same perturbed mean loss, so the same step."""
    torch.manual_seed(0)
    x, y, ids = torch.randn(30, 5), torch.randint(0, 3, (30,)), torch.tensor([0] * 4 + [1] * 20 + [2] * 6)
    weights = []
    for how in ("count", "weights"):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.1, gamma=0.0, lr=0.1)

        def closure(model=model, how=how):
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            return torchsage.group_losses(per_sample, ids, weighting="count" if how == "count" else "uniform")

        opt.step(closure, weights=torchsage.group_counts(ids) if how == "weights" else None)
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-6)


def test_step_without_closure_says_what_to_do():
    model = torch.nn.Linear(2, 1)
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with pytest.raises(ValueError, match=r"SAGE.step needs a closure: optimizer.step\(closure\)") as e:
        opt.step()
    assert "torchsage.group_losses" in str(e.value) and "docs/integrations.md" in str(e.value)


def test_an_empty_distribution_does_not_read_like_divergence():
    model = torch.nn.Linear(3, 2)
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    ids = torch.tensor([0, 0, 2, 2])

    def closure():  # the hand-written grouping: domain 1 is empty, its mean is nan
        loss = F.cross_entropy(model(x), y, reduction="none")
        return {str(k): loss[ids == k].mean() for k in range(3)}

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"distribution 1 is nan with a zero gradient .* no sample"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_diverged_distribution_still_reads_as_non_finite():
    model = torch.nn.Linear(3, 2)
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    x = torch.randn(4, 3)

    def closure():
        out = model(x).square().mean(1)
        return [out[:2].mean(), (out[2:] * float("nan")).mean()]

    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) in distribution 1"):
        opt.step(closure)
