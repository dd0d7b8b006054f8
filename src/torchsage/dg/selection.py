"""Model selection on the DomainBed protocol (Gulrajani and Lopez-Paz, ICLR 2021).

A sweep trains, for every data set, algorithm, test environment and trial seed, one run per
hyperparameter sample (``hparams_seed``). Every run appends one JSON line per checkpoint to its
``results.jsonl`` holding the accuracy of every environment's ``in`` split (training data of the
training environments, test data of the test environment) and ``out`` split (held-out validation
data), and writes ``done`` when it finishes. Model selection then picks, per
(dataset, algorithm, test environment, trial seed) group, one checkpoint of one run without
looking at the test accuracy, and reports that checkpoint's test accuracy ``env{t}_in_acc``:

* **training-domain validation** (:class:`TrainingDomainValidation`): validation accuracy is the
  mean ``out`` accuracy of the training environments. The best checkpoint of every run is chosen
  first (early stopping), then the run with the best validation accuracy.
* **leave-one-domain-out cross-validation** (:class:`LeaveOneDomainOut`): for every training
  environment ``v`` a second run is trained on the remaining environments (``test_envs = [t, v]``)
  and evaluated on the whole ``in`` split of ``v``, which it never saw. A hyperparameter sample's
  validation accuracy at a step is the mean of those held-out accuracies over every ``v``; the test
  accuracy is that of the run trained on every environment but ``t`` (``test_envs = [t]``), at the
  same step. The best (hyperparameters, step) pair wins.
* **test-domain validation** (:class:`Oracle`): validation accuracy is the ``out`` accuracy of the
  test environment, read at the last checkpoint of every run (no early stopping); an upper bound
  that peeks at the test distribution.

Training-domain validation and the oracle only use runs with a single test environment. The
reported number of a (dataset, algorithm, test environment) cell is the mean over trial seeds of
the selected test accuracies (:func:`summarize`).

Ties are broken as DomainBed's model selection breaks them: the earliest checkpoint within a run,
and among runs with equal validation accuracy the highest ``hparams_seed``. Records with a missing
or non-finite accuracy that a method needs are skipped by that method. Two run directories with the
same (dataset, algorithm, test environments, hparams seed, trial seed) are merged, as in DomainBed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from torchsage.dg.records import Records, check_settings, load_records

__all__ = [
    "SELECTION_METHODS",
    "AlgorithmRow",
    "Cell",
    "DatasetTable",
    "GroupKey",
    "LeaveOneDomainOut",
    "MissingCell",
    "Oracle",
    "Records",
    "Selection",
    "SelectionMethod",
    "Summary",
    "TrainingDomainValidation",
    "check_settings",
    "group_records",
    "load_records",
    "num_envs",
    "summarize",
]

Record = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------


class GroupKey(NamedTuple):
    """The records one selection method sees at a time (every hparams seed of it)."""

    dataset: str
    algorithm: str
    test_env: int
    trial_seed: int


def group_records(records: Iterable[Mapping[str, Any]]) -> dict[GroupKey, list[Mapping[str, Any]]]:
    """Groups records by (dataset, algorithm, test env, trial seed).

    A run with several test environments (``[t, v]``, used by leave-one-domain-out) joins the
    group of each of them, as in DomainBed.
    """
    groups: dict[GroupKey, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        args = record["args"]
        for test_env in sorted(set(args["test_envs"])):
            key = GroupKey(args["dataset"], args["algorithm"], test_env, args["trial_seed"])
            groups[key].append(record)
    return dict(groups)


def num_envs(record: Mapping[str, Any]) -> int:
    """The number of environments of a record: ``env0_*``, ``env1_*``, ... up to the first gap."""
    n = 0
    while f"env{n}_in_acc" in record or f"env{n}_out_acc" in record:
        n += 1
    return n


def _acc(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _test_envs(record: Mapping[str, Any]) -> list[int]:
    return list(record["args"]["test_envs"])


@dataclass(frozen=True)
class Selection:
    """The checkpoint a method chose in one group: its validation and test accuracy (fractions),
    the hparams seed of its run and its step."""

    val_acc: float
    test_acc: float
    hparams_seed: int
    step: float


def _best(candidates: Iterable[Selection], last_of_equals: bool = False) -> Selection | None:
    # Among equal validation accuracies: the first (candidates come in ascending step order) or,
    # with last_of_equals, the last: the highest hparams seed, as DomainBed's selection picks.
    best = None
    for c in candidates:
        if best is None or c.val_acc > best.val_acc or (last_of_equals and c.val_acc == best.val_acc):
            best = c
    return best


class SelectionMethod(ABC):
    """A model-selection method: picks one checkpoint of one hparams seed per group."""

    name: ClassVar[str]
    #: What the method needs from the sweep, for the report when it finds nothing.
    requirement: ClassVar[str]

    def select(self, records: Sequence[Mapping[str, Any]], test_env: int | None = None) -> Selection | None:
        """The chosen checkpoint among the records of one (dataset, algorithm, test env, trial seed)
        group, over all its hparams seeds, or None when no run allows this method.

        ``test_env`` defaults to the test environment shared by the group's runs.
        """
        if not records:
            return None
        t = _infer_test_env(records) if test_env is None else test_env
        by_seed: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
        for record in records:
            by_seed[record["args"]["hparams_seed"]].append(record)
        runs = (self.select_run(sorted(by_seed[h], key=lambda r: r["step"]), t, h) for h in sorted(by_seed))
        return _best((s for s in runs if s is not None), last_of_equals=True)

    @abstractmethod
    def select_run(
        self, records: Sequence[Mapping[str, Any]], test_env: int, hparams_seed: int
    ) -> Selection | None:
        """The chosen checkpoint among the records (sorted by step) of one hparams seed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _infer_test_env(records: Sequence[Mapping[str, Any]]) -> int:
    common = set.intersection(*(set(_test_envs(r)) for r in records))
    if len(common) != 1:
        raise ValueError(f"the records share no single test environment ({sorted(common)}): pass test_env")
    return common.pop()


class TrainingDomainValidation(SelectionMethod):
    """Training-domain validation: per checkpoint, the validation accuracy is the mean
    ``env{i}_out_acc`` over the training environments ``i`` and the test accuracy ``env{t}_in_acc``;
    the best checkpoint of each run, then the best run. Runs with one test environment only."""

    name = "training-domain validation"
    requirement = "runs with a single test environment"

    def select_run(
        self, records: Sequence[Mapping[str, Any]], test_env: int, hparams_seed: int
    ) -> Selection | None:
        candidates = []
        for record in records:
            if _test_envs(record) != [test_env]:
                continue
            vals = [_acc(record, f"env{i}_out_acc") for i in range(num_envs(record)) if i != test_env]
            test = _acc(record, f"env{test_env}_in_acc")
            if not vals or test is None or any(v is None for v in vals):
                continue
            val = float(np.mean([v for v in vals if v is not None]))
            candidates.append(Selection(val, test, hparams_seed, record["step"]))
        return _best(candidates)


class LeaveOneDomainOut(SelectionMethod):
    """Leave-one-domain-out cross-validation.

    For the hparams seed ``h`` and test env ``t`` it needs the run with ``test_envs == [t]`` and, for
    every other environment ``v``, a run with ``test_envs`` ``[t, v]`` (in either order). At every
    step the validation accuracy is the mean over ``v`` of ``env{v}_in_acc`` of the ``[t, v]`` run
    (a domain the model never trained on), and the test accuracy is ``env{t}_in_acc`` of the ``[t]``
    run at that step. The step with the best validation accuracy is the run's choice; an hparams
    seed lacking any ``v`` (or the ``[t]`` run) at every step is skipped.
    """

    name = "leave-one-domain-out cross-validation"
    requirement = "besides the runs with test_envs [t], runs with test_envs [t, v] for every other env v"

    def select_run(
        self, records: Sequence[Mapping[str, Any]], test_env: int, hparams_seed: int
    ) -> Selection | None:
        single: dict[float, float] = {}
        held_out: dict[tuple[int, float], float] = {}
        n = 0
        for record in records:
            envs = set(_test_envs(record))
            if test_env not in envs:
                continue
            n = max(n, num_envs(record))
            if envs == {test_env} and (acc := _acc(record, f"env{test_env}_in_acc")) is not None:
                single[record["step"]] = acc
            elif len(envs) == 2 and len(_test_envs(record)) == 2:
                (v,) = envs - {test_env}
                if (acc := _acc(record, f"env{v}_in_acc")) is not None:
                    held_out[(v, record["step"])] = acc
        others = [v for v in range(n) if v != test_env]
        if not others:
            return None
        candidates = []
        for step in sorted(single):
            vals = [held_out.get((v, step)) for v in others]
            if any(v is None for v in vals):
                continue
            val = float(np.mean([v for v in vals if v is not None]))
            candidates.append(Selection(val, single[step], hparams_seed, step))
        return _best(candidates)


class Oracle(SelectionMethod):
    """Test-domain validation (oracle): at the last checkpoint of each run, validation accuracy
    ``env{t}_out_acc`` and test accuracy ``env{t}_in_acc``; the best run. Runs with one test
    environment only."""

    name = "test-domain validation (oracle)"
    requirement = "runs with a single test environment"

    def select_run(
        self, records: Sequence[Mapping[str, Any]], test_env: int, hparams_seed: int
    ) -> Selection | None:
        last = None
        for record in records:
            if _test_envs(record) != [test_env]:
                continue
            val = _acc(record, f"env{test_env}_out_acc")
            test = _acc(record, f"env{test_env}_in_acc")
            if val is not None and test is not None:
                last = Selection(val, test, hparams_seed, record["step"])
        return last


#: The three methods of the DomainBed protocol, in the order of the report.
SELECTION_METHODS: tuple[SelectionMethod, ...] = (TrainingDomainValidation(), LeaveOneDomainOut(), Oracle())


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """The selected test accuracies of one (dataset, algorithm, test env) over trial seeds.

    Statistics are over trials: ``std`` is the population standard deviation (``ddof=0``, as
    ``numpy.std``); ``sem = std / sqrt(n)`` is what DomainBed's own tables print after "±".
    """

    dataset: str
    algorithm: str
    test_env: int
    trial_seeds: tuple[int, ...]
    selections: tuple[Selection, ...]

    @property
    def test_accs(self) -> tuple[float, ...]:
        return tuple(s.test_acc for s in self.selections)

    @property
    def n(self) -> int:
        return len(self.selections)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.test_accs)) if self.n else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.test_accs, ddof=0)) if self.n else None

    @property
    def sem(self) -> float | None:
        std = self.std
        return None if std is None else std / math.sqrt(self.n)

    def acc_of_trial(self, trial_seed: int) -> float | None:
        return next((s.test_acc for t, s in zip(self.trial_seeds, self.selections) if t == trial_seed), None)


@dataclass(frozen=True)
class AlgorithmRow:
    """One algorithm on one data set: a cell per test env, and their average."""

    algorithm: str
    cells: tuple[Cell, ...]

    @property
    def complete(self) -> bool:
        """Every test env has at least one trial."""
        return all(c.n for c in self.cells)

    @property
    def avg(self) -> float | None:
        """The mean over test envs of the cell means; None unless every test env has results."""
        if not self.cells or not self.complete:
            return None
        return float(np.mean([c.mean for c in self.cells]))

    @property
    def avg_trials(self) -> tuple[float, ...]:
        """Per trial seed present in every test env, the mean test accuracy over test envs."""
        if not self.cells or not self.complete:
            return ()
        seeds = sorted(set.intersection(*(set(c.trial_seeds) for c in self.cells)))
        return tuple(float(np.mean([c.acc_of_trial(s) for c in self.cells])) for s in seeds)

    @property
    def avg_std(self) -> float | None:
        """Population std over trials of :attr:`avg_trials`; None when no trial seed is shared."""
        trials = self.avg_trials
        return float(np.std(trials, ddof=0)) if trials else None

    @property
    def avg_sem(self) -> float | None:
        std = self.avg_std
        return None if std is None else std / math.sqrt(len(self.avg_trials))


@dataclass(frozen=True)
class MissingCell:
    """A (dataset, algorithm, test env) with fewer selected trials than expected."""

    dataset: str
    algorithm: str
    test_env: int
    n: int
    expected: int

    def __str__(self) -> str:
        return f"{self.dataset} {self.algorithm} env {self.test_env} ({self.n} of {self.expected} trials)"


@dataclass(frozen=True)
class DatasetTable:
    """One data set under one selection method.

    ``test_envs`` are all environments of the data set (``range(num_envs)``), ``algorithms`` every
    algorithm seen on it, ``expected_trials`` the number of distinct trial seeds seen on it (any
    algorithm); cells with fewer trials are listed in ``missing``.
    """

    dataset: str
    method: str
    test_envs: tuple[int, ...]
    rows: tuple[AlgorithmRow, ...]
    expected_trials: int
    missing: tuple[MissingCell, ...]

    @property
    def algorithms(self) -> tuple[str, ...]:
        return tuple(r.algorithm for r in self.rows)

    @property
    def has_results(self) -> bool:
        return any(c.n for r in self.rows for c in r.cells)

    def row(self, algorithm: str) -> AlgorithmRow:
        for r in self.rows:
            if r.algorithm == algorithm:
                return r
        raise KeyError(algorithm)

    def cell(self, algorithm: str, test_env: int) -> Cell:
        return self.row(algorithm).cells[self.test_envs.index(test_env)]


@dataclass(frozen=True)
class Summary:
    """Every data set under one selection method."""

    method: str
    requirement: str
    tables: tuple[DatasetTable, ...]

    @property
    def missing(self) -> tuple[MissingCell, ...]:
        return tuple(m for t in self.tables for m in t.missing)

    def table(self, dataset: str) -> DatasetTable:
        for t in self.tables:
            if t.dataset == dataset:
                return t
        raise KeyError(dataset)


def summarize(
    records: Iterable[Mapping[str, Any]], method: SelectionMethod | type[SelectionMethod]
) -> Summary:
    """Applies ``method`` to every (dataset, algorithm, test env, trial seed) group.

    Per data set the table has a row per algorithm seen and a column per environment (all of them,
    counted from the ``env{i}_*`` keys); a cell holds the selected test accuracy of every trial seed
    the method could serve, with mean and population std (``ddof=0``) over trials. A row's average
    over test envs exists only when every env has results. Cells with fewer trials than the number
    of distinct trial seeds seen on the data set are listed as missing. Data sets and algorithms are
    sorted by name.
    """
    if isinstance(method, type):
        method = method()
    records = list(records)
    groups = group_records(records)
    n_envs: dict[str, int] = defaultdict(int)
    algorithms: dict[str, set[str]] = defaultdict(set)
    trials: dict[str, set[int]] = defaultdict(set)
    for record in records:
        args = record["args"]
        dataset = args["dataset"]
        n_envs[dataset] = max(n_envs[dataset], num_envs(record), max(args["test_envs"]) + 1)
        algorithms[dataset].add(args["algorithm"])
        trials[dataset].add(args["trial_seed"])

    tables = []
    for dataset in sorted(n_envs):
        envs = tuple(range(n_envs[dataset]))
        seeds = sorted(trials[dataset])
        rows, missing = [], []
        for algorithm in sorted(algorithms[dataset]):
            cells = []
            for env in envs:
                chosen = []
                for seed in seeds:
                    group = groups.get(GroupKey(dataset, algorithm, env, seed))
                    selection = method.select(group, env) if group else None
                    if selection is not None:
                        chosen.append((seed, selection))
                cell = Cell(dataset, algorithm, env, tuple(s for s, _ in chosen), tuple(x for _, x in chosen))
                cells.append(cell)
                if cell.n < len(seeds):
                    missing.append(MissingCell(dataset, algorithm, env, cell.n, len(seeds)))
            rows.append(AlgorithmRow(algorithm, tuple(cells)))
        tables.append(DatasetTable(dataset, method.name, envs, tuple(rows), len(seeds), tuple(missing)))
    return Summary(method.name, method.requirement, tuple(tables))
