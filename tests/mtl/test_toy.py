"""The toy problem against direct numpy evaluation; trajectories through SAM/SAGE with solvers."""

import math

import numpy as np
import pytest
import torch

from torchsage.mtl import toy as T

torchjd = pytest.importorskip("torchjd")
from torchjd.aggregation import UPGrad  # noqa: E402
from torchjd.scalarization import UW  # noqa: E402


def _numpy_losses(x1, x2, scale=0.1):
    lower = 5e-6
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), lower)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), lower)) + 6
    c1 = max(math.tanh(x2 / 2), 0.0)
    c2 = max(math.tanh(-x2 / 2), 0.0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return scale * (c1 * f1 + c2 * f1_sq), c1 * f2 + c2 * f2_sq


POINTS = [
    *T.TOY_STARTS,
    (0.0, 0.0),  # c1 = c2 = 0: both losses 0
    (-7.0 + 2.0 * math.tanh(1.0), 1.0),  # f1's argument is 0: the LOWER clamp is active
    (3.3, -4.2),
    (-1.0, 2.5),
]


def test_toy_losses_against_numpy():
    x = torch.tensor(POINTS, dtype=torch.float64)
    losses = T.toy_losses(x)
    assert losses.shape == (len(POINTS), 2)
    expected = np.array([_numpy_losses(*p) for p in POINTS])
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12, atol=1e-12)
    # the clamp point: L1 = 0.1 * tanh(1/2) * (log(5e-6) + 6)
    assert losses[6, 0].item() == pytest.approx(0.1 * math.tanh(0.5) * (math.log(5e-6) + 6))
    # batched over leading dimensions, scale only on L1
    grid = x.reshape(3, 3, 2)
    torch.testing.assert_close(T.toy_losses(grid), losses.reshape(3, 3, 2))
    unscaled = T.toy_losses(x, scale=1.0)
    torch.testing.assert_close(unscaled[:, 0] * 0.1, losses[:, 0])
    torch.testing.assert_close(unscaled[:, 1], losses[:, 1])
    with pytest.raises(ValueError, match="last dimension"):
        T.toy_losses(torch.zeros(3))


def test_pareto_set_against_brute_force():
    grid = 41
    found = T.toy_pareto_set(grid)
    axis = np.linspace(-10, 10, grid)
    points = np.array([(a, b) for a in axis for b in axis])
    losses = np.array([_numpy_losses(*p) for p in points])
    dominated = np.zeros(len(points), dtype=bool)
    for i in range(len(points)):
        better_eq = (losses <= losses[i]).all(1)
        strictly = (losses < losses[i]).any(1)
        dominated[i] = (better_eq & strictly).any()
    expected = {tuple(np.round(p, 9)) for p in points[~dominated]}
    assert {tuple(np.round(p, 9)) for p in found} == expected


def test_trajectory_decreases_the_mean_loss_plain_and_sage():
    for sage in (False, True):
        path = T.toy_trajectory(UPGrad(), sage=sage, start=(9.0, 9.0), steps=60, rho=0.05, gamma=1e-3)
        assert path.shape == (61, 2)
        np.testing.assert_array_equal(path[0], [9.0, 9.0])
        mean = T.toy_losses(torch.tensor(path)).mean(-1)
        assert mean[-1] < mean[0] - 1e-3


def test_sage_without_ascent_and_noise_is_the_plain_solver():
    plain = T.toy_trajectory(UPGrad(), sage=False, start=(-7.5, -0.5), steps=40)
    sage = T.toy_trajectory(UPGrad(), sage=True, start=(-7.5, -0.5), steps=40, rho=0.0, gamma=0.0)
    # the same task Jacobian through the same solver call: the same float64 operations, bit for bit
    np.testing.assert_array_equal(sage, plain)


def test_plain_mean_is_adam_on_the_mean_loss():
    x = torch.nn.Parameter(torch.tensor([-8.5, 7.5]))
    adam = torch.optim.Adam([x], lr=1e-3)
    expected = [x.detach().clone()]
    for _ in range(30):
        adam.zero_grad()
        T.toy_losses(x).mean().backward()
        adam.step()
        expected.append(x.detach().clone())
    path = T.toy_trajectory("mean", sage=False, start=(-8.5, 7.5), steps=30)
    np.testing.assert_allclose(path, torch.stack(expected).numpy(), rtol=0, atol=1e-6)


def test_scalarizer_parameters_are_trained_and_the_solver_is_not_shared():
    solver = UW(2)
    before = [p.detach().clone() for p in solver.parameters()]
    seen = []

    def factory():
        made = UW(2)
        seen.append(made)
        return made

    T.toy_trajectory(solver, sage=False, start=(0.5, 0.5), steps=5)
    assert all(torch.equal(a, b) for a, b in zip(before, solver.parameters(), strict=True))
    T.toy_trajectory(factory, sage=True, start=(0.5, 0.5), steps=5)
    assert len(seen) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, seen[0].parameters(), strict=True))


def test_bad_arguments():
    with pytest.raises(ValueError, match="start"):
        T.toy_trajectory("mean", sage=False, start=(1.0, 2.0, 3.0), steps=1)
    with pytest.raises(ValueError, match="steps"):
        T.toy_trajectory("mean", sage=False, start=(1.0, 2.0), steps=-1)
    with pytest.raises(ValueError, match="empty"):
        T.run_toy({}, "unused.png")
    with pytest.raises(ValueError, match="empty"):
        T.plot_toy({}, "unused.png")


def test_run_toy_writes_a_png(tmp_path):
    calls = []
    result = T.run_toy(
        {"mean": "mean", "upgrad": UPGrad},
        tmp_path / "fig" / "toy.png",
        steps=3,
        starts=T.TOY_STARTS[:2],
        progress=False,
        callback=lambda name, sage, i, traj: calls.append((name, sage, i, traj.shape)),
    )
    assert set(result) == {"mean", "upgrad"}
    assert all(
        len(result[n][s]) == 2 and result[n][s][0].shape == (4, 2) for n in result for s in (False, True)
    )
    assert len(calls) == 8
    data = (tmp_path / "fig" / "toy.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "fig").glob("*.tmp"))
