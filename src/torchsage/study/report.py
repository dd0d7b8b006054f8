"""The evidence study's tables and figures, from its run directories.

**Selection** (DG): within each (cell, trial, method), the hyperparameter choice with the best
training-domain validation accuracy at the last step (mean of the training domains' ``out``
splits) is kept (ties: the first in the grid's order); a method counts in a trial only once every
one of its choices finished there, so a half-finished part cannot bias the selection.

**Comparisons**: each method against ERM and against SAM, paired by trial
(:func:`torchsage.study.stats.paired_comparison`); the p-values of one table (one cell, every
comparison in it) form one Holm family. MultiDigits: each solver's variants against the plain
solver and against the solver with SAM, Delta-m% (lower is better) paired by seed, one Holm family
for the whole table.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torchsage.harness.records import read_json_lines
from torchsage.harness.tables import render_table
from torchsage.study.spec import (
    DG_CELLS,
    FOLLOWUP_CELLS,
    Arm,
    dg_arms,
    dg_jobs,
    gamma_measure_arms,
    mtl_jobs,
    part_jobs,
)
from torchsage.study.stats import Paired, holm, mean_ci, paired_comparison

__all__ = [
    "DGRun",
    "cell_comparisons",
    "compare",
    "dg_table",
    "fit_table",
    "gamma_measure_table",
    "load_dg",
    "load_jobs",
    "load_mtl",
    "mtl_table",
    "select",
    "summary_table",
    "trained_payloads",
]


@dataclass(frozen=True)
class DGRun:
    """The last result line of one finished DG run of the study."""

    dataset: str
    test_env: int
    trial: int
    method: str
    hparams: dict[str, Any]
    val_acc: float  # training domains' out splits, mean
    test_acc: float  # test domain's in split
    path: Path
    #: SAGE's disagreement D, averaged over the run's steps after the first (None: not logged)
    disagreement: float | None = None
    #: test domain's out split, what the oracle selects by (None: not loaded, as in the first study)
    oracle_acc: float | None = None
    #: the harness's ``step_time`` at the last checkpoint, seconds (nan: records written without it)
    step_time: float = float("nan")


def _accuracies(record: dict[str, Any], test_env: int) -> tuple[float, float]:
    envs = sorted(
        {int(k[3:].split("_")[0]) for k in record if k.startswith("env") and k.endswith("_out_acc")}
    )
    val = [record[f"env{i}_out_acc"] for i in envs if i != test_env]
    return sum(val) / len(val), float(record[f"env{test_env}_in_acc"])


def _all_arms() -> list[Arm]:
    return dg_arms() + gamma_measure_arms()


def last_records(jobs: Sequence[Any]) -> tuple[list[tuple[Any, dict[str, Any]]], int]:
    """Each finished job with the last line of its results.jsonl, and how many are not finished."""
    finished = [job for job in jobs if job.state == "done"]
    last = [read_json_lines(job.output_dir / "results.jsonl")[0][-1] for job in finished]
    return list(zip(finished, last)), len(jobs) - len(finished)


def load_dg(root: str | Path, **job_options: Any) -> tuple[list[DGRun], int]:
    """The finished runs of the DG study under ``root`` (found through the specification's jobs,
    the follow-up's included unless ``job_options`` restrict them); returns them and the number of
    jobs not finished."""
    jobs = dg_jobs(root, **job_options)
    if not job_options:  # the follow-up's runs; the default's is already among the main jobs
        known = {job.output_dir for job in jobs}
        jobs += [job for job in part_jobs(root, "dg-gamma-measure") if job.output_dir not in known]
    return load_jobs(jobs, _all_arms())


def load_jobs(jobs: Sequence[Any], arms: Sequence[Arm], oracle: bool = False) -> tuple[list[DGRun], int]:
    """The finished runs among ``jobs`` (``dg_jobs``' jobs), one :class:`DGRun` per arm of ``arms``
    each stands for, and the number of jobs not finished; ``oracle``: also read the test domain's
    ``out`` accuracy (:attr:`DGRun.oracle_acc`)."""
    methods: dict[tuple[str, str], list[str]] = defaultdict(list)
    for arm in arms:
        methods[(arm.algorithm, arm.hparams_json())].append(arm.method)
    runs, missing = [], 0
    for job in jobs:
        if job.state != "done":
            missing += 1
            continue
        records, _ = read_json_lines(job.output_dir / "results.jsonl")
        s = job.settings
        val, test = _accuracies(records[-1], s["test_env"])
        hp = json.dumps(s["hparams"], sort_keys=True)
        d = records[-1].get("disagreement")
        o = float(records[-1][f"env{s['test_env']}_out_acc"]) if oracle else None
        step_time = float(records[-1].get("step_time", float("nan")))
        for method in methods[(s["algorithm"], hp)]:  # one run can stand for two arms
            runs.append(
                DGRun(
                    s["dataset"],
                    s["test_env"],
                    s["trial"],
                    method,
                    s["hparams"],
                    val,
                    test,
                    job.output_dir,
                    None if d is None else float(d),
                    o,
                    step_time,
                )
            )
    return runs, missing


def select(
    runs: Sequence[DGRun], arms: Sequence[Arm] | None = None, by: str = "val_acc"
) -> dict[tuple[str, int, str], dict[int, DGRun]]:
    """``{(dataset, test_env, method): {trial: selected run}}`` by training-domain validation
    (``by="oracle_acc"``: DomainBed's oracle, the test domain's ``out`` split). ``arms``: the
    study's arms (default: the first study's), which say how many choices each method has."""
    choices = defaultdict(int)
    for arm in _all_arms() if arms is None else arms:
        choices[arm.method] += 1
    grouped: dict[tuple[str, int, str, int], list[DGRun]] = defaultdict(list)
    for r in runs:
        grouped[(r.dataset, r.test_env, r.method, r.trial)].append(r)
    out: dict[tuple[str, int, str], dict[int, DGRun]] = defaultdict(dict)
    for (dataset, env, method, trial), group in sorted(grouped.items(), key=lambda kv: kv[0]):
        if len(group) < choices[method]:
            continue  # some choice of this method is not finished in this trial
        if any(getattr(r, by) is None for r in group):
            raise ValueError(f"{dataset} env {env} trial {trial} {method}: a run has no {by} to select by")
        best = max(group, key=lambda r: getattr(r, by))  # max keeps the first of equal values
        out[(dataset, env, method)][trial] = best
    return dict(out)


def compare(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """Paired comparison over the trials both have (``None`` with fewer than 2)."""
    trials = sorted(set(a) & set(b))
    if len(trials) < 2:
        return None
    return paired_comparison([a[t] for t in trials], [b[t] for t in trials])


def _ci(values: Sequence[float], scale: float = 100.0) -> str:
    mean, lo, hi = mean_ci(values)
    if math.isnan(lo):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} [{scale * lo:.1f}, {scale * hi:.1f}]"


def _diff(p: Paired | None, scale: float = 100.0) -> str:
    if p is None:
        return "–"
    mark = " *" if p.significant() else ""
    return f"{scale * p.mean:+.1f} [{scale * p.low:+.1f}, {scale * p.high:+.1f}] p={p.p_adjusted:.2g}{mark}"


def _holm_all(comparisons: dict[Any, Paired | None]) -> dict[Any, Paired | None]:
    keys = [k for k, v in comparisons.items() if v is not None]
    adjusted = holm([comparisons[k].p for k in keys])  # type: ignore[union-attr]
    out = dict(comparisons)
    for k, p in zip(keys, adjusted):
        out[k] = replace(comparisons[k], p_adjusted=p)  # type: ignore[arg-type]
    return out


def cell_comparisons(
    selected: dict[tuple[str, int, str], dict[int, DGRun]],
    dataset: str,
    test_env: int,
    arms: Sequence[Arm] | None = None,
    bases: tuple[str, ...] = ("ERM", "SAM"),
) -> tuple[dict[str, dict[int, float]], dict[tuple[str, str], Paired | None]]:
    """One cell's selected test accuracies ``{method: {trial: acc}}`` and every method's paired
    comparison with each of ``bases`` (default: ERM and SAM) ``{(method, base): Paired}``,
    Holm-adjusted as one family. ``arms``: the study's arms, in table order (default: the first
    study's)."""
    methods = list(dict.fromkeys(a.method for a in (dg_arms() if arms is None else arms)))
    acc = {m: {t: r.test_acc for t, r in selected.get((dataset, test_env, m), {}).items()} for m in methods}
    comparisons: dict[tuple[str, str], Paired | None] = {}
    for m in methods:
        for base in bases:
            if m != base and acc[m] and acc[base]:
                comparisons[(m, base)] = compare(acc[m], acc[base])
    return acc, _holm_all(comparisons)


CellResults = dict[tuple[str, int], tuple[dict[str, dict[int, float]], dict[tuple[str, str], Paired | None]]]


def _cell_results(
    selected: dict[tuple[str, int, str], dict[int, DGRun]],
    cells: Sequence[tuple[str, int]],
    known: CellResults | None,
    arms: Sequence[Arm] | None = None,
    bases: tuple[str, ...] = ("ERM", "SAM"),
) -> CellResults:
    """:func:`cell_comparisons` for ``cells``, reusing those already in ``known`` (the bootstrap is
    the report's costliest step: :func:`torchsage.study.render.render_results` computes each cell
    once for all outputs)."""
    known = known or {}
    return {c: known[c] if c in known else cell_comparisons(selected, *c, arms, bases) for c in cells}


def dg_table(
    selected: dict[tuple[str, int, str], dict[int, DGRun]],
    dataset: str,
    test_env: int,
    env_name: str,
    fmt: str = "markdown",
    results: CellResults | None = None,
    arms: Sequence[Arm] | None = None,
    caption: str | None = None,
    bases: tuple[str, ...] = ("ERM", "SAM"),
    columns: dict[str, dict[str, str]] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """One cell's table: test accuracy (mean, 95% t-interval) and the paired differences.
    ``results``: cells' comparisons already computed (see :func:`_cell_results`); ``arms``: the
    study's arms (default: the first study's); ``caption``: instead of the default one; ``bases``:
    the two methods every row is compared with; ``columns``: more columns, ``{header: {method:
    cell}}`` ("–" where a method has none); ``notes``: more notes under the table."""
    cell = (dataset, test_env)
    acc, comparisons = _cell_results(selected, [cell], results, arms, bases)[cell]
    rows = []
    for m, values in acc.items():
        if not values:
            continue
        rows.append(
            [
                m,
                str(len(values)),
                _ci(list(values.values())),
                *(_diff(comparisons.get((m, base))) for base in bases),
                *(cells.get(m, "–") for cells in (columns or {}).values()),
            ]
        )
    header = ["Method", "trials", "test acc (%) [95% CI]", *(f"Δ vs {b} [95% CI] p" for b in bases)]
    header += list(columns or {})
    caption = caption or f"{dataset}, test domain {env_name}: training-domain validation"
    all_notes = [
        "Δ: mean paired difference in points (same trial seeds); interval: paired bootstrap; p: Wilcoxon "
        "signed-rank, Holm-adjusted over this table; * p < 0.05.",
        *notes,
    ]
    return render_table(header, rows, caption=caption, fmt=fmt, notes=all_notes)  # type: ignore[arg-type]


def _mean_disagreement(runs: dict[int, DGRun], trials: Sequence[int]) -> str:
    values = [runs[t].disagreement for t in trials]
    return "–" if any(v is None for v in values) else f"{statistics.fmean(values):.2f}"  # type: ignore[arg-type]


def _mean_of(x: dict[int, float], y: dict[int, float]) -> dict[int, float]:
    """Trial by trial, the mean of two runs' accuracies."""
    return {t: (x[t] + y[t]) / 2 for t in x}


def gamma_measure_table(
    selected: dict[tuple[str, int, str], dict[int, DGRun]], fmt: str = "markdown"
) -> str | None:
    """The follow-up's 2 x 2 of gamma and the disagreement measure, every cell of it with at least
    two trials of all four runs: each run's test accuracy, its paired difference to the default
    (gamma 1e-3, normalized_std), the two main effects (each factor's levels compared within the
    trials, averaged over the other factor) and the interaction (how much the measure's effect
    changes with gamma), Holm-adjusted over the cell's six comparisons. ``None`` before then."""
    from torchsage.dg.datasets import environment_names

    arms = gamma_measure_arms()
    (low_n, low_c), (high_n, high_c) = [[a.method for a in arms[i : i + 2]] for i in (0, 2)]
    sections = []
    for dataset, env in FOLLOWUP_CELLS:
        acc = {a.method: selected.get((dataset, env, a.method), {}) for a in arms}
        trials = sorted(set.intersection(*(set(v) for v in acc.values())))
        if len(trials) < 2:
            continue
        a = {m: {t: acc[m][t].test_acc for t in trials} for m in acc}
        comparisons: dict[str, Paired | None] = {m: compare(a[m], a[low_n]) for m in (low_c, high_n, high_c)}
        comparisons["gamma 1e-2 vs 1e-3"] = compare(
            _mean_of(a[high_n], a[high_c]), _mean_of(a[low_n], a[low_c])
        )
        comparisons["cosine vs normalized_std"] = compare(
            _mean_of(a[low_c], a[high_c]), _mean_of(a[low_n], a[high_n])
        )
        # interaction: the measure's effect at gamma 1e-2 minus its effect at gamma 1e-3
        comparisons["interaction"] = compare(
            {t: a[high_c][t] - a[high_n][t] for t in trials}, {t: a[low_c][t] - a[low_n][t] for t in trials}
        )
        comparisons = _holm_all(comparisons)
        rows = [
            [
                m,
                str(len(trials)),
                _ci(list(a[m].values())),
                _mean_disagreement(acc[m], trials),
                _diff(comparisons.get(m)),
            ]
            for m in a
        ]
        rows += [[name, str(len(trials)), "", "", _diff(comparisons[name])] for name in list(comparisons)[3:]]
        caption = (
            f"Follow-up: gamma x disagreement measure, {dataset}, test domain "
            f"{environment_names(dataset)[env]} (global scaling, rho 0.05)"
        )
        notes = [
            "Δ: paired over the trials, in points: each run against the default (gamma 1e-3, "
            "normalized_std); a factor's main effect is its level's mean over the other factor's two "
            "levels against the other level's; interaction: cosine's effect at gamma 1e-2 minus its "
            "effect at gamma 1e-3. Paired bootstrap interval, Wilcoxon p Holm-adjusted over the six "
            "comparisons; * p < 0.05. Mean D: the disagreement each run logged (its mean over the run's "
            "steps), averaged over the trials; the noise std is gamma x D."
        ]
        header = ["Run or effect", "trials", "test acc (%) [95% CI]", "mean D", "Δ [95% CI] p"]
        sections.append(render_table(header, rows, caption=caption, fmt=fmt, notes=notes))  # type: ignore[arg-type]
    return "\n\n".join(sections) if sections else None


def _cells_with_results(
    selected: dict[tuple[str, int, str], dict[int, DGRun]], cells: Sequence[tuple[str, int]] = DG_CELLS
) -> list[tuple[str, int]]:
    """The ``cells`` with at least two finished trials of ERM (the fewest a paired comparison takes)."""
    return [c for c in cells if len(selected.get((*c, "ERM"), {})) >= 2]


def summary_table(
    selected: dict[tuple[str, int, str], dict[int, DGRun]],
    fmt: str = "markdown",
    results: CellResults | None = None,
) -> str:
    """Every method's paired difference to ERM, one column per finished cell (the same numbers
    and Holm adjustment as the cells' own tables)."""
    from torchsage.dg.datasets import environment_names

    cells = _cells_with_results(selected)
    results = _cell_results(selected, cells, results)
    per_cell = [results[c][1] for c in cells]
    methods = [m for m in dict.fromkeys(a.method for a in dg_arms()) if m != "ERM"]
    rows = [[m] + [_diff(c.get((m, "ERM"))) for c in per_cell] for m in methods]
    trials = [len(selected.get((d, e, "ERM"), {})) for d, e in cells]
    header = ["Method"] + [f"{d} {environment_names(d)[e]} ({n} trials)" for (d, e), n in zip(cells, trials)]
    notes = [
        "Δ vs ERM in test-accuracy points, paired over the cell's trials: mean [paired bootstrap 95% "
        "CI], Wilcoxon p Holm-adjusted within the cell (as in the cell's table); * p < 0.05."
    ]
    return render_table(
        header, rows, caption="Summary: difference to ERM in every cell", fmt=fmt, notes=notes
    )  # type: ignore[arg-type]


def load_mtl(root: str | Path) -> list[dict[str, Any]]:
    """The last record of every finished MultiDigits run of the study, with its variant label
    (``plain``, ``sage``, ``sam`` or ``sage (authors)``)."""
    out = []
    for job in mtl_jobs(root):
        if job.state != "done":
            continue
        records, _ = read_json_lines(job.output_dir / "results.jsonl")
        last = records[-1]
        s = job.settings
        variant = s["method"] + (" (authors)" if "--preset" in s["options"] else "")
        out.append(
            {"solver": s["solver"], "variant": variant, "seed": s["seed"], "delta_m": last.get("delta_m")}
        )
    return out


def mtl_table(rows: Sequence[dict[str, Any]], fmt: str = "markdown") -> str:
    """Delta-m% per solver and variant (mean, 95% t-interval), paired differences to the plain
    solver and to the solver with SAM (lower is better), one Holm family."""
    values: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r["solver"] != "stl" and r["delta_m"] is not None:
            values[(r["solver"], r["variant"])][r["seed"]] = float(r["delta_m"])
    order = ["plain", "sage", "sam", "sage (authors)"]
    comparisons: dict[tuple[str, str, str], Paired | None] = {}
    for (solver, variant), v in values.items():
        for base in ("plain", "sam"):
            if variant != base and (solver, base) in values:
                comparisons[(solver, variant, base)] = compare(v, values[(solver, base)])
    comparisons = _holm_all(comparisons)
    table = []
    for solver in sorted({k[0] for k in values}):
        for variant in order:
            if (solver, variant) not in values:
                continue
            v = values[(solver, variant)]
            table.append(
                [
                    f"{solver} {variant}",
                    str(len(v)),
                    _ci(list(v.values()), 1.0),
                    _diff(comparisons.get((solver, variant, "plain")), 1.0),
                    _diff(comparisons.get((solver, variant, "sam")), 1.0),
                ]
            )
    header = ["Solver", "seeds", "Δm% [95% CI] ↓", "Δ vs plain [95% CI] p", "Δ vs SAM [95% CI] p"]
    notes = [
        "Paired by seed; interval: paired bootstrap; p: Wilcoxon signed-rank, Holm over this table; "
        "* p < 0.05."
    ]
    return render_table(
        header,
        table,
        caption="MultiDigits, 10 epochs: Δm% against single-task learning",
        fmt=fmt,
        notes=notes,
    )  # type: ignore[arg-type]


def fit_table(
    result: dict[str, Any],
    fmt: str = "markdown",
    caption: str = "Out-of-domain gap regressed on the terms",
) -> str:
    """The theory fits, every scope of :func:`torchsage.study.theory.fits`: coefficients with
    bootstrap intervals, R^2 with its interval."""
    scopes = [("all runs, pooled", result["fits"])]
    if result.get("within"):
        scopes.append(("all runs, within cells", result["within"]))
    scopes += (
        [(cell, f) for cell, f in result.get("cells", {}).items()] if len(result.get("cells", {})) > 1 else []
    )
    rows = []
    for scope, scope_fits in scopes:
        for name, fit in scope_fits.items():
            coefs = "; ".join(
                f"{n}: {c:+.3g} [{lo:+.3g}, {hi:+.3g}]"
                for n, c, lo, hi in zip(fit.names, fit.coef, fit.coef_low, fit.coef_high)
            )
            r2 = f"{fit.r2:.2f} [{fit.r2_low:.2f}, {fit.r2_high:.2f}]"
            rows.append([scope, name, str(fit.n), coefs, r2])
    notes = [
        "Gap in accuracy (fraction), so a slope of +0.01 is +1 point per tenfold increase of the term. "
        "Within cells: one intercept per cell (the cells' gaps differ by tens of points), slopes and R² "
        "from the variation inside the cells; bootstrap resampled within each cell.",
        f"{result['dropped']} sampled run(s) left out: curvature found indefinite beyond the damping "
        "(alignment undefined).",
    ]
    zero = {n: sum(r[n] <= 0 for r in result["rows"]) for n in ("alignment", "trace", "lambda_max")}
    if any(zero.values()):
        counts = ", ".join(f"{k} {v}" for k, v in zero.items() if v)
        notes.append(
            f"Runs with a term of zero have no logarithm and are left out of the fits using it ({counts}): "
            "identical gradients on every training distribution give an alignment term of exactly 0."
        )
    if result["rows"]:
        notes.append(measurement_precision(result["rows"]))
    return render_table(
        ["Scope", "Predictors", "runs", "slope per decade [95% CI]", "R² [95% CI]"],
        rows,
        caption=caption,
        fmt=fmt,
        notes=notes,
    )  # type: ignore[arg-type]


def measurement_precision(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence on how precisely the terms of the fitted runs were measured: the Hutchinson
    trace's standard error relative to the trace, the conjugate-gradient solves' largest relative
    residual and iteration count, and the Lanczos residual of lambda_max relative to it."""
    rel_se = [r["trace_stderr"] / r["trace"] for r in rows if r["trace"] > 0]
    parts = []
    if rel_se:
        parts.append(
            f"Hutchinson standard error of tr H̄ median {100 * statistics.median(rel_se):.1f}%, "
            f"largest {100 * max(rel_se):.1f}% of the trace"
        )
    residual, its = max(r["cg_residual"] for r in rows), max(r["cg_iterations"] for r in rows)
    parts.append(f"CG relative residual at most {residual:.2g} ({its} iterations at most)")
    lam = [r["lambda_residual"] / r["lambda_max"] for r in rows if r["lambda_max"] > 0]
    if lam and all(math.isfinite(v) for v in lam):
        parts.append(f"Lanczos residual of λ_max at most {100 * max(lam):.2g}% of it")
    return f"Measurement precision over the {len(rows)} fitted runs: " + "; ".join(parts) + "."


#: labels of the study's data sets (checked against the registry by the tests)
N_CLASSES = {"RotatedDigits": 10, "ColoredDigits": 2, "EmojiStyles": 10}
#: a sampled run counts as trained when its training-domain validation accuracy is at least chance
#: (1 / number of labels) plus this margin
TRAINED_MARGIN = 0.1


def trained_payloads(runs: Sequence[DGRun], payloads: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The theory payloads of the runs that trained: training-domain validation accuracy at least
    chance plus :data:`TRAINED_MARGIN` (0.2 on RotatedDigits and EmojiStyles, 0.6 on ColoredDigits).
    A run that never left chance has a gap near zero and low curvature, so a few of them can carry
    a fit across a cell; this scope shows the fits without them. Payloads of runs not in ``runs``
    are kept."""
    val = {r.path.name: (r.dataset, r.val_acc) for r in runs}
    kept = []
    for p in payloads:
        dataset, acc = val.get(p["run"], (None, math.inf))
        if dataset is None or acc >= 1.0 / N_CLASSES[dataset] + TRAINED_MARGIN:
            kept.append(p)
    return kept
