"""Tables and a figure over a directory of multi-task runs.

:func:`load_runs` finds every ``results.jsonl`` under a directory and keeps the last record of each
finished run (a ``done`` file beside it). :func:`summarize` groups the runs by benchmark, solver
and method (``plain``, ``sage``, ``sam``) and gives, per group, the mean and standard deviation
over seeds (population std, ``ddof=0``) of every final test metric and of Delta-m%.

Delta-m% of a run is recomputed here from its final metrics: against the mean final metrics of
the benchmark's finished ``stl`` runs (MultiDigits) or against the published single-task numbers
(NYUv2, Cityscapes; :data:`torchsage.mtl.metrics.BASELINES`). Every group is expected to have
every seed seen anywhere for its benchmark; a group with fewer names the missing seeds, and its
mean is over the seeds it has (said in the table, never silently).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchsage.harness.records import read_json_lines
from torchsage.harness.seeds import canonical_json
from torchsage.harness.style import seeds_phrase
from torchsage.harness.tables import render_table, save_figure

__all__ = [
    "Cell",
    "Row",
    "Run",
    "Table",
    "format_table",
    "load_runs",
    "plot",
    "report",
    "run_summary",
    "stl_baseline",
    "summarize",
]

METHODS = ("plain", "sage", "sam")
_METHOD_LABEL = {"plain": "", "sage": " + SAGE", "sam": " + SAM"}
# metrics that are fractions in the records and read as percentages in the tables
_PERCENT = {"acc", "mIoU", "pixAcc", "11.25", "22.5", "30"}


@dataclass(frozen=True)
class Run:
    """The final record of one finished run."""

    path: Path
    benchmark: str
    solver: str
    method: str
    seed: int
    epoch: int
    metrics: dict[str, float]  # "task/metric" -> value
    #: every recorded setting but the seed and the bookkeeping (device, folders): runs that differ
    #: here are different experiments, shown in separate rows
    settings: dict[str, Any] = field(default_factory=dict)
    #: lines of results.jsonl that did not parse (a torn last line of a killed run)
    torn: int = 0


#: recorded arguments that do not change what a run computes, or that name the row already
_NOT_SETTINGS = frozenset(
    {"seed", "benchmark", "solver", "method", "tasks", "device", "data_dir", "num_workers", "output_dir",
     "stl_dir", "save_model", "progress", "sage", "sam"}
)  # fmt: skip


def _settings(args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if k not in _NOT_SETTINGS}


def load_runs(root: str | Path) -> list[Run]:
    """Every finished run under ``root`` (itself included), in path order."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such directory: {root}")
    runs = []
    for results in sorted(root.rglob("results.jsonl")):
        if not (results.parent / "done").exists():
            continue
        records, problems = read_json_lines(results)
        if not records:
            continue
        last = records[-1]
        args = last.get("args", {})
        tasks = args.get("tasks", [])
        metrics = {
            k: float(v)
            for k, v in last.items()
            if "/" in k and k.split("/", 1)[0] in tasks and isinstance(v, (int, float))
        }
        runs.append(
            Run(
                path=results.parent,
                benchmark=str(args.get("benchmark")),
                solver=str(args.get("solver")),
                method=str(args.get("method", "plain")),
                seed=int(args.get("seed", 0)),
                epoch=int(last.get("epoch", 0)),
                metrics=metrics,
                settings=_settings(args),
                torn=len(problems),
            )
        )
    return runs


def stl_baseline(root: str | Path, benchmark: str) -> dict[str, float] | None:
    """Mean final test metrics of the finished plain ``stl`` runs of ``benchmark`` under ``root``
    (None when there are none)."""
    runs = [
        r for r in load_runs(root) if r.benchmark == benchmark and r.solver == "stl" and r.method == "plain"
    ]
    if not runs:
        return None
    keys = sorted(set.intersection(*(set(r.metrics) for r in runs)))
    return {k: sum(r.metrics[k] for r in runs) / len(runs) for k in keys}


@dataclass(frozen=True)
class Cell:
    """Mean and population standard deviation over ``n`` values (None when n = 0)."""

    mean: float | None
    std: float | None
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Cell:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return Cell(None, None, 0)
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        return Cell(mean, math.sqrt(var), len(values))


@dataclass(frozen=True)
class Row:
    solver: str
    method: str
    seeds: tuple[int, ...]
    missing_seeds: tuple[int, ...]
    metrics: dict[str, Cell]
    delta_m: Cell
    #: the settings that set this row apart from other rows of the same solver and method
    #: (``"epochs=2"``), empty when there is one variant
    variant: str = ""


@dataclass
class Table:
    benchmark: str
    metric_names: list[str]
    seeds: tuple[int, ...]
    baseline: dict[str, float] | None
    baseline_source: str
    rows: list[Row] = field(default_factory=list)

    def row(self, solver: str, method: str, variant: str = "") -> Row | None:
        for r in self.rows:
            if r.solver == solver and r.method == method and r.variant == variant:
                return r
        return None


def _differing(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every settings dict."""
    keys = sorted({k for d in settings for k in d})
    return [k for k in keys if len({canonical_json(d.get(k)) for d in settings}) > 1]


def _variant_labels(groups: Mapping[tuple[str, str, str], Any]) -> dict[tuple[str, str, str], str]:
    by_row: dict[tuple[str, str], list[str]] = defaultdict(list)
    for solver, method, key in groups:
        by_row[(solver, method)].append(key)
    labels = {}
    for (solver, method), keys in by_row.items():
        settings = [json.loads(k) for k in keys]
        differ = _differing(settings) if len(keys) > 1 else []
        for key, d in zip(keys, settings):
            labels[(solver, method, key)] = ", ".join(f"{k}={d.get(k)}" for k in differ)
    return labels


def _solver_order(name: str) -> tuple[int, str]:
    from torchsage.mtl.solvers import SOLVER_NAMES

    order = ["stl", *[n for n in SOLVER_NAMES if n != "stl"]]
    return (order.index(name), name) if name in order else (len(order), name)


def _baseline_for(benchmark: str, runs: Sequence[Run]) -> tuple[dict[str, float] | None, str]:
    try:
        from torchsage.mtl.metrics import BASELINES
    except ImportError:  # pragma: no cover - metrics ships with the package
        BASELINES = {}
    if benchmark in BASELINES:
        return dict(BASELINES[benchmark]), "published single-task baselines"
    stl = [r for r in runs if r.solver == "stl" and r.method == "plain"]
    if not stl:
        return None, "no stl runs: Delta-m% needs finished `--solver stl` runs"
    differ = _differing([r.settings for r in stl])
    if differ:
        values = "; ".join(f"{k}: {sorted({canonical_json(r.settings.get(k)) for r in stl})}" for k in differ)
        raise ValueError(
            f"the stl runs of {benchmark} differ in {', '.join(differ)} ({values}): the Delta-m% "
            "baseline needs one setting; keep each setting's runs in its own folder"
        )
    keys = sorted(set.intersection(*(set(r.metrics) for r in stl)))
    seeds = sorted(r.seed for r in stl)
    baseline = {k: sum(r.metrics[k] for r in stl) / len(stl) for k in keys}
    return baseline, f"STL runs (mean over {seeds_phrase(seeds)})"


def summarize(runs: Sequence[Run], higher_is_better: Mapping[str, bool] | None = None) -> list[Table]:
    """One :class:`Table` per benchmark: a row per (solver, method), in registry order."""
    from torchsage.mtl.metrics import delta_m

    if higher_is_better is None:
        from torchsage.mtl.metrics import HIGHER_IS_BETTER as higher_is_better
    by_bench: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        by_bench[r.benchmark].append(r)
    tables = []
    for bench in sorted(by_bench):
        bruns = by_bench[bench]
        baseline, source = _baseline_for(bench, bruns)
        seeds = tuple(sorted({r.seed for r in bruns}))
        names = sorted({k for r in bruns for k in r.metrics}, key=lambda k: (k.split("/")[0], k))
        if baseline is not None:
            names = [k for k in baseline if any(k in r.metrics for r in bruns)] + [
                k for k in names if k not in baseline
            ]
        table = Table(bench, names, seeds, baseline, source)
        groups: dict[tuple[str, str, str], dict[int, Run]] = defaultdict(dict)
        for r in bruns:  # runs that differ in anything but the seed are separate rows
            groups[(r.solver, r.method, canonical_json(r.settings))][r.seed] = (
                r  # a seed run twice counts once
            )
        labels = _variant_labels(groups)
        for key in sorted(
            groups,
            key=lambda k: (_solver_order(k[0]), METHODS.index(k[1]) if k[1] in METHODS else 9, labels[k]),
        ):
            solver, method, _ = key
            g = groups[key]
            present = tuple(sorted(g))
            dms = []
            if baseline is not None:
                for r in g.values():
                    if all(k in r.metrics for k in baseline):
                        dms.append(float(delta_m(r.metrics, baseline, higher_is_better)))
            table.rows.append(
                Row(
                    solver=solver,
                    method=method,
                    seeds=present,
                    missing_seeds=tuple(s for s in seeds if s not in g),
                    metrics={k: Cell.of([r.metrics[k] for r in g.values() if k in r.metrics]) for k in names},
                    delta_m=Cell.of(dms),
                    variant=labels[key],
                )
            )
        tables.append(table)
    return tables


#: the benchmarks' names as papers write them
_BENCHMARK_TITLES = {"multidigits": "MultiDigits", "nyuv2": "NYUv2", "cityscapes": "Cityscapes"}


def _benchmark_title(benchmark: str) -> str:
    return _BENCHMARK_TITLES.get(benchmark, benchmark)


def _title(solver: str) -> str:
    from torchsage.mtl.solvers import SOLVERS

    return "STL" if solver == "stl" else SOLVERS[solver].title if solver in SOLVERS else solver


def _fmt(cell: Cell, percent: bool, fmt: str, digits: int | None = None) -> str:
    if cell.mean is None:
        return "--" if fmt == "latex" else "—"
    scale = 100.0 if percent else 1.0
    pm = r" $\pm$ " if fmt == "latex" else " ± "
    if digits is None:
        digits = 2 if percent or abs(cell.mean) >= 1 else 4
    mean = round(scale * cell.mean, digits) + 0.0  # + 0.0: no "-0.00"
    return f"{mean:.{digits}f}{pm}{scale * cell.std:.{digits}f}"


def format_table(table: Table, fmt: Literal["markdown", "latex"] = "markdown") -> str:
    """A table of the final test metrics and Delta-m% (mean ± std over seeds) of each row.

    Fraction metrics (accuracy, mIoU, pixel accuracy, angle fractions) print in percent. A
    "ΔSAGE" column gives Delta-m%(plain) - Delta-m%(SAGE) of the same solver (positive: SAGE
    helped). Rows with missing seeds are marked with * and the missing seeds are named below.
    """
    if fmt not in ("markdown", "latex"):
        raise ValueError(f"fmt must be 'markdown' or 'latex', got {fmt!r}")
    header = ["Solver", *[_metric_label(k) for k in table.metric_names], "Δm% ↓", "ΔSAGE"]
    body = []
    for row in table.rows:
        name = _title(row.solver) + _METHOD_LABEL.get(row.method, f" + {row.method}")
        if row.variant:
            name += f" [{row.variant}]"
        if row.missing_seeds:
            name += "*"
        cells = [_fmt(row.metrics[k], k.rsplit("/", 1)[-1] in _PERCENT, fmt) for k in table.metric_names]
        dm = (
            _fmt(row.delta_m, False, fmt, digits=2)
            if table.baseline is not None
            else ("--" if fmt == "latex" else "—")
        )
        gain = ""
        plain = table.row(row.solver, "plain", row.variant)
        if (
            row.method == "sage"
            and plain is not None
            and plain.delta_m.mean is not None
            and row.delta_m.mean is not None
        ):
            gain = f"{plain.delta_m.mean - row.delta_m.mean:+.2f}"
        body.append([name, *cells, dm, gain])
    n = len(table.seeds)
    caption = (
        f"{_benchmark_title(table.benchmark)}: final test metrics and Delta-m% (%), mean ± std "
        f"(population) over {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, table.seeds))}); "
        f"baseline: {table.baseline_source}"
    )
    missing = [
        f"{_title(r.solver)}{_METHOD_LABEL.get(r.method, '')}: "
        f"seeds {', '.join(map(str, r.missing_seeds))} missing (mean over {', '.join(map(str, r.seeds))})"
        for r in table.rows
        if r.missing_seeds
    ]
    notes = [f"* {m}" if fmt == "latex" else f"\\* {m}" for m in missing]
    return render_table(header, body, caption=caption, fmt=fmt, notes=notes)


def _metric_label(key: str) -> str:
    task, metric = key.split("/", 1)
    unit = " (%)" if metric in _PERCENT else ""
    return f"{task} {metric}{unit}"


def plot(tables: Sequence[Table], path: str | Path) -> Path:
    """Bar chart of Delta-m% per solver, plain beside SAGE (and SAM), with ± std error bars; one
    panel per benchmark with a baseline. Saved as PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in tables if t.baseline is not None and any(r.delta_m.mean is not None for r in t.rows)]
    path = Path(path)
    fig, axes = plt.subplots(len(shown) or 1, 1, figsize=(10, 3.6 * max(len(shown), 1)), squeeze=False)
    if not shown:
        axes[0][0].text(0.5, 0.5, "no Delta-m% to plot (no baseline)", ha="center", va="center")
        axes[0][0].set_axis_off()
    colors = {"plain": "#8c8c8c", "sage": "#1f77b4", "sam": "#ff7f0e"}
    for ax, table in zip(axes[:, 0], shown):
        solvers = []
        for r in table.rows:
            if r.solver not in solvers and r.solver != "stl":
                solvers.append(r.solver)
        methods = [m for m in METHODS if any(r.method == m for r in table.rows)]
        width = 0.8 / max(len(methods), 1)
        for j, method in enumerate(methods):
            xs, ys, es = [], [], []
            for i, s in enumerate(solvers):
                r = table.row(s, method)
                if r is not None and r.delta_m.mean is not None:
                    xs.append(i + (j - (len(methods) - 1) / 2) * width)
                    ys.append(r.delta_m.mean)
                    es.append(r.delta_m.std)
            label = "plain" if method == "plain" else method.upper()
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=label, color=colors.get(method))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(solvers)))
        ax.set_xticklabels([_title(s) for s in solvers], rotation=30, ha="right")
        ax.set_xlabel("base solver")
        ax.set_ylabel("Δm% (lower is better)")
        ax.set_title(
            f"{_benchmark_title(table.benchmark)}: Delta-m% vs {table.baseline_source}, "
            f"mean ± std over {seeds_phrase(table.seeds)}"
        )
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def report(root: str | Path, *, latex: bool = False, plot_path: str | Path | None = None) -> str:
    """Tables of every benchmark under ``root`` as text; writes the figure to ``plot_path``
    (default ``root/report.png``).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no finished run under ``root``.
    """
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"no finished multi-task runs (results.jsonl with a done file) under {root}")
    tables = summarize(runs)
    text = "\n\n".join(format_table(t, "latex" if latex else "markdown") for t in tables)
    torn = [r for r in runs if r.torn]
    if torn:
        text += "\n\n" + "\n".join(
            f"note: {r.torn} unreadable line(s) skipped in {r.path / 'results.jsonl'} (torn write?)"
            for r in torn
        )
    figure = plot(tables, Path(plot_path) if plot_path is not None else Path(root) / "report.png")
    return f"{text}\n\nfigure: {figure}"


def run_summary(run_dir: str | Path) -> str:
    """The final test metrics of one run as a short markdown table (what ``mtl train`` prints)."""
    records, _ = read_json_lines(Path(run_dir) / "results.jsonl")
    if not records:
        return f"no results in {run_dir}"
    last = records[-1]
    tasks = last.get("args", {}).get("tasks", [])
    rows = []
    for key in sorted(k for k in last if "/" in k and k.split("/", 1)[0] in tasks):
        value = last[key]
        if isinstance(value, (int, float)):
            percent = key.rsplit("/", 1)[-1] in _PERCENT
            rows.append([_metric_label(key), f"{100 * value:.2f}" if percent else f"{value:.4f}"])
    if last.get("delta_m") is not None:
        rows.append(["Δm% ↓", f"{last['delta_m']:.2f}"])
    return render_table(["metric", "value"], rows, caption=f"test metrics after epoch {last.get('epoch')}")
