"""Result tables and a figure for a sweep, under the three model-selection methods of DomainBed.

:func:`report` reads a sweep directory (see :func:`torchsage.dg.selection.load_records`), applies
training-domain validation, leave-one-domain-out cross-validation and test-domain validation
(oracle) (see :mod:`torchsage.dg.selection`), and returns the tables as text: per method and data
set, a row per algorithm and a column per test environment plus the average, each cell the test
accuracy in percent as "mean ± standard error" over trial seeds (``std / sqrt(n)`` with the
population std, ``ddof=0``: the error bars DomainBed prints, so the tables compare with published
ones), or "mean ± std" on request (``error="std"``, ``--std``); the header says which. Cells without
results print as "—" (markdown) or "--" (LaTeX) and every incomplete cell is named below its table.
After the per-data-set tables of each method comes DomainBed's "Averages" table (one column per data
set, :mod:`torchsage.dg.averages`), with the numbers DomainBed's ``collect_results.py`` prints.
It also writes a bar chart of the training-domain-validation results (:func:`plot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torchsage.dg.averages import AveragesTable, averages
from torchsage.dg.figure import EnvNames, draw, env_labels, panels_from_summary
from torchsage.dg.selection import (
    SELECTION_METHODS,
    DatasetTable,
    Summary,
    TrainingDomainValidation,
    check_settings,
    load_records,
    summarize,
)
from torchsage.harness.records import read_json_lines
from torchsage.harness.tables import render_table

__all__ = ["ERRORS", "env_labels", "format_averages", "format_tables", "plot", "report", "run_summary"]

Fmt = Literal["markdown", "latex"]
Error = Literal["sem", "std"]
#: the error bars: their name in the tables' first header cell and in the captions
ERRORS: dict[str, tuple[str, str]] = {
    "sem": ("± SE", "standard error over trials (std/sqrt(n), as DomainBed prints it)"),
    "std": ("± std", "population std over trials (ddof=0)"),
}


def _cell_text(mean: float | None, err: float | None, fmt: Fmt) -> str:
    if mean is None:
        return "--" if fmt == "latex" else "—"
    pm = r" $\pm$ " if fmt == "latex" else " ± "
    text = f"{100 * mean:.1f}"
    return text if err is None else f"{text}{pm}{100 * err:.1f}"


def _table_text(table: DatasetTable, fmt: Fmt, env_names: EnvNames | None, error: str) -> str:
    labels = env_labels(table.dataset, len(table.test_envs), env_names)
    header = [f"Algorithm (% {ERRORS[error][0]})", *labels, "Avg"]
    body = []
    for row in table.rows:
        cells = [_cell_text(c.mean, c.std if error == "std" else c.sem, fmt) for c in row.cells]
        avg = _cell_text(row.avg, row.avg_std if error == "std" else row.avg_sem, fmt)
        body.append([row.algorithm, *cells, avg])
    caption = (
        f"{table.dataset}, {table.method}: test accuracy (%), mean ± {ERRORS[error][1]}, "
        f"{table.expected_trials} trial{'s' if table.expected_trials != 1 else ''}"
    )
    missing = "; ".join(str(m) for m in table.missing)
    notes = [f"missing: {missing}"] if missing else []
    columns = "l" + "c" * len(labels) + "|c"
    return render_table(header, body, caption=caption, fmt=fmt, notes=notes, columns=columns)


def format_tables(
    summary: Summary | Sequence[Summary],
    fmt: Fmt = "markdown",
    env_names: EnvNames | None = None,
    error: Error = "sem",
) -> str:
    """One table per data set per selection method.

    Rows are algorithms, columns the test environments (labelled by :func:`env_labels`) and their
    average, cells the test accuracy in percent as "mean ± standard error" with one decimal over
    trial seeds (std/sqrt(n), population std: DomainBed's error bars; ``error="std"`` prints the
    std instead); the first header cell says which. The average of a row
    exists only when every environment has results; its spread is over the per-trial averages of
    the trial seeds every environment shares. Missing cells print as "—" (markdown) or "--"
    (LaTeX), and a line below the table names every cell with fewer trials than expected
    (a LaTeX comment in LaTeX). A data set without any result under a method gets one line saying
    what the method needs instead of an empty table.
    """
    if fmt not in ("markdown", "latex"):
        raise ValueError(f"fmt must be 'markdown' or 'latex', got {fmt!r}")
    if error not in ("std", "sem"):
        raise ValueError(f"error must be 'std' or 'sem', got {error!r}")
    summaries = [summary] if isinstance(summary, Summary) else list(summary)
    blocks = []
    for s in summaries:
        for table in s.tables:
            if table.has_results:
                blocks.append(_table_text(table, fmt, env_names, error))
            else:
                note = f"{table.dataset}, {s.method}: no results (this method needs {s.requirement})"
                blocks.append(f"% {note}" if fmt == "latex" else note)
    return "\n\n".join(blocks)


def format_averages(table: AveragesTable, fmt: Fmt = "markdown", error: Error = "sem") -> str:
    """DomainBed's "Averages" table (:func:`torchsage.dg.averages.averages`): a row per algorithm, a
    column per data set holding the mean ± standard error over trials of each trial's mean over
    the test environments it has (``error="std"``: the population std), and "Avg", the mean over
    data sets without an error bar ("—" unless the algorithm has results on every data set).
    Below it, every trial averaged over fewer than all test environments and every cell with
    fewer trials than the data set has are named, since DomainBed's script averages them in
    silently. Without any result: one line saying so.
    """
    if not table.has_results:
        note = f"Averages under {table.method}: no results"
        return f"% {note}" if fmt == "latex" else note
    header = [f"Algorithm (% {ERRORS[error][0]})", *table.datasets, "Avg"]
    body, partial, fewer = [], [], []
    for row in table.rows:
        cells = []
        for cell, expected in zip(row.cells, table.expected_trials):
            if cell is None:
                cells.append(_cell_text(None, None, fmt))
                continue
            cells.append(_cell_text(cell.mean, cell.std if error == "std" else cell.sem, fmt))
            partial += [
                f"{cell.dataset} {cell.algorithm} trial {s} ({k} of {cell.n_envs} environments)"
                for s, k in cell.incomplete_trials
            ]
            if cell.n < expected:
                fewer.append(f"{cell.dataset} {cell.algorithm} ({cell.n} of {expected} trials)")
        avg = row.avg_percent
        body.append([row.algorithm, *cells, _cell_text(None, None, fmt) if avg is None else f"{avg:.1f}"])
    caption = (
        f"Averages over data sets under {table.method}: test accuracy (%) as DomainBed's "
        f"collect_results.py computes it; per data set the mean ± {ERRORS[error][1]} of each trial's "
        "mean over its test environments; Avg the mean over data sets (no error bar)"
    )
    notes = []
    if partial:
        notes.append("trials averaged over only the test environments they have (as DomainBed does): ")
        notes[-1] += "; ".join(partial)
    if fewer:
        notes.append("fewer trials: " + "; ".join(fewer))
    columns = "l" + "c" * len(table.datasets) + "|c"
    return render_table(header, body, caption=caption, fmt=fmt, notes=notes, columns=columns)


def plot(summary: Summary, path: str | Path, env_names: EnvNames | None = None, error: Error = "sem") -> Path:
    """Writes a PNG: one panel per data set, the mean test accuracy (%) per held-out environment
    (and their average) as one point per algorithm, each in its own colour and marker, with error
    bars over trials (standard error, or the std with ``error="std"``); see
    :mod:`torchsage.dg.figure`. Cells without results get no point. Returns the path.

    Raises:
        ImportError: matplotlib is not installed.
    """
    panels = panels_from_summary(summary, env_names, error)
    return draw(panels, path, f"{summary.method}: mean {ERRORS[error][0]} over trials")


def _run_name(run: Path, root: Path) -> str:
    try:
        rel = run.relative_to(root)
    except ValueError:
        return str(run)
    return str(rel) if str(rel) != "." else run.name or str(run)


def report(
    root: str | Path,
    latex: bool = False,
    plot_path: str | Path | None = None,
    *,
    include_unfinished: bool = False,
    make_plot: bool = True,
    error: Error = "sem",
) -> str:
    """The full report of a sweep directory as text.

    Loads the records under ``root`` (finished runs only unless ``include_unfinished``), applies
    the three selection methods and returns, after a few lines naming the unfinished runs that
    were skipped and the corrupt lines, one heading per method followed by its tables
    (:func:`format_tables`, then DomainBed's "Averages" table, :func:`format_averages`; markdown,
    or LaTeX with every other line a ``%`` comment when ``latex``), with standard-error bars
    (``error="std"``: the std). Unless ``make_plot`` is False it writes :func:`plot` of the
    training-domain validation results to ``plot_path`` (default ``root/report.png``); without
    matplotlib the default plot is skipped with a note, a requested ``plot_path`` raises
    ImportError.

    Raises:
        ValueError: ``root`` is not a directory, or holds no usable records.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    records = load_records(root, include_unfinished=include_unfinished)
    check_settings(records.records)
    if not records.records:
        raise ValueError(
            f"{root} holds no usable records: {len(records.runs)} run director"
            f"{'y' if len(records.runs) == 1 else 'ies'} found, {len(records.unfinished)} unfinished, "
            f"{len(records.corrupt)} corrupt line(s) or file(s)"
            + ("" if records.runs else " (expected run directories holding results.jsonl and done)")
        )
    fmt: Fmt = "latex" if latex else "markdown"

    def note(text: str) -> str:
        return "\n".join(f"% {t}" if latex and t else t for t in text.split("\n"))

    summaries = [summarize(records.records, m) for m in SELECTION_METHODS]
    datasets = sorted({r["args"]["dataset"] for r in records.records})
    header = [
        f"{'' if latex else '# '}DomainBed results: {root}",
        "",
        f"{len(records.runs) - (0 if include_unfinished else len(records.unfinished))} runs, "
        f"{len(records.records)} checkpoint records, data sets: {', '.join(datasets)}.",
        f"Test accuracy (%) of the selected checkpoint, mean ± {ERRORS[error][1]}.",
    ]
    if records.unfinished:
        names = ", ".join(_run_name(r, root) for r in records.unfinished)
        verb = "included" if include_unfinished else "skipped"
        header.append(f"Unfinished runs {verb} ({len(records.unfinished)}): {names}")
    if records.corrupt:
        header.append(f"Corrupt lines or files skipped ({len(records.corrupt)}):")
        header += [f"- {_run_name(p, root)}: {problem}" for p, problem in records.corrupt]
    if make_plot:
        target = root / "report.png" if plot_path is None else Path(plot_path)
        tdv = next(s for s in summaries if s.method == TrainingDomainValidation.name)
        try:
            written = plot(tdv, target, error=error)
            header.append(f"Plot ({tdv.method}): {written}")
        except ImportError as missing:
            if plot_path is not None:
                raise
            header.append(f"Plot skipped: {missing}")
    blocks = [note("\n".join(header))]
    for s in summaries:
        heading = f"## {s.method}" if not latex else f"% == {s.method} =="
        tables = format_tables(s, fmt, error=error)
        blocks.append(heading + "\n\n" + tables + "\n\n" + format_averages(averages(s), fmt, error))
    return "\n\n".join(blocks) + "\n"


def run_summary(run_dir: str | Path) -> str:
    """The accuracies of one run's last checkpoint as a short markdown table (what ``dg train``
    prints): one row per environment, its ``in`` and ``out`` splits, test environments marked."""
    records, _ = read_json_lines(Path(run_dir) / "results.jsonl")
    if not records:
        return f"no results in {run_dir}"
    last = records[-1]
    args = last.get("args", {})
    test_envs = set(args.get("test_envs", []))
    n = len([k for k in last if k.startswith("env") and k.endswith("_in_acc")])
    labels = env_labels(str(args.get("dataset")), n)
    rows = []
    for i, label in enumerate(labels):
        role = "test" if i in test_envs else "train"
        cells = [f"{100 * last[f'env{i}_{part}_acc']:.1f}" for part in ("in", "out")]
        rows.append([f"{i} {label}", role, *cells])
    caption = (
        f"{args.get('algorithm')} on {args.get('dataset')}: accuracy (%) after step {last.get('step', 0) + 1}"
    )
    return render_table(["environment", "role", "in", "out"], rows, caption=caption)
