"""The pretrained regime's results (:mod:`torchsage.study.pretrained`): tables and figures, from its
run directories or an exported records file, in their own document (``docs/study_pretrained_results.md``,
written by ``python -m torchsage.study report`` next to the first study's, which stays as it was).

Per cell (EmojiStyles with one design held out), two tables of every method against ERM and
against SAM, paired by trial (bootstrap 95% intervals, Wilcoxon p Holm-adjusted over the table's
comparisons), as the first study's :func:`torchsage.study.report.dg_table`:

* **training-domain validation**: within each (cell, trial, method), the choice with the best
  mean ``out`` accuracy of the training designs (the study's selection);
* **oracle**: DomainBed's test-domain validation, the choice with the best ``out`` accuracy of the
  held-out design. It peeks at the test domain, so it is an upper reference, not a result.

Both report the held-out design's ``in`` accuracy of the selected choice, and in both a method
counts in a trial only once every one of its choices finished there. Before them, the **core
comparison** (the arms of :data:`torchsage.study.pretrained.PT_CORE_ARMS`, which run first: ERM, SAM
at rho 0.05, SAGE at its defaults and at the authors' DG values), one choice per method, so nothing
is selected; it is the comparison the study was powered for, and the first to complete. Figures: the paired
differences to ERM (``pretrained_differences.png``) and the test accuracy of SAM's and SAGE's
grid choices against rho (``pretrained_sensitivity.png``).

Last, with theory payloads of its runs (``python -m torchsage.study theory --pretrained``), the
theory test on the last layer (:func:`torchsage.study.theory.measure_run` with
``layer="classifier"``): the first study's fits and figure (``pretrained_theory.png``), the runs
that trained filtered as there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torchsage.study.figures import plot_differences, plot_sensitivity
from torchsage.study.pretrained import (
    PT_CELLS,
    in_pt_cells,
    is_core,
    pt_ablation_arms,
    pt_arms,
    pt_core_arms,
    pt_gamma_arms,
    pt_head_arms,
    pt_jobs,
    pt_schedule_arms,
)
from torchsage.study.pretrained_schedules import SCHEDULE_CAPTION, SCHEDULE_NOTE, schedule_columns
from torchsage.study.render import theory_parts
from torchsage.study.report import (
    TRAINED_MARGIN,
    DGRun,
    _cell_results,
    _cells_with_results,
    dg_table,
    load_jobs,
    select,
    trained_payloads,
)
from torchsage.study.spec import Arm

__all__ = [
    "FOLLOW_UPS",
    "NO_RUNS",
    "chosen_note",
    "core_runs",
    "load_pt",
    "load_pt_theory",
    "render_pretrained",
    "render_pretrained_runs",
]

#: the follow-ups with runs of their own: :func:`~torchsage.study.pretrained.pt_jobs`'s option and arms
FOLLOW_UPS: dict[str, Callable[[], list[Arm]]] = {
    "heads": pt_head_arms,
    "schedules": pt_schedule_arms,
    "gamma": pt_gamma_arms,
}

#: what the document says before any run of the regime has finished
NO_RUNS = "The pretrained regime (EmojiStyles, EfficientNet-Lite0) has no finished runs yet."


def load_pt(root: str | Path, **job_options: Any) -> tuple[list[DGRun], int]:
    """The finished runs of the pretrained regime under ``root`` (``job_options``: those of
    :func:`torchsage.study.pretrained.pt_jobs`), with the test domain's ``out`` accuracy the oracle
    selects by, and the number of its jobs not finished. Without ``job_options``, also the finished
    runs of the follow-ups on the first cell (:data:`FOLLOW_UPS`: the classifier's direction, the
    schedules, the noise scale; their unfinished runs are not counted: they are not the study's)."""
    runs, missing = load_jobs(pt_jobs(str(root), **job_options), pt_arms(), oracle=True)
    if not job_options:
        for option, make in FOLLOW_UPS.items():
            jobs = pt_jobs(str(root), cells=PT_CELLS[:1], **{option: True})
            runs += load_jobs(jobs, make(), oracle=True)[0]
    return runs, missing


def load_pt_theory(root: str | Path) -> list[dict[str, Any]]:
    """The theory payloads (``theory.json``) of the pretrained regime's runs under ``root``."""
    from torchsage.study.theory import load_theory

    return [p for p in load_theory(root) if in_pt_cells(p)]


def core_runs(runs: Sequence[DGRun]) -> list[DGRun]:
    """The runs among ``runs`` that are choices of :func:`torchsage.study.pretrained.pt_core_arms`
    (SAM's rho 0.05 among SAM's, SAGE's default run as ``SAGE (default)`` only)."""
    return [r for r in runs if is_core(r)]


def render_pretrained(root: str | Path, figures: str | Path) -> str:
    """The pretrained regime's markdown from the runs under ``root`` and their theory payloads;
    figures go to ``figures``."""
    return render_pretrained_runs(*load_pt(root), figures, load_pt_theory(root))


def render_pretrained_runs(
    runs: Sequence[DGRun],
    missing: int | None,
    figures: str | Path,
    payloads: Sequence[dict[str, Any]] = (),
) -> str:
    """:func:`render_pretrained` from loaded runs (the run directories' or a records file's; runs
    of other cells are left out). ``missing``: jobs not finished (``None``: not known).
    ``payloads``: theory payloads; those of the regime's cells measured on the classifier
    (``layer="classifier"``) are rendered (:func:`_theory`), any others left out."""
    from torchsage.dg.datasets import environment_names

    runs = [r for r in runs if (r.dataset, r.test_env) in PT_CELLS]
    if not runs:
        return NO_RUNS + "\n"
    figures = Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    arms = pt_arms()
    finished = len({(r.dataset, r.test_env, r.path.name) for r in runs})  # a run can stand for two arms
    left = "not counted (records exported before the regime)" if missing is None else missing
    parts = [f"Pretrained-regime runs finished: {finished}; not finished: {left}."]
    selected = select(runs, arms)
    oracle = select(runs, arms, by="oracle_acc")
    cells = _cells_with_results(selected, PT_CELLS)
    started = [c for c in PT_CELLS if c not in cells and any(k[:2] == c for k in selected)]
    if started:
        names = ", ".join(f"{d} {environment_names(d)[e]}" for d, e in started)
        parts.append(f"Not shown until two trials of ERM have finished there: {names}.")
    core_arms = pt_core_arms()
    core = select(core_runs(runs), core_arms)
    core_cells = _cells_with_results(core, PT_CELLS)
    core_results = _cell_results(core, core_cells, None, core_arms)
    for dataset, env in core_cells:
        caption = (
            f"{dataset}, test domain {environment_names(dataset)[env]}: core comparison, one choice per "
            "method (SAM at rho 0.05; SAGE at its defaults and at the authors' DG values), nothing selected"
        )
        parts.append(dg_table(core, dataset, env, "", results=core_results, arms=core_arms, caption=caption))
    if core_cells:
        path = figures / "pretrained_core_differences.png"
        note = _figure(core, path, core_results, core_cells, core_arms)
        parts.append(
            f"![paired differences to ERM, core comparison](figures/pretrained_core_differences.png){note}"
        )
    parts += _head_tables(runs)
    results = _cell_results(selected, cells, None, arms)
    if cells:
        note = _figure(selected, figures / "pretrained_differences.png", results, cells, arms)
        parts.append(
            f"![paired differences to ERM, pretrained regime](figures/pretrained_differences.png){note}"
        )
    oracle_results = _cell_results(oracle, cells, None, arms)
    for dataset, env in cells:
        name = environment_names(dataset)[env]
        notes = [n] if (n := chosen_note(selected, dataset, env, arms)) else []
        parts.append(dg_table(selected, dataset, env, name, results=results, arms=arms, notes=notes))
        caption = (
            f"{dataset}, test domain {name}: oracle selection (the choice with the best accuracy on the "
            "test domain's out split; it peeks at the test domain, an upper reference, not a result)"
        )
        notes = [n] if (n := chosen_note(oracle, dataset, env, arms)) else []
        table = dg_table(
            oracle, dataset, env, name, results=oracle_results, arms=arms, caption=caption, notes=notes
        )
        parts.append(table)
    if cells and any(r.method == "SAGE" and (r.dataset, r.test_env) in cells for r in runs):
        plot_sensitivity(runs, figures / "pretrained_sensitivity.png", cells, sam=True)
        parts.append(
            "![SAM's and SAGE's grids: test accuracy against rho, pretrained regime]"
            "(figures/pretrained_sensitivity.png)"
        )
    parts += _theory(runs, payloads, figures)
    return "\n\n".join(parts) + "\n"


def chosen_note(chosen: dict, dataset: str, env: int, arms: Sequence[Arm]) -> str:
    """Which of its choices the selection picked, for every method with more than one, and in how
    many trials: the hyperparameters that differ among the method's arms, most often picked first
    ("" when no such method has a selected trial in the cell).

    Example:
        >>> from torchsage.study.report import DGRun
        >>> arms = [Arm("SAM", "SAM", {"rho": r}) for r in (0.05, 0.1)]
        >>> runs = {t: DGRun("D", 0, t, "SAM", {"rho": 0.1 if t else 0.05}, 0, 0, Path()) for t in range(3)}
        >>> chosen_note({("D", 0, "SAM"): runs}, "D", 0, arms)
        'Chosen in each trial: SAM rho 0.1 (2 trials), rho 0.05 (1).'
    """
    grids: dict[str, list[Arm]] = {}
    for arm in arms:
        grids.setdefault(arm.method, []).append(arm)
    said = []
    for method, grid in grids.items():
        trials = chosen.get((dataset, env, method), {})
        if len(grid) < 2 or not trials:
            continue
        keys = [k for k in grid[0].hparams if len({repr(a.hparams.get(k)) for a in grid}) > 1]
        picked = Counter(", ".join(f"{k} {r.hparams.get(k)}" for k in keys) for r in trials.values())
        counts = [f"{label} ({n})" for label, n in picked.most_common()]
        unit = " trial)" if picked.most_common(1)[0][1] == 1 else " trials)"
        counts[0] = counts[0][:-1] + unit
        said.append(f"{method} {', '.join(counts)}")
    return f"Chosen in each trial: {'; '.join(said)}." if said else ""


def _theory(runs: Sequence[DGRun], payloads: Sequence[dict[str, Any]], figures: Path) -> list[str]:
    """The theory test on the last layer: the fits of the regime's classifier-layer payloads, with
    the run count and the first study's filter of the runs that trained in the caption."""
    from torchsage.study.theory import payload_layer

    mine = [p for p in payloads if in_pt_cells(p) and payload_layer(p) == "classifier"]
    if not mine:
        return []
    trained = len(trained_payloads(runs, mine))
    caption = (
        "Pretrained regime: out-of-domain gap regressed on the last layer's terms (the classifier's "
        f"Hessian and gradients only, on cached penultimate features), {len(mine)} measured runs; "
        f"{trained} of them trained (training-domain validation at least chance + {TRAINED_MARGIN:g}, "
        "the first study's filter)"
    )
    alt = "out-of-domain gap against the last layer's terms, pretrained regime"
    return theory_parts(runs, mine, figures, "pretrained_theory.png", caption=caption, alt=alt)


def _figure(chosen: Any, path: Path, results: Any, cells: Any, arms: list[Arm]) -> str:
    """Draws the paired differences to ERM of ``arms`` to ``path``, leaving out an arm that
    diverged (more than 20 points below ERM in a cell: it would squash the others' intervals; the
    tables have it); returns the note that names what was left out ("" for nothing)."""
    far = [
        a.method
        for a in arms
        if any((p := results[c][1].get((a.method, "ERM"))) and p.mean < -0.2 for c in cells)
    ]
    plot_differences(chosen, path, results, cells=cells, arms=[a for a in arms if a.method not in far])
    return f" ({', '.join(far)}: more than 20 points below ERM, in the table only)" if far else ""


def _head_tables(runs: Sequence[DGRun]) -> list[str]:
    """The follow-ups' tables per cell where every extra arm has two finished trials in common,
    one choice per method, against ERM and SAGE (default) of the same trials: the ablations (SAGE's
    two halves at its defaults), the classifier's ascent direction (SAGE at its defaults with the
    classifier on each direction), the ascent schedules (with step times,
    :mod:`torchsage.study.pretrained_schedules`) and the noise scale (with the curvature-only
    ablation as gamma 0)."""
    one = ", one choice per method"
    heads = "the classifier's ascent direction (SAGE at its defaults; polar is the default's)" + one
    ablations = "SAGE's halves at its defaults (the ablations)" + one
    gamma = "SAGE's noise scale (SAGE at its defaults, gamma 1e-3; SAGE_CurvatureOnly is gamma 0)" + one
    curvature = [a for a in pt_ablation_arms() if a.method == "SAGE_CurvatureOnly"]
    return (
        _follow_up(runs, pt_ablation_arms(), ablations)
        + _follow_up(runs, pt_head_arms(), heads)
        + _follow_up(runs, pt_schedule_arms(), SCHEDULE_CAPTION, schedule_columns, [SCHEDULE_NOTE])
        + _follow_up(runs, pt_gamma_arms(), gamma, after=curvature)
    )


def _follow_up(
    runs: Sequence[DGRun],
    extra: list[Arm],
    what: str,
    columns: Callable[..., dict[str, dict[str, str]]] | None = None,
    notes: Sequence[str] = (),
    after: Sequence[Arm] = (),
) -> list[str]:
    """One follow-up's tables: ERM, SAGE (default), ``extra`` and then ``after`` (arms of other
    parts shown for reference); ``columns(chosen, dataset, env, methods)`` adds columns."""
    from torchsage.dg.datasets import environment_names

    arms = [a for a in pt_core_arms() if a.method in ("ERM", "SAGE (default)")] + extra + list(after)
    methods = [a.method for a in arms]
    chosen = select([r for r in runs if r.method in methods], arms)
    tables = []
    for dataset, env in PT_CELLS:
        if len(set.intersection(*(set(chosen.get((dataset, env, a.method), {})) for a in extra))) < 2:
            continue
        caption = f"{dataset}, test domain {environment_names(dataset)[env]}: {what}"
        more = None if columns is None else columns(chosen, dataset, env, methods)
        bases = ("ERM", "SAGE (default)")
        table = dg_table(
            chosen, dataset, env, "", arms=arms, caption=caption, bases=bases, columns=more, notes=notes
        )
        tables.append(table)
    return tables
