"""DomainBed's "Averages" table in ``torchsage dg report``, cell for cell against an independent
implementation of what DomainBed's ``collect_results.py`` computes, written here from its
definition: records grouped by (trial seed, data set, algorithm, test env) (a run joins the group
of each of its test envs), training-domain validation inside each group (best checkpoint of each
hparams seed by the mean ``out`` accuracy of the training envs, then the best seed), then per
(algorithm, data set) and trial seed the mean over the test envs that trial has, printed as
``100 * mean(trials)`` and ``100 * std(trials / sqrt(n))``, with "X" where nothing is, and "Avg"
the mean of the printed means unless one is "X". Incomplete data sets are in the sweep below:
a trial missing a test env, a trial missing every test env of a data set, an algorithm absent
from a data set, and a hyperparameter sample missing from one group.

Both sides format the same float64 numbers with one decimal; they could differ only where a
summation order moves a value across a rounding boundary, and the random accuracies below put no
value within 1e-9 of one (checked in the test), so the cells must be equal as text.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from torchsage.dg.averages import averages
from torchsage.dg.figure import panels_from_markdown
from torchsage.dg.report import report
from torchsage.dg.selection import TrainingDomainValidation, load_records, summarize

N_ENVS = {"ColoredDigits": 3, "RotatedDigits": 6}
ALGORITHMS = ("ERM", "SAGE", "SAM")
STEPS = (0, 50, 99)


def dropped(dataset, algorithm, env, trial, hparams_seed):
    return (
        (dataset, algorithm, trial, env) == ("ColoredDigits", "SAM", 1, 2)  # a trial lacks one env
        or (dataset, algorithm, trial) == ("RotatedDigits", "ERM", 2)  # a trial lacks every env
        or (dataset, algorithm) == ("RotatedDigits", "SAGE")  # never run there
        or (dataset, algorithm, trial, env, hparams_seed) == ("RotatedDigits", "SAM", 0, 3, 1)
    )


def make_records():
    rng = np.random.RandomState(0)
    records = []
    for dataset, n in N_ENVS.items():
        for algorithm in ALGORITHMS:
            for env in range(n):
                for trial in range(3):
                    for hparams_seed in range(2):
                        run = []
                        for step in STEPS:
                            accs = rng.uniform(0.3, 0.95, size=(n, 2))
                            record = {"step": step}
                            for i in range(n):
                                record[f"env{i}_in_acc"] = float(accs[i, 0])
                                record[f"env{i}_out_acc"] = float(accs[i, 1])
                            record["args"] = dict(
                                dataset=dataset, algorithm=algorithm, test_envs=[env],
                                hparams_seed=hparams_seed, trial_seed=trial,
                            )  # fmt: skip
                            run.append(record)
                        if not dropped(dataset, algorithm, env, trial, hparams_seed):
                            records.append(run)
    return records


def write_sweep(root: Path, runs) -> Path:
    for i, run in enumerate(runs):
        folder = root / f"run{i:04d}"
        folder.mkdir(parents=True)
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run))
        (folder / "done").write_text("done\n")
    return root


def domainbed_averages(records):
    """{algorithm: [cell per data set..., avg]} as DomainBed's script prints them, and every
    unrounded number it prints (to check none sits on a rounding boundary)."""
    groups = defaultdict(list)
    for r in records:
        for t in r["args"]["test_envs"]:
            groups[(r["args"]["trial_seed"], r["args"]["dataset"], r["args"]["algorithm"], t)].append(r)
    sweep_acc = {}
    for key, group in groups.items():
        t = key[3]
        runs = defaultdict(list)
        for r in group:
            if len(r["args"]["test_envs"]) == 1:
                runs[r["args"]["hparams_seed"]].append(r)
        chosen = []  # (val, test) of each run's best checkpoint
        for run in runs.values():
            n = sum(1 for k in run[0] if k.endswith("_in_acc"))
            scored = [(np.mean([r[f"env{i}_out_acc"] for i in range(n) if i != t]), r) for r in run]
            val, best = max(scored, key=lambda x: x[0])
            chosen.append((val, best[f"env{t}_in_acc"]))
        if chosen:
            sweep_acc[key] = max(chosen, key=lambda c: c[0])[1]  # random accuracies: no ties
    datasets = sorted({k[1] for k in groups})
    table, raw = {}, []
    for algorithm in sorted({k[2] for k in groups}):
        cells, means = [], []
        for dataset in datasets:
            trials = defaultdict(list)
            for (trial, d, a, _), acc in sweep_acc.items():
                if (d, a) == (dataset, algorithm):
                    trials[trial].append(acc)
            data = np.array([np.mean(v) for v in trials.values()])
            if len(data) == 0:
                cells.append("X")
                means.append(None)
                continue
            mean, err = 100 * np.mean(data), 100 * np.std(data / np.sqrt(len(data)))
            cells.append(f"{mean:.1f} +/- {err:.1f}")
            means.append(mean)
            raw += [mean, err]
        if None in means:
            cells.append("X")
        else:
            cells.append(f"{sum(means) / len(means):.1f}")
            raw.append(sum(means) / len(means))
        table[algorithm] = cells
    return table, raw


def printed_averages(text, method):
    """The body of the Averages table of ``method`` in a markdown report, with DomainBed's
    spelling of a missing cell and of the error bar."""
    start = text.index(f"**Averages over data sets under {method}:")
    lines = text[start:].splitlines()[2:]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace(" ± ", " +/- ").replace("—", "X") for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    runs = make_records()
    return write_sweep(tmp_path_factory.mktemp("sweep"), runs), [r for run in runs for r in run]


def test_averages_table_prints_what_domainbeds_script_prints(sweep):
    root, records = sweep
    expected, raw = domainbed_averages(records)
    # no printed number within 1e-9 of a rounding boundary (x.x5), so text equality is fair
    assert all(abs((10 * abs(v)) % 1 - 0.5) > 1e-9 for v in raw)
    assert expected["SAGE"][1] == "X" and expected["SAGE"][2] == "X"  # the absent data set
    text = report(root, make_plot=False)
    header, rows = printed_averages(text, TrainingDomainValidation.name)
    assert header == ["Algorithm (% ± SE)", "ColoredDigits", "RotatedDigits", "Avg"]
    assert rows == expected


def test_incomplete_data_sets_are_averaged_as_domainbed_does_and_named(sweep):
    root, _ = sweep
    table = averages(summarize(load_records(root), TrainingDomainValidation))
    sam = table.cell("SAM", "ColoredDigits")
    assert sam.trial_seeds == (0, 1, 2) and sam.envs_per_trial == (3, 2, 3)
    erm = table.cell("ERM", "RotatedDigits")
    assert erm.trial_seeds == (0, 1) and erm.n == 2  # the trial without any env is left out
    assert table.cell("SAGE", "RotatedDigits") is None
    # the spread: std of the per-trial means divided by sqrt(n), in DomainBed's order of operations
    means = np.array(sam.trial_means)
    assert sam.sem == pytest.approx(float(np.std(means)) / math.sqrt(3), rel=1e-12)
    assert sam.std == pytest.approx(float(np.std(means)), rel=1e-12)
    text = report(root, make_plot=False)
    assert "ColoredDigits SAM trial 1 (2 of 3 environments)" in text
    assert "fewer trials: RotatedDigits ERM (2 of 3 trials)" in text


def test_std_latex_and_the_figure_parser(sweep):
    root, _ = sweep
    table = averages(summarize(load_records(root), TrainingDomainValidation))
    erm = table.cell("ERM", "ColoredDigits")
    text = report(root, make_plot=False, error="std")
    _, rows = printed_averages(text, TrainingDomainValidation.name)
    assert rows["ERM"][0] == f"{100 * erm.mean:.1f} +/- {100 * erm.std:.1f}"
    latex = report(root, latex=True, make_plot=False)
    assert r"Algorithm (\% $\pm$ SE) & ColoredDigits & RotatedDigits & Avg \\" in latex
    assert r"SAGE & " in latex and r" & -- & -- \\" in latex
    # the Averages caption is not read as a data set's table by the figure's parser
    panels = panels_from_markdown(report(root, make_plot=False), TrainingDomainValidation.name)
    assert [p.dataset for p in panels] == ["ColoredDigits", "RotatedDigits"]
