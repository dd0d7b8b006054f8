r"""The two-task toy problem of the CAGrad and Nash-MTL papers, with and without SAGE.

One shared parameter :math:`x \in \mathbb{R}^2` and two losses (``LOWER`` = 5e-6, ``scale`` = 0.1):

.. math::
    f_1 &= \log\max(|0.5(-x_1 - 7) - \tanh(-x_2)|, \text{LOWER}) + 6, \\
    f_2 &= \log\max(|0.5(-x_1 + 3) + \tanh(-x_2) + 2|, \text{LOWER}) + 6, \\
    c_1 &= \max(\tanh(x_2 / 2), 0), \quad c_2 = \max(\tanh(-x_2 / 2), 0), \\
    f_1^{sq} &= ((-x_1 + 7)^2 + 0.1(-x_2 - 8)^2) / 10 - 20, \\
    f_2^{sq} &= ((-x_1 - 7)^2 + 0.1(-x_2 - 8)^2) / 10 - 20, \\
    L_1 &= \text{scale}\,(c_1 f_1 + c_2 f_1^{sq}), \quad L_2 = c_1 f_2 + c_2 f_2^{sq}.

Each solver runs from the five standard starting points with Adam (lr 1e-3), once plainly
(``torchsage.SAM`` with ``rho=0``: exactly the solver's own step) and once under
``torchsage.SAGE``; :func:`plot_toy` draws the trajectories on the contours of the mean loss
together with the Pareto set.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "TOY_BOUNDS",
    "TOY_LOWER",
    "TOY_SCALE",
    "TOY_STARTS",
    "plot_toy",
    "run_toy",
    "toy_figure",
    "toy_losses",
    "toy_pareto_set",
    "toy_trajectory",
]

TOY_LOWER = 5e-6
TOY_SCALE = 0.1
TOY_STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
#: the square drawn by :func:`plot_toy`: x1 and x2 in [-10, 10]
TOY_BOUNDS = (-10.0, 10.0)
TOY_TASKS = ("L1", "L2")


def toy_losses(x: Tensor, scale: float = TOY_SCALE) -> Tensor:
    """The two toy losses at ``x`` of shape ``(..., 2)``; returns shape ``(..., 2)``."""
    if x.shape[-1:] != (2,):
        raise ValueError(f"x must have a last dimension of size 2, got shape {tuple(x.shape)}")
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=TOY_LOWER)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=TOY_LOWER)) + 6
    c1 = torch.clamp(torch.tanh(x2 / 2), min=0)
    c2 = torch.clamp(torch.tanh(-x2 / 2), min=0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return torch.stack((scale * (c1 * f1 + c2 * f1_sq), c1 * f2 + c2 * f2_sq), dim=-1)


def _fresh(solver: Any) -> Any:
    """A solver in its initial state: a factory is called, an object deep-copied."""
    if solver is None or isinstance(solver, str):
        return solver
    if callable(solver) and not isinstance(solver, nn.Module):
        return solver()
    return copy.deepcopy(solver)


def toy_trajectory(
    solver: Any,
    *,
    sage: bool,
    start: Sequence[float],
    steps: int = 20000,
    lr: float = 1e-3,
    rho: float = 0.05,
    gamma: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Optimises the toy problem from ``start`` and returns the ``[steps + 1, 2]`` iterates.

    Args:
        solver: a torchjd aggregator or scalarizer, ``"mean"``, or a zero-argument factory of
            one; objects are deep-copied so runs never share solver state. A scalarizer's own
            parameters (UW) are optimised with the same Adam.
        sage: ``True`` steps with ``torchsage.SAGE(rho, gamma)``, ``False`` with
            ``torchsage.SAM(rho=0)``, the solver's plain step.
        start: the initial ``(x1, x2)``.
        steps: Adam steps (the papers run 35000 for their figures).
        lr: Adam's learning rate.
        rho, gamma: SAGE's ascent radius and noise scale (ignored when ``sage`` is False).
        seed: seeds torch's global generator (random solvers) and SAGE's noise.
        progress: show progress (a bar on a terminal, plain lines otherwise).
    """
    import torchsage

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    start_t = torch.as_tensor(start, dtype=torch.float32)
    if start_t.shape != (2,):
        raise ValueError(f"start must be two numbers (x1, x2), got {start!r}")
    torch.manual_seed(seed)
    solver = _fresh(solver)
    x = nn.Parameter(start_t.clone())
    groups: list[dict[str, Any]] = [{"params": [x]}]
    extra = list(solver.parameters()) if isinstance(solver, nn.Module) else []
    if extra:
        groups.append({"params": extra})
    if sage:
        opt = torchsage.SAGE(groups, torch.optim.Adam, rho=rho, gamma=gamma, seed=seed, solver=solver, lr=lr)
    else:
        opt = torchsage.SAM(groups, torch.optim.Adam, rho=0.0, solver=solver, lr=lr)

    def closure() -> dict[str, Tensor]:
        losses = toy_losses(x)
        return {TOY_TASKS[0]: losses[0], TOY_TASKS[1]: losses[1]}

    path = np.empty((steps + 1, 2))
    path[0] = x.detach().numpy()
    iterator: Iterable[int] = range(steps)
    if progress:
        from torchsage.harness.progress import bar as tqdm

        iterator = tqdm(iterator, desc=f"toy {'SAGE' if sage else 'plain'} from {tuple(start)}", leave=False)
    for t in iterator:
        opt.step(closure)
        path[t + 1] = x.detach().numpy()
    return path


def toy_pareto_set(grid: int = 801, bounds: tuple[float, float] = TOY_BOUNDS) -> np.ndarray:
    """Points of a ``grid x grid`` lattice over ``bounds``^2 whose loss pair no other lattice
    point dominates: the Pareto set of the toy problem, resolved to the lattice spacing.

    Sorting by L1 (ties by L2) and keeping the points whose L2 beats every earlier one finds
    the non-dominated points exactly among the lattice points.
    """
    axis = torch.linspace(bounds[0], bounds[1], grid, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis)
    losses = toy_losses(points).numpy()
    order = np.lexsort((losses[:, 1], losses[:, 0]))
    l2 = losses[order, 1]
    best_before = np.minimum.accumulate(np.concatenate(([np.inf], l2[:-1])))
    keep = order[l2 < best_before]
    return points.numpy()[keep]


def plot_toy(
    trajectories: Mapping[str, Mapping[bool, Sequence[np.ndarray]]],
    path: str | os.PathLike[str],
    *,
    pareto: np.ndarray | None = None,
    title: str | None = None,
) -> Path:
    """Draws one panel per solver: trajectories without SAGE (solid) and with SAGE (dashed) from
    each start (one colour per start; a dot where it starts, a star where it ends), over the
    contours of the mean loss ``(L1 + L2) / 2`` and the Pareto set (black dots), and saves a PNG
    (written whole: to a temporary file, then renamed). Panels are titled with the solvers'
    display names (``IMTL-G`` for ``imtlg``); the legend sits in its own band below the panels.

    Args:
        trajectories: ``{solver name: {False: [path, ...], True: [path, ...]}}``, each path an
            ``[n, 2]`` array; either key may be missing.
        path: the PNG to write.
        pareto: the Pareto set to draw (default: :func:`toy_pareto_set`).
    """
    if not trajectories:
        raise ValueError("trajectories is empty: nothing to plot")
    import matplotlib.pyplot as plt

    fig = toy_figure(trajectories, pareto, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def toy_figure(
    trajectories: Mapping[str, Mapping[bool, Sequence[np.ndarray]]],
    pareto: np.ndarray | None = None,
    title: str | None = None,
) -> Any:
    """The figure :func:`plot_toy` saves (a pyplot figure: close it after use).

    Example:
        >>> import matplotlib.pyplot as plt
        >>> path = np.array([[0.0, 0.0], [3.0, -5.0]])
        >>> fig = toy_figure({"imtlg": {False: [path], True: [path - 1]}}, pareto=path)
        >>> [ax.get_title() for ax in fig.axes if ax.axison]
        ['IMTL-G']
        >>> plt.close(fig)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = TOY_BOUNDS
    axis = torch.linspace(lo, hi, 300, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1)
    mean_loss = toy_losses(grid).mean(-1).numpy()
    if pareto is None:
        pareto = toy_pareto_set()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = list(trajectories)
    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    entries = 7  # the legend's, below
    ncol = entries if cols >= 4 else (4 if cols >= 2 else 2)
    band = 0.3 + 0.22 * math.ceil(entries / ncol)  # inches below the panels: the legend covers no label
    height = 4.0 * rows + band
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, height), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, name in zip(axes.flat, names, strict=False):
        ax.contourf(axis.numpy(), axis.numpy(), mean_loss, levels=30, cmap="Greys", alpha=0.45)
        ax.contour(axis.numpy(), axis.numpy(), mean_loss, levels=15, colors="grey", linewidths=0.4)
        ax.scatter(pareto[:, 0], pareto[:, 1], s=1, c="black")
        for sage, style in ((False, "-"), (True, "--")):
            for i, traj in enumerate(trajectories[name].get(sage, [])):
                traj = np.asarray(traj)
                ax.plot(traj[:, 0], traj[:, 1], style, color=colours(i), lw=1.4)
                ax.plot(*traj[0], "o", color=colours(i), ms=4)
                ax.plot(*traj[-1], "*", color=colours(i), ms=8, mec="black", mew=0.5)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(_display_name(name))
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles = [
        Line2D([], [], ls="none", marker=".", color="black", label="Pareto set"),
        Line2D([], [], ls="-", color="dimgrey", label="plain solver"),
        Line2D([], [], ls="--", color="dimgrey", label="with SAGE"),
        Line2D([], [], ls="none", marker="o", ms=4, color="dimgrey", label="start"),
        Line2D([], [], ls="none", marker="*", ms=8, mec="black", mew=0.5, color="dimgrey", label="end"),
        Patch(facecolor="silver", edgecolor="grey", lw=0.4, label="contours: mean loss (L1 + L2) / 2"),
        Line2D([], [], ls="none", label="colour: starting point"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, band / height, 1, 1))
    return fig


def _display_name(solver: str) -> str:
    """The solver's name as papers write it (``IMTL-G`` for ``imtlg``); unknown names unchanged."""
    from torchsage.mtl.solvers import solver_spec

    try:
        return solver_spec(solver).title
    except ValueError:
        return solver


def run_toy(
    solvers: Mapping[str, Any],
    path: str | os.PathLike[str],
    steps: int = 20000,
    *,
    starts: Sequence[Sequence[float]] = TOY_STARTS,
    lr: float = 1e-3,
    rho: float = 0.05,
    gamma: float = 1e-3,
    seed: int = 0,
    sage: Sequence[bool] = (False, True),
    progress: bool = True,
    callback: Callable[[str, bool, int, np.ndarray], None] | None = None,
) -> dict[str, dict[bool, list[np.ndarray]]]:
    """Runs every solver from every start, plainly and with SAGE, and plots the result to ``path``.

    Args:
        solvers: ``{name: solver}``, each a torchjd object, ``"mean"`` or a zero-argument factory
            (see :func:`toy_trajectory`).
        path: the PNG to write (:func:`plot_toy`).
        steps, lr, rho, gamma, seed: as in :func:`toy_trajectory`.
        starts: starting points (default: the five standard ones).
        sage: which variants to run (False: plain, True: SAGE).
        progress: show progress (a bar on a terminal, plain lines otherwise) over the runs.
        callback: called as ``callback(name, sage, start_index, trajectory)`` after each run.

    Returns:
        ``{name: {False: [trajectory per start], True: [...]}}``.
    """
    if not solvers:
        raise ValueError("solvers is empty: name at least one solver")
    jobs = [(name, s, i) for name in solvers for s in sage for i in range(len(starts))]
    iterator: Iterable[tuple[str, bool, int]] = jobs
    if progress:
        from torchsage.harness.progress import bar as tqdm

        iterator = tqdm(jobs, desc="toy problem")
    result: dict[str, dict[bool, list[np.ndarray]]] = {name: {s: [] for s in sage} for name in solvers}
    for name, s, i in iterator:
        traj = toy_trajectory(
            solvers[name], sage=s, start=starts[i], steps=steps, lr=lr, rho=rho, gamma=gamma, seed=seed
        )
        result[name][s].append(traj)
        if callback is not None:
            callback(name, s, i, traj)
    plot_toy(
        result, path, title=f"toy problem: {steps} Adam steps, lr {lr:g}; SAGE rho {rho:g}, gamma {gamma:g}"
    )
    return result
