"""The ascent-schedules part (``dg-schedules``): paired accuracy and step time against every step.

Each cell of :data:`~torchsage.study.spec.FOLLOWUP_CELLS` has, per trial, one run of every arm of
:func:`~torchsage.study.spec.schedule_arms` (no selection: one choice per method). The table gives
each arm's test accuracy (mean and 95% interval over trials), its paired difference from the
every-step arm (bootstrap interval, Wilcoxon p-value, Holm-adjusted over the cell's comparisons)
and its mean step time (the harness's ``step_time`` at the last checkpoint: wall-clock time since
the run's start over its steps, data loading and the first evaluation included), also as the mean
over trials of its ratio to the every-step arm's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchsage.study.report import _accuracies, _ci, _diff, _holm_all, compare, last_records
from torchsage.study.spec import FOLLOWUP_CELLS, part_jobs, schedule_arms

__all__ = ["load_schedule_records", "load_schedule_runs", "schedule_table", "write_schedule_records"]

#: ``{(dataset, test_env, method): {trial: {"test_acc", "val_acc", "step_time"}}}``
ScheduleRuns = dict[tuple[str, int, str], dict[int, dict[str, float]]]


def load_schedule_runs(root: str | Path) -> tuple[ScheduleRuns, int]:
    """The finished runs of the part under ``root``, and how many are not finished."""
    methods = {(a.algorithm, a.hparams_json()): a.method for a in schedule_arms()}
    out: ScheduleRuns = defaultdict(dict)
    finished, missing = last_records(part_jobs(root, "dg-schedules"))
    for job, last in finished:
        s = job.settings
        val, test = _accuracies(last, s["test_env"])
        method = methods[(s["algorithm"], json.dumps(s["hparams"], sort_keys=True))]
        step_time = float(last.get("step_time", float("nan")))
        out[(s["dataset"], s["test_env"], method)][s["trial"]] = dict(
            test_acc=test, val_acc=val, step_time=step_time
        )
    return dict(out), missing


def schedule_table(runs: ScheduleRuns, cells: Sequence[tuple[str, int]] = FOLLOWUP_CELLS) -> str:
    """One markdown table per cell (see the module docstring).

    Example:
        >>> runs = {("D", 0, "SAGE every step"): {t: dict(test_acc=0.5 + t / 100, val_acc=0.9, step_time=2.0)
        ...                                        for t in range(3)},
        ...         ("D", 0, "SAGE every 5"): {t: dict(test_acc=0.6 + t / 100, val_acc=0.9, step_time=1.2)
        ...                                     for t in range(3)}}
        >>> print(schedule_table(runs, cells=[("D", 0)]).splitlines()[5])
        | SAGE every 5 | 3 | 61.0 [58.5, 63.5] | +10.0 [+10.0, +10.0] p=0.25 | 1200.0 | 0.60 |
    """
    methods = [a.method for a in schedule_arms()]
    base = methods[0]
    lines: list[str] = []
    for dataset, env in cells:
        acc = {m: {t: r["test_acc"] for t, r in runs.get((dataset, env, m), {}).items()} for m in methods}
        times = {m: {t: r["step_time"] for t, r in runs.get((dataset, env, m), {}).items()} for m in methods}
        comparisons: dict[Any, Any] = {
            m: compare(acc[m], acc[base]) for m in methods[1:] if acc[m] and acc[base]
        }
        comparisons = _holm_all(comparisons)
        lines += [
            f"{dataset}, test environment {env}:",
            "",
            f"| method | trials | test accuracy (%) | difference from {base} (points) | step time (ms) "
            f"| step time / {base}'s |",
            "|---|---|---|---|---|---|",
        ]
        for m in methods:
            if not acc[m]:
                lines.append(f"| {m} | 0 | – | – | – | – |")
                continue
            trials = sorted(acc[m])
            mean_time = sum(times[m].values()) / len(times[m])
            paired = sorted(set(times[m]) & set(times[base]))
            ratio = (
                sum(times[m][t] / times[base][t] for t in paired) / len(paired)
                if paired and m != base
                else None
            )
            cells_ = [
                m,
                str(len(trials)),
                _ci([acc[m][t] for t in trials]),
                "–" if m == base else _diff(comparisons.get(m)),
                f"{mean_time * 1e3:.1f}",
                "–" if ratio is None else f"{ratio:.2f}",
            ]
            lines.append("| " + " | ".join(cells_) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_schedule_records(runs: ScheduleRuns, path: str | Path) -> Path:
    """Writes ``runs`` as one JSON line per run (atomically): what :func:`schedule_table` needs
    without the run directories (a fresh clone renders the table from it)."""
    from torchsage.harness.records import atomic_write_text

    lines = [
        {"dataset": d, "test_env": e, "method": m, "trial": t, **values}
        for (d, e, m), trials in sorted(runs.items())
        for t, values in sorted(trials.items())
    ]
    atomic_write_text(path, "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))
    return Path(path)


def load_schedule_records(path: str | Path) -> ScheduleRuns:
    """The runs written by :func:`write_schedule_records`."""
    out: ScheduleRuns = defaultdict(dict)
    for line in Path(path).read_text().splitlines():
        x = json.loads(line)
        out[(x["dataset"], int(x["test_env"]), x["method"])][int(x["trial"])] = {
            k: float(x[k]) for k in ("test_acc", "val_acc", "step_time")
        }
    return dict(out)
