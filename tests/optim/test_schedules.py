"""Ascent schedules: the skipped steps really are one pass, their decisions follow an independent
implementation of the rules, and a run resumed from ``state_dict`` reproduces the uninterrupted run."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from test_ascent_exact import quadratic_problem

import torchsage
from torchsage.optim import EveryK, EveryStep, Triggered


def counted(closure):
    calls = []

    def wrapped():
        calls.append(1)
        return closure()

    return wrapped, calls


def took_ascent(info) -> bool:
    return not math.isnan(info.perturbed_loss)


@pytest.mark.parametrize("make", [torchsage.SAGE, torchsage.SAM])
def test_every_k_runs_one_pass_between_ascents(make):
    torch.manual_seed(0)
    params, _, _, closure = quadratic_problem()
    closure, calls = counted(closure)
    opt = make(params, torch.optim.SGD, lr=0.1, ascent_schedule=EveryK(3))
    infos = [opt.step(closure) for _ in range(9)]
    assert [took_ascent(i) for i in infos] == [True, False, False] * 3
    assert len(calls) == 9 + 3  # one pass per step, a second at steps 0, 3 and 6


def test_every_k_with_a_solver_still_runs_one_pass():
    torch.manual_seed(0)
    params, _, _, closure = quadratic_problem()
    closure, calls = counted(closure)
    opt = torchsage.SAGE(params, torch.optim.SGD, lr=0.1, solver="mean", ascent_schedule=EveryK(2))
    for _ in range(4):
        opt.step(closure)
    assert len(calls) == 4 + 2


def test_a_trigger_with_a_solver_skips_to_one_pass_after_the_clean_pass():
    torch.manual_seed(0)
    params, _, _, closure = quadratic_problem()
    closure, calls = counted(closure)
    schedule = Triggered("disagreement", threshold=100.0, warmup=1)  # only the warm-up step ascends
    opt = torchsage.SAGE(params, torch.optim.SGD, lr=0.1, solver="mean", ascent_schedule=schedule)
    infos = [opt.step(closure) for _ in range(4)]
    assert [took_ascent(i) for i in infos] == [True, False, False, False]
    assert len(calls) == 4 + 1  # the decision, taken after the clean pass, costs no extra pass


def test_a_skipped_step_is_the_clean_gradient_step_with_the_clean_noise():
    torch.manual_seed(2)
    params, targets, mean_targets, closure = quadratic_problem()
    lr, gamma = 0.1, 0.05
    opt = torchsage.SAGE(params, torch.optim.SGD, lr=lr, gamma=gamma, seed=3, ascent_schedule=EveryK(2))
    opt.step(closure)  # step 0 takes the ascent
    w = [p.detach().clone() for p in params]
    grads = [[p - c for p, c in zip(w, cs)] for cs in targets]  # each distribution's gradient
    info = opt.step(closure)
    assert not took_ascent(info)
    # normalized_std: sqrt(mean_k ||g_k - g_bar||^2) / ||g_bar|| over all coordinates
    flat = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads])
    mean = flat.mean(0)
    expected_d = float((flat - mean).square().sum(1).mean().sqrt() / mean.norm())
    assert info.disagreement == pytest.approx(expected_d, rel=1e-9)
    assert info.noise_std == pytest.approx(gamma * expected_d, rel=1e-9)
    # the same draw as SAGE's generator makes: one normal vector for all parameters
    gen = torch.Generator().manual_seed(3)
    torch.randn(sum(p.numel() for p in params), generator=gen, dtype=torch.float64)  # step 0's draw
    noise = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=torch.float64)
    pieces = noise.split([p.numel() for p in params])
    for p, w0, c, n in zip(params, w, mean_targets, pieces):
        expected = w0 - lr * ((w0 - c) + gamma * expected_d * n.view_as(w0))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def ae_sam_decisions(values, threshold, decay, warmup):
    """AE-SAM's rule, written out independently: EMA of the value and of its squared deviation."""
    out, mu, var = [], None, 0.0
    for t, x in enumerate(values):
        if mu is None:
            mu = x
        else:
            mu = decay * mu + (1 - decay) * x
            var = decay * var + (1 - decay) * (x - mu) ** 2
        c = threshold(t) if callable(threshold) else threshold
        out.append(t < warmup or x >= mu + c * var**0.5)
    return out


def sage_under(schedule, steps=30):
    """SAGE with ``schedule`` on three fresh random distributions per step (seeded): the StepInfos."""
    torch.manual_seed(4)
    model = torch.nn.Linear(4, 3)
    opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.05, ascent_schedule=schedule)
    infos = []
    for _ in range(steps):
        batches = [torch.randn(6, 4) * scale for scale in (1.0, 2.0, 0.5)]
        infos.append(opt.step(lambda b=batches: [model(x).square().mean() for x in b]))
    return infos


def test_trigger_on_the_disagreement_follows_the_rule():
    schedule = Triggered("disagreement", threshold=0.3, decay=0.8, warmup=3)
    infos = sage_under(schedule)
    taken = [took_ascent(i) for i in infos]
    assert taken == ae_sam_decisions([i.disagreement for i in infos], 0.3, 0.8, 3)
    assert 3 < sum(taken) < 30 and schedule.ascents == sum(taken)


def test_trigger_on_the_squared_gradient_norm_follows_the_rule():
    torch.manual_seed(5)
    params, _, mean_targets, closure = quadratic_problem()
    opt = torchsage.SAM(params, torch.optim.SGD, lr=0.3, ascent_schedule=Triggered(threshold=-0.2))
    values, taken = [], []
    for step in range(25):
        with torch.no_grad():  # a kick now and then, so the gradient norm rises and falls
            if step % 4 == 0:
                for p in params:
                    p.add_(torch.randn_like(p))
        values.append(sum(float((p.detach() - c).square().sum()) for p, c in zip(params, mean_targets)))
        taken.append(took_ascent(opt.step(closure)))
    assert taken == ae_sam_decisions(values, -0.2, 0.9, 0)
    assert 0 < sum(taken) < 25


def test_a_ramped_threshold_moves_linearly_then_stays_as_ae_sam_does():
    schedule = Triggered("disagreement", threshold=(-1.0, 1.0), decay=0.8, ramp=20)
    infos = sage_under(schedule)
    taken = [took_ascent(i) for i in infos]
    ramp = [-1.0 + 2.0 * t / 20 for t in range(20)] + [1.0] * 10  # c_t written out
    assert taken == ae_sam_decisions([i.disagreement for i in infos], lambda t: ramp[t], 0.8, 0)
    # the ramp changes decisions: against the constant start and the constant end
    assert taken != ae_sam_decisions([i.disagreement for i in infos], -1.0, 0.8, 0)
    assert taken != ae_sam_decisions([i.disagreement for i in infos], 1.0, 0.8, 0)
    assert schedule.current_threshold() == 1.0 and "ramp=20" in repr(schedule)


@pytest.mark.parametrize(
    "schedule",
    [
        lambda: EveryK(3),
        lambda: Triggered("disagreement", threshold=0.0, warmup=2),
        lambda: Triggered("disagreement", threshold=(-1.0, 1.0), ramp=5),
    ],
)
def test_resume_from_state_dict_reproduces_the_uninterrupted_run(schedule):
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    start = copy.deepcopy(model.state_dict())
    data = [[torch.randn(5, 4) * s for s in (1.0, 3.0)] for _ in range(10)]

    def run(m, opt, steps):
        return [took_ascent(opt.step(lambda b=b: [m(x).square().mean() for x in b])) for b in steps]

    def build(m):
        return torchsage.SAGE(
            m.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, seed=1, ascent_schedule=schedule()
        )

    whole = run(model, build(model), data)
    expected = [p.detach().clone() for p in model.parameters()]

    model.load_state_dict(start)
    opt = build(model)
    first = run(model, opt, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = copy.deepcopy(model)
    resumed_model.load_state_dict(saved["model"])
    resumed = build(resumed_model)
    resumed.load_state_dict(saved["opt"])
    second = run(resumed_model, resumed, data[4:])
    assert first + second == whole
    assert 0 < sum(whole) < 10
    for a, b in zip(resumed_model.parameters(), expected):
        assert torch.equal(a, b)


def test_state_of_another_schedule_is_refused():
    model = torch.nn.Linear(3, 2)
    saved = torchsage.SAGE(
        model.parameters(), torch.optim.SGD, lr=0.1, ascent_schedule=EveryK(3)
    ).state_dict()
    with pytest.raises(ValueError, match="saved with the ascent schedule EveryK, not EveryStep"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"saved with EveryK\(3\), not EveryK\(4\)"):
        torchsage.SAGE(
            model.parameters(), torch.optim.SGD, lr=0.1, ascent_schedule=EveryK(4)
        ).load_state_dict(saved)
    moved = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.5)
    with pytest.raises(ValueError, match="saved with the ascent schedule EveryK"):
        moved.load_state_dict(saved)
    assert moved.param_groups[0]["lr"] == 0.5  # refused before the base optimizer's state was loaded
    old = copy.deepcopy(saved)
    del old["torchsage"]["schedule"]  # a state saved before schedules existed
    fresh = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, ascent_schedule=EveryK(3))
    fresh.load_state_dict(old)
    assert fresh.schedule.count == 0


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EveryK(0), "k must be a positive integer, got 0"),
        (lambda: EveryK(2.0), "k must be a positive integer, got 2.0"),
        (lambda: Triggered("loss"), "unknown statistic 'loss'"),
        (lambda: Triggered(threshold=math.nan), "threshold must be a finite number"),
        (lambda: Triggered(threshold=(0.0, math.inf), ramp=3), "threshold must be a finite number or a pair"),
        (lambda: Triggered(threshold=(-1.0, 1.0)), "a threshold \\(start, end\\) needs ramp"),
        (lambda: Triggered(threshold=(-1.0, 1.0), ramp=0), "got ramp=0"),
        (lambda: Triggered(threshold=0.5, ramp=10), "ramp moves a threshold"),
        (lambda: Triggered(decay=1.0), r"decay must lie in \[0, 1\), got 1.0"),
        (lambda: Triggered(warmup=-1), "warmup must be a non-negative integer, got -1"),
    ],
)
def test_bad_schedule_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_schedules_the_optimizer_cannot_follow_are_refused():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="SAM does not measure the disagreement"):
        torchsage.SAM(model.parameters(), torch.optim.SGD, lr=0.1, ascent_schedule=Triggered("disagreement"))
    with pytest.raises(ValueError, match="a Triggered schedule with a solver"):
        torchsage.SAM(model.parameters(), torch.optim.SGD, lr=0.1, solver="mean", ascent_schedule=Triggered())
    with pytest.raises(ValueError, match=r"ascent_schedule must be None or a torchsage\.optim schedule"):
        torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, ascent_schedule=3)
    assert isinstance(torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1).schedule, EveryStep)
