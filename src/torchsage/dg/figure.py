"""The DG results figure: test accuracy per held-out domain, one marker per algorithm.

One panel per data set; along the x axis the held-out (test) domains and their average; each
algorithm is a point with a ± std error bar, in its own colour and marker (the same in every
panel), slightly offset from its neighbours so that eleven algorithms stay apart. The panels come
from a :class:`~torchsage.dg.selection.Summary` (:func:`panels_from_summary`) or from the markdown
tables that ``torchsage dg report`` prints (:func:`panels_from_markdown`), so a figure can be
redrawn from a committed table when the sweep's records are not at hand.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchsage.harness.style import count, series_styles

__all__ = ["Panel", "draw", "env_labels", "figure", "panels_from_markdown", "panels_from_summary"]

EnvNames = Mapping[str, Sequence[str]]
Point = tuple[float | None, float | None]  # (mean %, std %); None where there is no result


@dataclass(frozen=True)
class Panel:
    """One data set's results: ``series[algorithm][i]`` is the (mean, std) in percent at
    ``labels[i]`` (the held-out domains, then ``"Avg"``)."""

    dataset: str
    labels: tuple[str, ...]
    series: Mapping[str, tuple[Point, ...]]
    trials: int


def env_labels(dataset: str, n_envs: int, env_names: EnvNames | None = None) -> list[str]:
    """Column labels of a data set's environments: ``env_names[dataset]`` when given, else the
    names of the registered data set, else ``env0``, ``env1``, ... (also when the count differs)."""
    names: Sequence[str] | None = None
    if env_names is not None:
        names = env_names.get(dataset)
    else:
        try:
            from torchsage.dg.datasets import environment_names

            names = environment_names(dataset)
        except (ImportError, ValueError, KeyError):
            names = None
    if names is None or len(names) != n_envs:
        return [f"env{i}" for i in range(n_envs)]
    return [str(n) for n in names]


def panels_from_summary(
    summary: Any, env_names: Mapping[str, Sequence[str]] | None = None, error: str = "sem"
) -> list[Panel]:
    """The panels of a :class:`~torchsage.dg.selection.Summary` (tables without results left
    out), with the standard error (``"sem"``) or the std (``"std"``) over trials as the error."""
    panels = []
    for table in summary.tables:
        if not table.has_results:
            continue
        labels = (*env_labels(table.dataset, len(table.test_envs), env_names), "Avg")
        series = {}
        for row in table.rows:
            if error == "std":
                points = [(c.mean, c.std) for c in row.cells] + [(row.avg, row.avg_std)]
            else:
                points = [(c.mean, c.sem) for c in row.cells] + [(row.avg, row.avg_sem)]
            series[row.algorithm] = tuple(
                (None, None) if m is None else (100 * m, 100 * (e or 0.0)) for m, e in points
            )
        panels.append(Panel(table.dataset, labels, series, table.expected_trials))
    return panels


_CAPTION = re.compile(r"^\*\*(?P<dataset>[^,*]+), (?P<method>[^:*]+):(?P<rest>[^\n]*)\*\*$", re.M)
_TRIALS = re.compile(r"(\d+) trials?\b")
_CELL = re.compile(r"^\s*(?P<mean>-?\d+(?:\.\d+)?)(?:\s*±\s*(?P<std>\d+(?:\.\d+)?))?\s*$")


def panels_from_markdown(text: str, method: str) -> list[Panel]:
    """The panels of the markdown tables of ``torchsage dg report`` for one selection method.

    Each table follows a caption line ``**Dataset, method: ... N trials**``; its header is
    ``| Algorithm | domain ... | Avg |`` and its cells ``mean ± error`` (``—`` where missing).

    Example:
        >>> text = '''**Toy, training-domain validation: test accuracy (%), mean ± std over 2 trials**
        ...
        ... | Algorithm | a          | b          | Avg        |
        ... |-----------|-----------:|-----------:|-----------:|
        ... | ERM       | 50.0 ± 1.0 | 60.0 ± 2.0 | 55.0 ± 0.5 |
        ... | SAGE      | —          | 61.0 ± 1.0 | —          |
        ... '''
        >>> (panel,) = panels_from_markdown(text, "training-domain validation")
        >>> panel.labels, panel.series["SAGE"], panel.trials
        (('a', 'b', 'Avg'), ((None, None), (61.0, 1.0), (None, None)), 2)
    """
    panels = []
    for caption in _CAPTION.finditer(text):
        if caption["method"].strip() != method:
            continue
        lines = text[caption.end() :].lstrip("\n").splitlines()
        rows = []
        for line in lines:
            if not line.startswith("|"):
                break
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        if len(rows) < 3:
            raise ValueError(f"no table under the caption {caption.group(0)!r}")
        header, body = rows[0], rows[2:]
        series = {}
        for cells in body:
            points = []
            for cell in cells[1:]:
                match = _CELL.match(cell)
                points.append(
                    (None, None) if match is None else (float(match["mean"]), float(match["std"] or 0))
                )
            series[cells[0]] = tuple(points)
        trials = _TRIALS.findall(caption["rest"])
        if not trials:
            raise ValueError(f"the caption {caption.group(0)!r} does not say how many trials")
        panels.append(Panel(caption["dataset"].strip(), tuple(header[1:]), series, int(trials[-1])))
    if not panels:
        raise ValueError(f"no table of the method {method!r} in the text")
    return panels


def figure(panels: Sequence[Panel], title: str) -> Any:
    """The figure of ``panels`` (a :class:`matplotlib.figure.Figure`, not tied to pyplot), which
    :func:`draw` saves.

    Example:
        >>> panel = Panel("RotatedDigits", ("0deg", "Avg"), {"ERM": ((97.0, 0.5), (96.0, 0.4))}, 3)
        >>> [ax.get_title() for ax in figure([panel], "training-domain validation").axes]
        ['RotatedDigits (3 trials)']
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    algorithms = list(dict.fromkeys(a for p in panels for a in p.series))
    styles = dict(zip(algorithms, series_styles(len(algorithms))))
    groups = max((len(p.labels) for p in panels), default=1)
    fig = Figure(figsize=(2.2 + 1.25 * groups + 2.3, 0.6 + 3.0 * max(len(panels), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(panels), 1), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    spread = 0.8 / max(len(algorithms), 1)
    for ax, panel in zip(axes, panels):
        lows, highs = [], []
        for k, algorithm in enumerate(algorithms):
            points = panel.series.get(algorithm, ())
            shown = [(i, m, e) for i, (m, e) in enumerate(points) if m is not None]
            if not shown:
                continue
            colour, marker = styles[algorithm]
            xs = [i - 0.4 + spread * (k + 0.5) for i, _, _ in shown]
            ax.errorbar(
                xs,
                [m for _, m, _ in shown],
                yerr=[e for _, _, e in shown],
                fmt=marker,
                color=colour,
                ms=5,
                mec="black" if colour in ("#BBBBBB", "#DDCC77", "#88CCEE") else colour,
                mew=0.5,
                elinewidth=0.9,
                capsize=1.5,
                label=algorithm,
            )
            lows += [m - e for _, m, e in shown]
            highs += [m + e for _, m, e in shown]
        ax.set_xticks(range(len(panel.labels)))
        ax.set_xticklabels(panel.labels)
        if panel.labels and panel.labels[-1] == "Avg":
            ax.axvline(len(panel.labels) - 1.5, color="grey", lw=0.6, ls=":")
        ax.set_xlim(-0.55, len(panel.labels) - 0.45)
        if lows:
            ax.set_ylim(max(0.0, min(lows) - 3.0), min(100.0, max(highs) + 3.0))
        ax.set_xlabel("held-out (test) domain; Avg: mean over held-out domains")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{panel.dataset} ({count(panel.trials, 'trial')})")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        legend_title = "algorithm (left to right)"
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", title=legend_title)
    fig.suptitle(title)
    return fig


def draw(panels: Sequence[Panel], path: str | os.PathLike[str], title: str) -> Path:
    """Writes the figure of ``panels`` as a PNG (whole: to a temporary file, then renamed).

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'torchsage[plot]'") from error
    fig = figure(panels, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path
