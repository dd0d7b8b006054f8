"""The evidence study's figures: the forest plot of differences to ERM, the sensitivity of SAGE and
SAM to their hyperparameters, and the theory test's fits (drawn by :mod:`torchsage.study.report`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchsage.harness.tables import save_figure
from torchsage.study.report import CellResults, DGRun, _cell_results, _cells_with_results
from torchsage.study.spec import DG_CELLS, SAGE_GRID, SAM_GRID, Arm, dg_arms
from torchsage.study.stats import mean_ci

__all__ = ["plot_differences", "plot_sensitivity", "plot_theory"]


def plot_differences(
    selected: dict[tuple[str, int, str], dict[int, DGRun]],
    path: str | Path,
    results: CellResults | None = None,
    cells: Sequence[tuple[str, int]] = DG_CELLS,
    arms: Sequence[Arm] | None = None,
) -> Path:
    """Forest plot: each method's paired difference to ERM with its bootstrap interval, one panel
    per finished cell; filled markers where the Holm-adjusted difference is significant.
    ``cells``, ``arms``: the study's (default: the first study's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from torchsage.dg.datasets import environment_names

    cells = _cells_with_results(selected, cells)
    if not cells:
        raise ValueError("no finished DG cell to plot")
    results = _cell_results(selected, cells, results, arms)
    arms = dg_arms() if arms is None else arms
    methods = [m for m in dict.fromkeys(a.method for a in arms) if m != "ERM"]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    colours += ["tab:olive", "tab:cyan", "tab:gray"]
    fig = Figure(figsize=(3.3 * len(cells) + 1.5, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(cells), squeeze=False, sharey=True)[0]
    for ax, (dataset, env) in zip(axes, cells):
        comparisons = results[(dataset, env)][1]
        for y, (m, colour) in enumerate(zip(methods, colours)):
            p = comparisons.get((m, "ERM"))
            if p is None:
                continue
            low = p.mean if math.isnan(p.low) else p.low
            high = p.mean if math.isnan(p.high) else p.high
            err = [[100 * (p.mean - low)], [100 * (high - p.mean)]]
            face = colour if p.significant() else "white"
            ax.errorbar([100 * p.mean], [y], xerr=err, fmt="o", color=colour, mfc=face, capsize=3)
        ax.axvline(0.0, color="0.4", ls="--", lw=1)
        ax.set_title(f"{dataset}, test domain {environment_names(dataset)[env]}", fontsize=9)
        ax.set_xlabel("Δ test accuracy vs ERM (points)")
    axes[0].set_yticks(range(len(methods)), methods, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("paired difference to ERM, 95% bootstrap CI\n(filled: Holm-adjusted p < 0.05)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sensitivity(
    runs: Sequence[DGRun],
    path: str | Path,
    cells: Sequence[tuple[str, int]] | None = None,
    sam: bool = False,
) -> Path:
    """Test accuracy of every SAGE grid choice before selection (mean and 95% t-interval over the
    trials) against rho, one panel per (cell, rho scaling); colour: gamma; marker: disagreement;
    ERM's mean over the same trials as a dashed line. ``cells``: the cells to show (default:
    every cell with SAGE grid runs); ``sam``: SAM's rho grid too, in black, in the panels of
    global rho scaling (SAM's own)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from torchsage.dg.datasets import environment_names

    scalings = list(dict.fromkeys(h["rho_scaling"] for h in SAGE_GRID))
    gammas = sorted({h["gamma"] for h in SAGE_GRID})
    colours = dict(zip(gammas, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    markers = {"normalized_std": "o", "cosine": "s"}
    values: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        if r.method == "SAGE":
            h = r.hparams
            key = (r.dataset, r.test_env, h["rho_scaling"], h["rho"], h["gamma"], h["disagreement"])
            values[key].append(100 * r.test_acc)
    sam_values: dict[tuple, list[float]] = defaultdict(list)
    for r in runs if sam else ():
        if r.method == "SAM":
            sam_values[(r.dataset, r.test_env, r.hparams["rho"])].append(100 * r.test_acc)
    cells = [c for c in (DG_CELLS if cells is None else cells) if any(k[:2] == c for k in values)]
    if not cells:
        raise ValueError("no finished SAGE grid runs to plot")
    fig = Figure(figsize=(4.2 * len(scalings), 3.0 * len(cells)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(cells), len(scalings), squeeze=False)
    for i, (dataset, env) in enumerate(cells):
        for j, scaling in enumerate(scalings):
            ax = axes[i][j]
            for (d, e, sc, rho, gamma, measure), accs in sorted(values.items()):
                if (d, e, sc) != (dataset, env, scaling):
                    continue
                mean, lo, hi = mean_ci(accs)
                err = [[mean - lo], [hi - mean]] if not math.isnan(lo) else None
                ax.errorbar(
                    [rho], [mean], yerr=err, fmt=markers[measure], color=colours[gamma], capsize=3,
                    label=f"gamma {gamma:g}, {measure}",
                )  # fmt: skip
            sam_points = sorted((k[2], mean_ci(v)) for k, v in sam_values.items() if k[:2] == (dataset, env))
            if sam_points and scaling == "global":
                ax.errorbar(
                    [rho for rho, _ in sam_points], [m for _, (m, _, _) in sam_points],
                    yerr=[[0.0 if math.isnan(lo) else m - lo for _, (m, lo, _) in sam_points],
                          [0.0 if math.isnan(hi) else hi - m for _, (m, _, hi) in sam_points]],
                    fmt="^-", color="black", lw=0.8, capsize=3, label="SAM",
                )  # fmt: skip
            cell_erm = (dataset, env, "ERM")
            erm = [100 * r.test_acc for r in runs if (r.dataset, r.test_env, r.method) == cell_erm]
            if erm:
                ax.axhline(sum(erm) / len(erm), color="0.4", ls="--", lw=1, label=f"ERM ({len(erm)} trials)")
            ax.set_xscale("log")
            rhos = sorted({h["rho"] for h in SAGE_GRID} | ({h["rho"] for h in SAM_GRID} if sam else set()))
            ax.set_xticks(rhos, [f"{r:g}" for r in rhos])
            ax.minorticks_off()
            ax.set_xlim(rhos[0] / 1.5, rhos[-1] * 1.5)
            ax.set_xlabel("rho")
            ax.set_ylabel("test accuracy (%)")
            name = environment_names(dataset)[env]
            ax.set_title(f"{dataset}, test domain {name}, rho scaling {scaling}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_theory(result: dict[str, Any], path: str | Path) -> Path:
    """The gap against each term (log scale), one colour per DG cell, each cell's one-term fit as
    a dashed line in its colour, the trace with Hutchinson's standard error as a horizontal bar;
    the panel title gives the within-cell R^2 (cell intercepts), or the pooled one with a single
    cell."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    if not rows:
        raise ValueError("no measured runs to plot")
    terms = ("alignment", "trace", "lambda_max")
    fig = Figure(figsize=(13, 3.9))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    cells = sorted({r["cell"] for r in rows})
    colours = dict(zip(cells, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]))
    for ax, term in zip(axes, terms):
        for c in cells:
            mine = [r for r in rows if r["cell"] == c and r[term] > 0]
            pts = [(math.log10(r[term]), 100 * r["gap"]) for r in mine]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=10, color=colours[c], label=c)
            if term == "trace":  # Hutchinson's standard error, as a bar on the log axis
                x = [xi for xi, _ in pts]
                low = [
                    xi - math.log10(max(r["trace"] - r["trace_stderr"], 1e-3 * r["trace"]))
                    for xi, r in zip(x, mine)
                ]
                high = [math.log10(r["trace"] + r["trace_stderr"]) - xi for xi, r in zip(x, mine)]
                ax.errorbar(x, [y for _, y in pts], xerr=[low, high], fmt="none", ecolor=colours[c], lw=0.8)
            fit = result.get("cells", {}).get(c, {}).get(term)
            if fit is not None and pts:
                lo, hi = min(x for x, _ in pts), max(x for x, _ in pts)
                ys = [100 * (fit.intercept + fit.coef[0] * x) for x in (lo, hi)]
                ax.plot([lo, hi], ys, "--", color=colours[c], lw=1)
        scope, fit = ("within cells", result.get("within", {}).get(term)) if len(cells) > 1 else (
            "pooled", result["fits"].get(term)
        )  # fmt: skip
        if fit is not None:
            ax.set_title(f"{scope}: R² = {fit.r2:.2f} [{fit.r2_low:.2f}, {fit.r2_high:.2f}]", fontsize=9)
        ax.set_xlabel(f"log10 {term}")
        ax.set_ylabel("train-domain minus test-domain acc (points)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
