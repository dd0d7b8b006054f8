"""The pretrained regime's ascent-schedules follow-up (``pt-symbola-schedules``,
:func:`torchsage.study.pretrained.pt_schedule_arms`) in its report.

Per cell with two trials in which both schedules have finished: ERM, ``SAGE (default)`` (the
every-step schedule: the core part's run of the same trial) and the two schedules, one choice per
method, with test accuracy and the paired differences to ERM and to ``SAGE (default)``
(:func:`torchsage.study.report.dg_table`), and two more columns: each method's mean step time (the
harness's ``step_time`` at the last checkpoint: wall-clock time since the run's start over its
steps, data loading and the first evaluation included) and the mean over paired trials of its ratio
to ``SAGE (default)``'s. The runs being compared ran separately, on a machine shared with other
work: the ratio is a noisy measure of cost, the accuracy columns are the result.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from torchsage.study.pretrained import PT_CELLS, pt_core_arms, pt_jobs, pt_schedule_arms
from torchsage.study.report import DGRun, dg_table, load_jobs, select

__all__ = ["EVERY_STEP", "load_pt_schedules", "schedule_tables"]

#: the method whose run is the every-step schedule (the core part's)
EVERY_STEP = "SAGE (default)"


def load_pt_schedules(root: str | Path) -> list[DGRun]:
    """The finished runs of the schedules follow-up under ``root`` (its unfinished runs are not
    counted: they are not the study's)."""
    jobs = pt_jobs(str(root), cells=PT_CELLS[:1], schedules=True)
    return load_jobs(jobs, pt_schedule_arms(), oracle=True)[0]


def schedule_tables(runs: Sequence[DGRun]) -> list[str]:
    """The follow-up's table of each cell where both schedules have finished in two trials or more
    (see the module docstring); no table before that."""
    from torchsage.dg.datasets import environment_names

    schedules = pt_schedule_arms()
    arms = [a for a in pt_core_arms() if a.method in ("ERM", EVERY_STEP)] + schedules
    methods = [a.method for a in arms]
    chosen = select([r for r in runs if r.method in methods], arms)
    tables = []
    for dataset, env in PT_CELLS:
        done = [set(chosen.get((dataset, env, a.method), {})) for a in schedules]
        if len(set.intersection(*done)) < 2:
            continue
        times = {m: {t: r.step_time for t, r in chosen.get((dataset, env, m), {}).items()} for m in methods}
        columns = {
            "step time (s)": {m: _mean(list(times[m].values())) for m in methods},
            f"step time / {EVERY_STEP}'s": {
                m: _mean(_ratios(times[m], times[EVERY_STEP])) for m in methods if m != EVERY_STEP
            },
        }
        caption = (
            f"{dataset}, test domain {environment_names(dataset)[env]}: ascent schedules (SAGE at its "
            f"defaults; {EVERY_STEP} is the every-step schedule), one choice per method; the step-time "
            "ratio compares separate runs on a shared machine (noisy)"
        )
        note = (
            "Step time: the harness's wall-clock seconds per step at the last checkpoint (data loading "
            f"and the first evaluation included), mean over the method's trials; / {EVERY_STEP}'s: the "
            "mean over the trials both have of the paired ratio; – where not recorded."
        )
        bases = ("ERM", EVERY_STEP)
        table = dg_table(
            chosen, dataset, env, "", arms=arms, caption=caption, bases=bases, columns=columns, notes=[note]
        )
        tables.append(table)
    return tables


def _ratios(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """``a[t] / b[t]`` over the trials both have, each a finite positive time."""
    return [a[t] / b[t] for t in sorted(set(a) & set(b)) if _finite(a[t]) and _finite(b[t]) and b[t] > 0]


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def _mean(values: list[float]) -> str:
    """The mean of ``values`` to two decimals, or "–" when any is missing or there are none."""
    if not values or not all(_finite(v) for v in values):
        return "–"
    return f"{statistics.fmean(values):.2f}"
