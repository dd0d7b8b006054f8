"""Mixed precision: ``torchsage.amp.scaled_step`` (float16 loss scaling with the two-pass step) and
bf16 autocast.

References: the unscaled optimizer run (power-of-two scales make scaling and unscaling exact, so a
finite scaled run must reproduce it), GradScaler's documented rule for its scale (halve on a
skipped step, double after ``growth_interval`` finite steps, hand-computed here), and bit-for-bit
copies of the parameters and optimizer state for skipped steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import torchsage
from torchsage.amp import autocast, scaled_step


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def batches(k: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(k)]


OPTIMIZERS = {
    "SAGE": lambda ps: torchsage.SAGE(ps, torch.optim.Adam, rho=0.05, gamma=0.01, seed=3, lr=0.01),
    "SAM": lambda ps: torchsage.SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "SAGM": lambda ps: torchsage.SAGM(ps, torch.optim.SGD, rho=0.05, alpha=0.01, lr=0.1),
    "ASAM": lambda ps: torchsage.ASAM(ps, torch.optim.SGD, rho=0.5, lr=0.1),
    "GSAM": lambda ps: torchsage.GSAM(ps, torch.optim.SGD, rho=0.05, alpha=0.1, lr=0.1),
    "SAGEAlign": lambda ps: torchsage.SAGEAlign(ps, torch.optim.SGD, rho=0.05, lr=0.1),
}


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[list, dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_same_state(before: tuple[list, dict], model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    params, state = before
    for old, new in zip(params, model.parameters()):
        assert torch.equal(old, new)
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for key, values in state["state"].items():
        for name, value in values.items():
            other = now["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    assert now.get("torchsage") is not None or state.get("torchsage") is None


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("lazy", [False, True], ids=["list", "generator"])
def test_finite_scaled_run_equals_the_unscaled_run(name, lazy):
    data = batches()
    plain_model, scaled_model = make_model(), make_model()
    plain, scaled = OPTIMIZERS[name](plain_model.parameters()), OPTIMIZERS[name](scaled_model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    def closure_of(model):
        if lazy:
            return lambda: (F.cross_entropy(model(x), y) for x, y in data)
        return lambda: [F.cross_entropy(model(x), y) for x, y in data]

    for _ in range(5):
        expected = plain.step(closure_of(plain_model))
        got = scaled_step(scaled, closure_of(scaled_model), scaler)
        scaler.update()
        assert not got.skipped
        # scaling by a power of two is exact: only the unscaled sums round differently, a few ulp
        # (1.2e-7) per step, through 5 SGD steps; the statistics condition number is a few: 1e-5
        assert got.loss == pytest.approx(expected.loss, rel=1e-6)
        assert got.losses == pytest.approx(expected.losses, rel=1e-6)
        assert got.perturbed_loss == pytest.approx(expected.perturbed_loss, rel=1e-6)
        assert got.perturbation_norm == pytest.approx(expected.perturbation_norm, rel=1e-5)
        if name == "SAGE":
            assert got.disagreement == pytest.approx(expected.disagreement, rel=1e-5)
    for a, b in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # 5 finite steps with growth_interval 2: doubled after the 2nd and the 4th.
    assert scaler.get_scale() == 2.0**14
    assert scaler.state_dict()["_growth_tracker"] == 1


def test_overflow_in_the_perturbed_pass_skips_the_step_and_halves_the_scale():
    model = make_model()
    opt = OPTIMIZERS["SAGE"](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=100)
    data = batches()
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        blow_up = 1e36 if calls["n"] == 4 else 1.0  # the perturbed pass of the second step
        return [F.cross_entropy(model(x), y) * blow_up for x, y in data]

    info = scaled_step(opt, closure, scaler)
    scaler.update()
    assert not info.skipped and scaler.get_scale() == 2.0**10
    assert scaler.state_dict()["_growth_tracker"] == 1
    before = snapshot(model, opt)
    noise_state = opt.state_dict()["torchsage"]
    info = scaled_step(opt, closure, scaler)  # 1e36 * 1024 overflows float32: inf loss
    scaler.update()
    assert info.skipped
    assert_same_state(before, model, opt)
    assert opt.state_dict()["torchsage"]["generators"].keys() == noise_state["generators"].keys()
    for key, state in noise_state["generators"].items():
        assert torch.equal(opt.state_dict()["torchsage"]["generators"][key], state)  # no noise drawn
    assert scaler.get_scale() == 2.0**9
    assert scaler.state_dict()["_growth_tracker"] == 0
    assert opt.on_nonfinite == "raise"  # the policy is restored after the step


def test_real_float16_overflow_backs_off_until_finite():
    # Under float16 autocast a scale of 2**24 overflows the float16 backward of this model; the
    # scaler halves the scale after every skipped step, and the first finite step updates.
    model = make_model()
    opt = OPTIMIZERS["SAM"](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    data = batches()

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return [F.cross_entropy(model(x), y) for x, y in data]

    before = snapshot(model, opt)
    skipped = []
    for _ in range(12):
        info = scaled_step(opt, closure, scaler)
        scale_used = scaler.get_scale()
        scaler.update()
        skipped.append(info.skipped)
        if info.skipped:
            assert_same_state(before, model, opt)
            assert scaler.get_scale() == scale_used / 2
        else:
            break
    assert skipped[0] and not skipped[-1]  # overflowed first, then found a finite scale
    assert all(skipped[:-1])
    assert any(not torch.equal(a, b) for a, b in zip(before[0], model.parameters()))


def test_misuse_is_named():
    model = make_model()
    opt = OPTIMIZERS["SAM"](model.parameters())
    data = batches()

    def closure():
        return [F.cross_entropy(model(x), y) for x, y in data]

    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="two-pass optimizers, got SGD"):
        scaled_step(torch.optim.SGD(model.parameters(), lr=0.1), closure, scaler)
    with pytest.raises(ValueError, match=r"must be a torch\.amp\.GradScaler"):
        scaled_step(opt, closure, object())
    scaled_step(opt, closure, scaler)
    with pytest.raises(ValueError, match=r"call scaler\.update\(\) once per step"):
        scaled_step(opt, closure, scaler)
    scaler.update()
    F.cross_entropy(model(data[0][0]), data[0][1]).mul(scaler.get_scale()).backward()
    scaler.unscale_(opt)
    with pytest.raises(ValueError, match="unscales its gradients itself"):
        scaled_step(opt, closure, scaler)


def test_disabled_scaler_is_a_plain_step():
    data = batches()
    plain_model, other_model = make_model(), make_model()
    plain, other = OPTIMIZERS["SAGE"](plain_model.parameters()), OPTIMIZERS["SAGE"](other_model.parameters())
    expected = plain.step(lambda: [F.cross_entropy(plain_model(x), y) for x, y in data])
    got = scaled_step(
        other,
        lambda: [F.cross_entropy(other_model(x), y) for x, y in data],
        torch.amp.GradScaler("cpu", enabled=False),
    )
    assert got.loss == expected.loss
    for a, b in zip(plain_model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bf16_autocast_step_tracks_the_float32_step(name):
    data = batches()
    ref_model, bf_model = make_model(), make_model()
    ref, bf = OPTIMIZERS[name](ref_model.parameters()), OPTIMIZERS[name](bf_model.parameters())
    expected = ref.step(lambda: [F.cross_entropy(ref_model(x), y) for x, y in data])

    def closure():
        with autocast("cpu", "bf16"):
            losses = [F.cross_entropy(bf_model(x), y) for x, y in data]
        assert bf_model(data[0][0]).dtype == torch.float32  # autocast is off outside the block
        return losses

    got = bf.step(closure)
    # bf16 keeps 8 bits of mantissa (2**-8 = 4e-3 per rounding): the losses agree to a few parts in
    # a thousand, the perturbed one after a direction off by ~1e-2 times rho * ||g||: 1e-2
    assert got.loss == pytest.approx(expected.loss, rel=1e-2)
    assert got.perturbed_loss == pytest.approx(expected.perturbed_loss, rel=1e-2)
    for p in bf_model.parameters():
        assert p.dtype == torch.float32  # autocast leaves the weights in float32


def test_autocast_names_unknown_precision():
    with pytest.raises(ValueError, match="unknown amp 'fp8': use one of bf16, fp16"):
        autocast("cpu", "fp8")
    with autocast("cpu", None):
        assert not torch.is_autocast_enabled("cpu")


def test_gradscaler_step_on_a_two_pass_optimizer_is_a_clear_error():
    model = make_model()
    opt = OPTIMIZERS["SAM"](model.parameters())
    data = batches()

    def closure():
        return [F.cross_entropy(model(x), y) for x, y in data]

    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the usual loop scales a loss first
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"use torchsage\.amp\.scaled_step\(optimizer, closure, scaler\)"):
        scaler.step(opt, closure)
    assert_same_state(before, model, opt)
    assert not opt.step(closure).skipped  # the optimizer is usable afterwards


# -- the domain-generalization training loop ------------------------------------------------------

TINY = '{"cnn_width": 8, "batch_size": 8}'


def read_records(path):
    import json

    return [json.loads(line) for line in (path / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_dg_training_runs_under_autocast(amp, tmp_path):
    from torchsage.dg.train import TrainArgs, train

    out = train(
        TrainArgs(
            "RotatedDigits", "SAGE", [5], str(tmp_path / amp), steps=2, hparams=TINY, amp=amp, progress=False
        )
    )
    # DomainBed checkpoints: step 0 and the last step.
    first, record = read_records(out)
    assert (first["step"], record["step"]) == (0, 1)
    assert record["args"]["amp"] == amp
    assert math.isfinite(record["loss"]) and 0.0 <= record["env0_in_acc"] <= 1.0
    assert (out / "done").exists()


def test_dg_fp16_needs_a_sharpness_aware_algorithm(tmp_path):
    from torchsage.dg.train import TrainArgs, train

    with pytest.raises(ValueError, match=r"--amp fp16 needs loss scaling.*not ERM: use --amp bf16"):
        train(TrainArgs("RotatedDigits", "ERM", [5], str(tmp_path), steps=1, hparams=TINY, amp="fp16"))
    with pytest.raises(ValueError, match="--amp must be one of bf16, fp16, got 'fp8'"):
        train(TrainArgs("RotatedDigits", "SAGE", [5], str(tmp_path), steps=1, hparams=TINY, amp="fp8"))
    assert not any(tmp_path.iterdir())  # checked before anything is written


def test_loss_scaled_optimizer_steps_and_updates_the_scaler():
    from torchsage.amp import LossScaledOptimizer

    data = batches()
    plain_model, wrapped_model = make_model(), make_model()
    plain = OPTIMIZERS["SAM"](plain_model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    wrapped = LossScaledOptimizer(OPTIMIZERS["SAM"](wrapped_model.parameters()), scaler)
    for _ in range(3):
        plain.step(lambda: [F.cross_entropy(plain_model(x), y) for x, y in data])
        wrapped.step(lambda: [F.cross_entropy(wrapped_model(x), y) for x, y in data])
    assert scaler.get_scale() == 2.0**11  # updated once per step, growing after each finite step
    assert wrapped.param_groups is wrapped.optimizer.param_groups  # attributes are the optimizer's
    # power-of-two scaling is exact; the unscaled sums differ by a few ulp over 3 steps: 1e-5
    for a, b in zip(plain_model.parameters(), wrapped_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="wraps torchsage's two-pass optimizers, got SGD"):
        LossScaledOptimizer(torch.optim.SGD(plain_model.parameters(), lr=0.1), scaler)


def test_clipping_comes_after_unscaling():
    # max_grad_norm clips the descent gradient the optimizer sees, which is already unscaled: the
    # scaled step clips exactly as the plain one (a clip of the scaled gradient would shrink the
    # step by the scale, 4096-fold here)
    data = batches()
    plain_model, scaled_model = make_model(), make_model()

    def build(model):
        return torchsage.SAGE(
            model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, max_grad_norm=0.05, seed=1
        )

    plain, scaled = build(plain_model), build(scaled_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        expected = plain.step(lambda: [F.cross_entropy(plain_model(x), y) for x, y in data])
        got = scaled_step(scaled, lambda: [F.cross_entropy(scaled_model(x), y) for x, y in data], scaler)
        scaler.update()
        assert expected.grad_norm > 0.05  # the clip is active
        assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-5)
    # as in test_finite_scaled_run_equals_the_unscaled_run: a few ulp per step through 3 steps
    for a, b in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_scaled_step_with_a_solver_equals_the_plain_step():
    # multi-task: the task Jacobian is taken with torch.autograd.grad, which the unscaling hooks on
    # the parameters see as well; a power-of-two scale then changes nothing but the rounding order
    data = batches(k=2)

    def build(model):
        return torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.0, lr=0.1, solver="mean")

    plain_model, scaled_model = make_model(), make_model()
    plain, scaled = build(plain_model), build(scaled_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        expected = plain.step(
            lambda: {str(k): F.cross_entropy(plain_model(x), y) for k, (x, y) in enumerate(data)}
        )
        got = scaled_step(
            scaled,
            lambda: {str(k): F.cross_entropy(scaled_model(x), y) for k, (x, y) in enumerate(data)},
            scaler,
        )
        scaler.update()
        assert not got.skipped and got.loss == pytest.approx(expected.loss, rel=1e-6)
    # a few ulp per step through 3 SGD steps, as in test_finite_scaled_run_equals_the_unscaled_run
    for a, b in zip(plain_model.parameters(), scaled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
