"""The evidence study's results document: the tables of :mod:`torchsage.study.report` and the
figures of :mod:`torchsage.study.figures`, from the run directories or an exported records file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchsage.study.figures import plot_differences, plot_sensitivity, plot_theory
from torchsage.study.pretrained import PT_CELLS, in_pt_cells
from torchsage.study.report import (
    TRAINED_MARGIN,
    DGRun,
    _cell_results,
    _cells_with_results,
    dg_table,
    fit_table,
    gamma_measure_table,
    load_dg,
    load_mtl,
    mtl_table,
    select,
    summary_table,
    trained_payloads,
)
from torchsage.study.spec import DG_CELLS

__all__ = ["load_results", "render", "render_results", "theory_parts"]


def load_results(root: str | Path) -> tuple[list[DGRun], int, list[dict[str, Any]], list[dict[str, Any]]]:
    """``(DG runs, DG jobs not finished, MultiDigits rows, theory payloads)`` from the run
    directories under ``root``: what :func:`render_results` takes (an exported records file gives
    the same through :func:`torchsage.study.records.load`)."""
    from torchsage.study.theory import load_theory

    runs, missing = load_dg(root)
    return runs, missing, load_mtl(root), load_theory(root)


def render(root: str | Path, figures: str | Path) -> str:
    """The study's markdown (tables, figure links) from the runs under ``root``; figures are
    written to ``figures``. Parts not run yet are named as missing, never filled in."""
    return render_results(*load_results(root), figures)


def render_results(
    runs: Sequence[DGRun],
    missing: int,
    mtl: Sequence[dict[str, Any]],
    payloads: Sequence[dict[str, Any]],
    figures: str | Path,
) -> str:
    """:func:`render` from loaded results (the run directories' or an exported records file's).
    Runs and theory payloads of the pretrained regime among ``runs`` and ``payloads`` are left out:
    its results are :func:`torchsage.study.pretrained_report.render_pretrained`'s."""
    from torchsage.dg.datasets import environment_names

    runs = [r for r in runs if (r.dataset, r.test_env) not in PT_CELLS]
    payloads = [p for p in payloads if not in_pt_cells(p)]
    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    finished = len({(r.dataset, r.test_env, r.path.name) for r in runs})  # a run can stand for two arms
    parts = [f"DG runs finished: {finished}; not finished: {missing}."]
    selected = select(runs)
    cells = _cells_with_results(selected)
    started = [c for c in DG_CELLS if c not in cells and any(k[:2] == c for k in selected)]
    if started:
        names = ", ".join(f"{d} {environment_names(d)[e]}" for d, e in started)
        parts.append(f"Not shown until two trials of ERM have finished there: {names}.")
    results = _cell_results(selected, cells, None)
    if len(cells) > 1:
        parts.append(summary_table(selected, results=results))
    if cells:
        plot_differences(selected, figures / "study_differences.png", results)
        parts.append("![paired differences to ERM in every cell](figures/study_differences.png)")
    for dataset, env in cells:
        parts.append(dg_table(selected, dataset, env, environment_names(dataset)[env], results=results))
    if cells and any(r.method == "SAGE" and (r.dataset, r.test_env) in cells for r in runs):
        plot_sensitivity(runs, figures / "study_sensitivity.png", cells)
        parts.append("![SAGE grid: test accuracy against rho and gamma](figures/study_sensitivity.png)")
    followup = gamma_measure_table(selected)
    if followup is not None:
        parts.append(followup)
    parts.append(f"MultiDigits runs finished: {len(mtl)}.")
    if mtl:
        parts.append(mtl_table(mtl))
    if payloads:
        parts += theory_parts(runs, payloads, figures, "study_theory.png")
    return "\n\n".join(parts) + "\n"


def theory_parts(
    runs: Sequence[DGRun],
    payloads: Sequence[dict[str, Any]],
    figures: Path,
    figure: str,
    caption: str = "Out-of-domain gap regressed on the terms",
    alt: str = "out-of-domain gap against the terms",
) -> list[str]:
    """The theory test's blocks of a results document: the fits of ``payloads``
    (:func:`torchsage.study.theory.fits`, :func:`~torchsage.study.report.fit_table` under
    ``caption``), their figure (``figures / figure``, when a run was fitted) and, when some sampled
    runs did not train (:func:`~torchsage.study.report.trained_payloads` by their runs among
    ``runs``), the same fits without them."""
    from torchsage.study.theory import fits

    result = fits(payloads)
    parts = [fit_table(result, caption=caption)]
    if result["rows"]:
        plot_theory(result, figures / figure)
        parts.append(f"![{alt}](figures/{figure})")
    trained = trained_payloads(runs, payloads)
    if len(trained) < len(payloads):
        caption = (
            f"The same fits on the sampled runs that trained (training-domain validation at least "
            f"chance + {TRAINED_MARGIN:g}): {len(trained)} of {len(payloads)}"
        )
        parts.append(fit_table(fits(trained), caption=caption))
    return parts
