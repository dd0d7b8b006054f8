"""DomainBed's "Averages" table: every algorithm's accuracy averaged over the test environments of
each data set, then over the data sets.

DomainBed's ``collect_results.py`` prints, after the per-data-set tables of a selection method, one
more table: a row per algorithm, a column per data set and a last column "Avg". :func:`averages`
computes it the same way from a :class:`~torchsage.dg.selection.Summary`:

* a cell (algorithm, data set) takes, for every trial seed, the mean of the selected test
  accuracies over the test environments *that trial has a selection for*, then the mean over
  those per-trial means and, as its error bar, ``std(means / sqrt(n))`` (population std, ``n``
  the number of trial seeds with at least one test environment): DomainBed's ``format_mean``;
* an incomplete data set is not left out: a trial missing some test environments is averaged over
  the ones it has, and a trial with none is left out of the cell (the reason
  :class:`AverageCell` keeps how many environments each trial covered, which the report names);
* the "Avg" of a row is the plain mean of its cells' means, in percent, with no error bar, and only
  when the algorithm has a cell on every data set.

The per-data-set tables of :mod:`torchsage.dg.report` are stricter (their average needs every
environment); this table keeps DomainBed's numbers so they can be set beside published ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from torchsage.dg.selection import DatasetTable, Summary

__all__ = ["AverageCell", "AverageRow", "AveragesTable", "averages"]


@dataclass(frozen=True)
class AverageCell:
    """One algorithm on one data set: per trial seed with any selection, the mean selected test
    accuracy (a fraction) over the test environments that trial has, and how many it had."""

    dataset: str
    algorithm: str
    n_envs: int
    trial_seeds: tuple[int, ...]
    trial_means: tuple[float, ...]
    envs_per_trial: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.trial_means)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.trial_means)) if self.n else None

    @property
    def std(self) -> float | None:
        """Population std (``ddof=0``) of the per-trial means."""
        return float(np.std(self.trial_means)) if self.n else None

    @property
    def sem(self) -> float | None:
        """``std(means / sqrt(n))``, DomainBed's error bar, in the order it computes it."""
        if not self.n:
            return None
        return float(np.std(np.asarray(self.trial_means) / math.sqrt(self.n)))

    @property
    def incomplete_trials(self) -> tuple[tuple[int, int], ...]:
        """``(trial seed, environments covered)`` of the trials averaged over fewer than all."""
        return tuple((s, k) for s, k in zip(self.trial_seeds, self.envs_per_trial) if k < self.n_envs)


@dataclass(frozen=True)
class AverageRow:
    """One algorithm: a cell per data set (None where it has no result there)."""

    algorithm: str
    cells: tuple[AverageCell | None, ...]

    @property
    def avg_percent(self) -> float | None:
        """The mean over data sets of ``100 * cell mean`` (DomainBed sums the percentages), or
        None unless every data set has a cell."""
        means = [None if c is None else c.mean for c in self.cells]
        if not means or any(m is None for m in means):
            return None
        return sum(100 * m for m in means if m is not None) / len(means)


@dataclass(frozen=True)
class AveragesTable:
    """The averages of one selection method; ``expected_trials[i]`` is the number of trial seeds
    seen on ``datasets[i]`` (any algorithm)."""

    method: str
    datasets: tuple[str, ...]
    expected_trials: tuple[int, ...]
    rows: tuple[AverageRow, ...]

    @property
    def has_results(self) -> bool:
        return any(c is not None for r in self.rows for c in r.cells)

    def cell(self, algorithm: str, dataset: str) -> AverageCell | None:
        for row in self.rows:
            if row.algorithm == algorithm:
                return row.cells[self.datasets.index(dataset)]
        raise KeyError(algorithm)


def _cell(table: DatasetTable, algorithm: str) -> AverageCell | None:
    if algorithm not in table.algorithms:
        return None
    per_trial: dict[int, list[float]] = {}
    for cell in table.row(algorithm).cells:
        for seed, selection in zip(cell.trial_seeds, cell.selections):
            per_trial.setdefault(seed, []).append(selection.test_acc)
    if not per_trial:
        return None
    seeds = tuple(sorted(per_trial))
    return AverageCell(
        table.dataset,
        algorithm,
        len(table.test_envs),
        seeds,
        tuple(float(np.mean(per_trial[s])) for s in seeds),
        tuple(len(per_trial[s]) for s in seeds),
    )


def averages(summary: Summary) -> AveragesTable:
    """DomainBed's "Averages" table of one selection method (see the module's docstring).

    Data sets and algorithms are sorted by name, as in the per-data-set tables.

    Example:
        >>> from torchsage.dg.selection import TrainingDomainValidation, summarize
        >>> def record(env, trial, acc):
        ...     accs = {f"env{i}_out_acc": 0.5 for i in range(2)} | {f"env{i}_in_acc": 0.5 for i in range(2)}
        ...     accs[f"env{env}_in_acc"] = acc
        ...     args = dict(dataset="D", algorithm="ERM", test_envs=[env], hparams_seed=0, trial_seed=trial)
        ...     return {"step": 0, **accs, "args": args}
        >>> records = [record(0, 0, 0.6), record(1, 0, 0.8), record(0, 1, 0.7)]  # trial 1 lacks env 1
        >>> table = averages(summarize(records, TrainingDomainValidation))
        >>> cell = table.cell("ERM", "D")
        >>> [round(m, 3) for m in cell.trial_means], cell.incomplete_trials, round(100 * cell.mean, 2)
        ([0.7, 0.7], ((1, 1),), 70.0)
    """
    tables = sorted(summary.tables, key=lambda t: t.dataset)
    algorithms = sorted({a for t in tables for a in t.algorithms})
    rows = tuple(AverageRow(a, tuple(_cell(t, a) for t in tables)) for a in algorithms)
    return AveragesTable(
        summary.method,
        tuple(t.dataset for t in tables),
        tuple(t.expected_trials for t in tables),
        rows,
    )
