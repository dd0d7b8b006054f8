"""The pretrained regime's ascent-schedules follow-up (``pt-symbola-schedules``,
:func:`torchsage.study.pretrained.pt_schedule_arms`) in its report: the step-time
columns and wording its table (:mod:`torchsage.study.pretrained_report`) adds to the other follow-ups'.

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

__all__ = ["EVERY_STEP", "SCHEDULE_CAPTION", "SCHEDULE_NOTE", "schedule_columns"]

#: the method whose run is the every-step schedule (the core part's)
EVERY_STEP = "SAGE (default)"


def schedule_columns(chosen: dict, dataset: str, env: int, methods: list[str]) -> dict[str, dict[str, str]]:
    """The step-time columns of the follow-up's table of a cell (see the module docstring):
    ``chosen`` is :func:`torchsage.study.report.select`'s, ``methods`` the table's rows."""
    times = {m: {t: r.step_time for t, r in chosen.get((dataset, env, m), {}).items()} for m in methods}
    return {
        "step time (s)": {m: _mean(list(times[m].values())) for m in methods},
        f"step time / {EVERY_STEP}'s": {
            m: _mean(_ratios(times[m], times[EVERY_STEP])) for m in methods if m != EVERY_STEP
        },
    }


#: the caption's tail and the note of the follow-up's table
SCHEDULE_CAPTION = (
    f"ascent schedules (SAGE at its defaults; {EVERY_STEP} is the every-step schedule), one choice per "
    "method; the step-time ratio compares separate runs on a shared machine (noisy)"
)
SCHEDULE_NOTE = (
    "Step time: the harness's wall-clock seconds per step at the last checkpoint (data loading "
    f"and the first evaluation included), mean over the method's trials; / {EVERY_STEP}'s: the "
    "mean over the trials both have of the paired ratio; – where not recorded."
)


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
