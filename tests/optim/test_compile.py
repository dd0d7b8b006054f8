"""torch.compile of the user's model under the two-pass optimizers: the steps are the eager steps,
the model's forward is one graph without graph breaks, and the perturbation and restore of the
weights (in place) never recompile it. BatchNorm frozen on the perturbed pass (``model=``) flips
an attribute that the compiled graph guards on, so it costs exactly one more graph, compiled once.

The tests use the ``aot_eager`` backend: it runs the same TorchDynamo capture and AOTAutograd
tracing as the default ``inductor`` backend (where graph breaks and recompilations come from)
without generating C++ code, which takes minutes on a loaded CPU. The step time with ``inductor``
is in docs/benchmarks.md (benchmarks/compile_step.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsage

dynamo = pytest.importorskip("torch._dynamo")


def _data():
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 6, generator=gen) + k, torch.randint(0, 3, (16,), generator=gen)) for k in range(3)
    ]


def _model(bn: bool):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), *([nn.BatchNorm1d(16)] if bn else []), nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _run(model, net, cls, steps=3):
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)
    data = _data()
    return [opt.step(lambda: [F.cross_entropy(net(x), y) for x, y in data]) for _ in range(steps)]


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("cls", [torchsage.SAGE, torchsage.SAM, torchsage.GSAM, torchsage.SAGEAlign])
def test_compiled_model_takes_the_eager_steps(bn, cls):
    eager = _model(bn)
    eager_infos = _run(eager, eager, cls)
    dynamo.reset()
    dynamo.utils.counters.clear()
    model = _model(bn)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    infos = _run(model, compiled, cls)
    # the traced graph runs the same ATen operations; only decompositions may reassociate a
    # float32 sum (a few ulp, 1.2e-7 each), which three SGD steps with momentum carry into the
    # weights: 1e-5 relative, 1e-6 absolute
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for a, b in zip(infos, eager_infos):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert not dynamo.utils.counters["graph_break"]
    # the in-place perturbation and restore are not guarded on: one graph for every step; frozen
    # BatchNorm statistics on the perturbed pass (track_running_stats False) are a second one
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == (2 if bn else 1)
    _run(model, compiled, cls, steps=2)
    assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompilation per step


def test_shared_graph_needs_donated_buffers_off_or_a_generator():
    # SAGE differentiates each distribution's loss on its own. Losses cut from one forward pass
    # share its graph, and a compiled graph's donated buffers allow one backward pass: the error
    # says what to do. One forward per distribution, yielded one at a time, needs nothing.
    data = _data()
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    dynamo.reset()
    # dynamic shapes (what a second batch size turns on by itself) give the graph donated buffers
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)

    def shared():
        per_sample = F.cross_entropy(compiled(x), y, reduction="none")
        return list(per_sample.view(3, 16).mean(1))

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="donated buffers allow one backward pass only"):
        opt.step(shared)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state
    info = opt.step(lambda: (F.cross_entropy(compiled(a), b) for a, b in data))
    assert info.disagreement > 0
