"""Gradient accumulation (torchsage.MicroBatches): a batch given in micro-batches takes the step of
the whole batch, with one micro-batch's graph alive at a time.

Precision and tolerance. The model and data are float64 and the Newton-Schulz iteration runs in
float64, so the micro-batched and the whole-batch steps differ only in the order of the float64
sums of the gradients (each rounding at ~1e-16 relative); three steps through the polar factor
(five quintic steps, each amplifying at most a few hundred-fold) stay below 1e-10. A wrong weighting
of the micro-batches moves the weights by 1e-3 or more (asserted below), far outside.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsage
from torchsage.amp import scaled_step

F64 = torch.float64
K, N = 3, 12  # distributions, samples per distribution in the whole batch


def _data():
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(N, 5, generator=gen, dtype=F64) * (1 + k) + k, torch.randint(0, 3, (N,), generator=gen))
        for k in range(K)
    ]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def _optimizer(cls, model, **kw):
    if cls is torchsage.SAGE:
        kw = dict(gamma=0.05, seed=7, ns_dtype=F64, **kw)
    return cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)


def _whole(model, data):
    return lambda: [F.cross_entropy(model(x), y) for x, y in data]


def _micro(model, data, cuts):
    """Micro-batches of the rows ``cuts[m]:cuts[m+1]`` of every distribution."""
    spans = list(itertools.pairwise(cuts))

    def closure(a, b):
        return lambda: [F.cross_entropy(model(x[a:b]), y[a:b]) for x, y in data]

    sizes = [[b - a] * K for a, b in spans]
    return torchsage.MicroBatches([closure(a, b) for a, b in spans], sizes=sizes)


def _run(cls, make_closure, steps=3, weights=None, **kw):
    model = _model()
    opt = _optimizer(cls, model, **kw)
    data = _data()
    infos = [opt.step(make_closure(model, data), weights=weights) for _ in range(steps)]
    return model, infos


def _brute_force_disagreement(model, data):
    """normalized_std of the whole-batch per-distribution gradients, from plain autograd."""
    rows = []
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(rows)
    mean = g.mean(0)
    return float((g - mean).square().sum(1).mean().sqrt() / mean.norm())


ALL = [torchsage.SAGE, torchsage.SAM, torchsage.ASAM, torchsage.SAGM, torchsage.GSAM, torchsage.SAGEAlign]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("cuts", [(0, 6, 12), (0, 1, 5, 12)])  # equal halves; unequal thirds
def test_micro_batches_take_the_whole_batch_step(cls, cuts):
    whole, whole_infos = _run(cls, _whole)
    micro, micro_infos = _run(cls, lambda m, d: _micro(m, d, list(cuts)))
    for p, q in zip(micro.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    for a, b in zip(micro_infos, whole_infos):
        assert a.losses == pytest.approx(b.losses, rel=1e-12)
        assert a.disagreement == pytest.approx(b.disagreement, rel=1e-10, nan_ok=True)
        assert a.perturbed_loss == pytest.approx(b.perturbed_loss, rel=1e-12)
    # the weights moved far beyond the tolerance, so a wrongly weighted micro-batch would show
    start = _model()
    assert (
        max(float((p - q).detach().abs().max()) for p, q in zip(whole.parameters(), start.parameters()))
        > 1e-2
    )


def test_disagreement_is_the_whole_batches_not_a_micro_batches():
    model = _model()
    expected = _brute_force_disagreement(model, _data())
    first_half = _brute_force_disagreement(model, [(x[:6], y[:6]) for x, y in _data()])
    assert abs(first_half - expected) > 1e-2  # a micro-batch's disagreement is another number
    opt = _optimizer(torchsage.SAGE, model)
    info = opt.step(_micro(model, _data(), [0, 4, 8, 12]))
    # float64 gradients summed in another order (1e-16 relative), then streamed statistics against
    # a two-pass formula: the deviations g_k - mean cancel at most a thousand-fold here: 1e-9
    assert info.disagreement == pytest.approx(expected, rel=1e-9)


def test_weights_and_distributions_absent_from_a_micro_batch():
    # distribution 2's samples all sit in micro-batch 1; the per-distribution weights apply as usual
    data = _data()
    weights = [1.0, 3.0, 2.0]

    def micro(model, data):
        (x0, y0), (x1, y1), (x2, y2) = data

        def first():
            return {
                "a": F.cross_entropy(model(x0[:5]), y0[:5]),
                "b": F.cross_entropy(model(x1[:2]), y1[:2]),
            }

        def second():
            return {
                "a": F.cross_entropy(model(x0[5:]), y0[5:]),
                "b": F.cross_entropy(model(x1[2:]), y1[2:]),
                "c": F.cross_entropy(model(x2), y2),
            }

        sizes = [{"a": 5, "b": 2}, {"a": N - 5, "b": N - 2, "c": N}]
        return torchsage.MicroBatches([first, second], sizes=sizes)

    def named_whole(model, data):
        return lambda: dict(zip("abc", _whole(model, data)()))

    for cls in (torchsage.SAGE, torchsage.SAM):
        whole, whole_infos = _run(cls, named_whole, weights=weights)
        micro_model, micro_infos = _run(cls, micro, weights=weights)
        for p, q in zip(micro_model.parameters(), whole.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert micro_infos[-1].names == ("a", "b", "c")
        assert micro_infos[-1].loss == pytest.approx(whole_infos[-1].loss, rel=1e-12)
    del data


class _SavedBytes:
    """Counts the bytes of activations autograd holds alive (parameters excluded), and the peak."""

    def __init__(self, params):
        self.params = {p.data_ptr() for p in params}
        self.alive = self.peak = 0

    def pack(self, t):
        size = 0 if t.data_ptr() in self.params else t.numel() * t.element_size()
        # detached: a saved output that kept its grad_fn would tie the graph in a cycle and leak
        return _Held(self, t.detach(), size)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, counter, tensor, size):
        self.counter, self.tensor, self.size = counter, tensor, size
        counter.alive += size
        counter.peak = max(counter.peak, counter.alive)

    def __del__(self):
        self.counter.alive -= self.size


@pytest.mark.parametrize("cls", [torchsage.SAGE, torchsage.SAM])
def test_one_micro_batch_graph_alive_at_a_time(cls):
    peaks = {}
    for m in (1, 4):
        model = _model()
        opt = _optimizer(cls, model)
        counter = _SavedBytes(model.parameters())
        closure = _micro(model, _data(), list(range(0, N + 1, N // m)))
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            opt.step(closure)
        peaks[m] = counter.peak
    # every saved activation has one row per sample (inputs, tanh outputs, log-probabilities,
    # targets): a quarter of the rows holds a quarter of the bytes, up to the 0-d tensors the loss
    # saves (8 bytes each)
    assert peaks[1] > 0
    assert peaks[4] <= peaks[1] / 4 + 64


def test_loss_scaling_with_micro_batches_equals_the_plain_step():
    # a power-of-two scale multiplies and divides exactly: the scaled step is the plain one
    whole, _ = _run(torchsage.SAGE, lambda m, d: _micro(m, d, [0, 6, 12]))
    model = _model()
    opt = _optimizer(torchsage.SAGE, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        info = scaled_step(opt, _micro(model, _data(), [0, 6, 12]), scaler)
        scaler.update()
    assert not info.skipped
    for p, q in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_nonfinite_micro_batch_names_the_distribution_and_leaves_weights():
    model = _model()
    opt = _optimizer(torchsage.SAGE, model)
    data = _data()
    before = [p.detach().clone() for p in model.parameters()]

    def poisoned():
        scale = [1.0, float("nan"), 1.0]
        return [F.cross_entropy(model(x[6:]), y[6:]) * s for s, (x, y) in zip(scale, data)]

    good = lambda: [F.cross_entropy(model(x[:6]), y[:6]) for x, y in data]  # noqa: E731
    with pytest.raises(FloatingPointError, match="distribution 1"):
        opt.step(torchsage.MicroBatches([good, poisoned]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.state


def test_refusals():
    model = _model()
    opt = _optimizer(torchsage.SAGE, model)
    data = _data()
    full = lambda: [F.cross_entropy(model(x), y) for x, y in data]  # noqa: E731
    two = lambda: [F.cross_entropy(model(x), y) for x, y in data[:2]]  # noqa: E731
    with pytest.raises(ValueError, match="without sizes= every micro-batch must return every distribution"):
        opt.step(torchsage.MicroBatches([full, two]))
    with pytest.raises(ValueError, match="got 2 closures but 1 sizes"):
        torchsage.MicroBatches([full, full], sizes=[[1, 1, 1]])
    with pytest.raises(ValueError, match=r"sizes\[0\]\['1'\] must be a finite count"):
        torchsage.MicroBatches([full], sizes=[[1, -1, 1]])
    with pytest.raises(ValueError, match="at least one closure"):
        torchsage.MicroBatches([])
    with pytest.raises(ValueError, match="not a closure to call"):
        torchsage.MicroBatches([full])()
    with pytest.raises(ValueError, match=r"micro-batch 1 returned losses \['0', '1'\] but sizes\[1\]"):
        opt.step(torchsage.MicroBatches([full, two], sizes=[[4, 4, 4], [4, 4, 4]]))
    with pytest.raises(ValueError, match="got 2 weights but the micro-batches hold 3"):
        torchsage.SAM(model.parameters(), torch.optim.SGD, lr=0.1).step(
            torchsage.MicroBatches([full]), weights=[1.0, 1.0]
        )
    with pytest.raises(ValueError, match="with a solver takes whole batches, not MicroBatches"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, solver="mean").step(
            torchsage.MicroBatches([full])
        )


def test_closure_that_runs_backward_is_refused_in_a_micro_batch():
    model = _model()
    data = _data()

    def bad():
        losses = [F.cross_entropy(model(x), y) for x, y in data]
        losses[0].backward(retain_graph=True)
        return losses

    good = lambda: [F.cross_entropy(model(x), y) for x, y in data]  # noqa: E731
    for cls in (torchsage.SAGE, torchsage.SAM):
        with pytest.raises(ValueError, match="the closure called backward"):
            _optimizer(cls, model).step(torchsage.MicroBatches([good, bad]))
