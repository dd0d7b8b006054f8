"""Model selection on hand-made records whose right answers are worked out by hand."""

import json
import math
from pathlib import Path

import pytest

from torchsage.dg.selection import (
    SELECTION_METHODS,
    GroupKey,
    LeaveOneDomainOut,
    MissingCell,
    Oracle,
    Selection,
    TrainingDomainValidation,
    group_records,
    load_records,
    num_envs,
    summarize,
)

N_ENVS = 3


def record(test_envs, hparams_seed=0, trial_seed=0, step=100, algorithm="ERM", dataset="Toy", **accs):
    """One checkpoint line; accuracies as keyword ``in0=0.5, out1=0.7`` (the others are 0.0)."""
    rec = {"step": step, "epoch": step / 50, "loss": 0.5}
    for i in range(N_ENVS):
        rec[f"env{i}_in_acc"] = accs.get(f"in{i}", 0.0)
        rec[f"env{i}_out_acc"] = accs.get(f"out{i}", 0.0)
    rec["hparams"] = {"lr": 10.0**-hparams_seed}
    rec["args"] = {
        "dataset": dataset,
        "algorithm": algorithm,
        "test_envs": list(test_envs),
        "hparams_seed": hparams_seed,
        "trial_seed": trial_seed,
        "seed": 123,
        "steps": 300,
    }
    return rec


def write_run(root: Path, records, done=True, name=None, tail="") -> Path:
    """A run directory holding ``records`` as results.jsonl (plus ``tail`` verbatim) and ``done``."""
    if name is None:
        a = records[0]["args"]
        envs = "-".join(map(str, a["test_envs"]))
        name = f"{a['dataset']}_{a['algorithm']}_t{envs}_h{a['hparams_seed']}_s{a['trial_seed']}"
    run = root / name
    run.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run / "results.jsonl").write_text(text)
    if done:
        (run / "done").write_text("done\n")
    return run


def tdv_runs(root: Path) -> None:
    """Test env 0, two hparams seeds, three checkpoints each, plus a distracting [0, 1] run.

    hparams 0: val (mean out1, out2) = .65, .85, .70 -> step 200 (val .85, test in0 = .55);
               last checkpoint: out0 .5, in0 .60.
    hparams 1: val = .80, .60, .75 -> step 100 (val .80, test .70); last: out0 .6, in0 .65.
    Training-domain validation: hparams 0 at step 200 -> test .55.
    Oracle (last checkpoints): hparams 1 (out0 .6 > .5) -> test .65.
    """
    h0 = [(100, 0.50, 0.9, 0.6, 0.7), (200, 0.55, 0.4, 0.8, 0.9), (300, 0.60, 0.5, 0.7, 0.7)]
    h1 = [(100, 0.70, 0.3, 0.8, 0.8), (200, 0.75, 0.95, 0.6, 0.6), (300, 0.65, 0.6, 0.7, 0.8)]
    for seed, rows in ((0, h0), (1, h1)):
        write_run(
            root,
            [
                record([0], seed, step=s, in0=i0, out0=o0, out1=o1, out2=o2, in1=0.99, in2=0.99)
                for s, i0, o0, o1, o2 in rows
            ],
        )
    # A leave-one-out run: never a candidate for training-domain validation or the oracle.
    high = {"in0": 0.99, "out0": 0.99, "out1": 0.99, "out2": 0.99}
    write_run(root, [record([0, 1], 0, step=s, **high) for s in (100, 200, 300)])


def loo_runs(root: Path) -> None:
    """Test env 0 with held-out validation envs 1 and 2.

    hparams 0: [0] in0 = .50/.55/.60 at steps 100/200/300; [0, 1] in1 = .5/.6/.7; [2, 0] in2 =
               .7/.8/.5 -> val .6/.7/.6 -> step 200: val .70, test .55 (the last step would give .60).
    hparams 1: [0] in0 .9, [0, 1] in1 .95 but no [0, 2] run -> skipped.
    hparams 2: [0] in0 .8, in1 = in2 = .65 -> val .65 < .70.
    hparams 3: [0, 1] and [0, 2] at .99 but no [0] run -> skipped.
    """
    steps = (100, 200, 300)
    write_run(root, [record([0], 0, step=s, in0=a) for s, a in zip(steps, (0.50, 0.55, 0.60))])
    write_run(root, [record([0, 1], 0, step=s, in1=a) for s, a in zip(steps, (0.5, 0.6, 0.7))])
    write_run(root, [record([2, 0], 0, step=s, in2=a) for s, a in zip(steps, (0.7, 0.8, 0.5))])
    write_run(root, [record([0], 1, step=s, in0=0.9, out0=0.9) for s in steps])
    write_run(root, [record([0, 1], 1, step=s, in1=0.95) for s in steps])
    write_run(root, [record([0], 2, step=s, in0=0.8) for s in steps])
    write_run(root, [record([0, 1], 2, step=s, in1=0.65) for s in steps])
    write_run(root, [record([0, 2], 2, step=s, in2=0.65) for s in steps])
    write_run(root, [record([0, 1], 3, step=s, in1=0.99) for s in steps])
    write_run(root, [record([0, 2], 3, step=s, in2=0.99) for s in steps])


def group_of(root: Path, test_env=0, trial_seed=0):
    return group_records(load_records(root).records)[GroupKey("Toy", "ERM", test_env, trial_seed)]


# ----------------------------------------------------------------------------------------------
# Selection methods
# ----------------------------------------------------------------------------------------------


def test_training_domain_validation_picks_best_checkpoint_then_best_hparams(tmp_path):
    tdv_runs(tmp_path)
    chosen = TrainingDomainValidation().select(group_of(tmp_path), 0)
    assert chosen == Selection(pytest.approx(0.85), pytest.approx(0.55), 0, 200)
    assert TrainingDomainValidation.name == "training-domain validation"


def test_oracle_uses_the_last_checkpoint_and_the_test_out_split(tmp_path):
    tdv_runs(tmp_path)
    chosen = Oracle().select(group_of(tmp_path), 0)
    # hparams 0 step 100 has out0 = .9 but is not the last checkpoint.
    assert chosen == Selection(pytest.approx(0.6), pytest.approx(0.65), 1, 300)
    assert Oracle.name == "test-domain validation (oracle)"


def test_leave_one_domain_out_averages_held_out_envs_per_step(tmp_path):
    loo_runs(tmp_path)
    group = group_of(tmp_path)
    chosen = LeaveOneDomainOut().select(group, 0)
    assert chosen == Selection(pytest.approx(0.7), pytest.approx(0.55), 0, 200)
    # The test env is inferred when every run of the group shares it.
    assert LeaveOneDomainOut().select(group) == chosen


def test_leave_one_domain_out_needs_pair_runs(tmp_path):
    tdv_runs(tmp_path)  # only a [0, 1] pair for hparams 0, no [0, 2]
    assert LeaveOneDomainOut().select(group_of(tmp_path), 0) is None
    assert LeaveOneDomainOut().select([], 0) is None


def test_single_test_env_methods_ignore_pair_runs(tmp_path):
    write_run(tmp_path, [record([0, 1], 0, step=100, in0=0.9, out0=0.9, out1=0.9, out2=0.9)])
    group = group_of(tmp_path)
    assert TrainingDomainValidation().select(group, 0) is None
    assert Oracle().select(group, 0) is None


def test_pair_runs_join_both_test_env_groups(tmp_path):
    loo_runs(tmp_path)
    groups = group_records(load_records(tmp_path).records)
    assert set(groups) == {GroupKey("Toy", "ERM", t, 0) for t in (0, 1, 2)}
    # [2, 0] of hparams 0 and [0, 2] of hparams 2 and 3, 3 checkpoints each.
    assert len(groups[GroupKey("Toy", "ERM", 2, 0)]) == 9


def test_ties_go_to_the_earliest_step_and_the_highest_hparams_seed_as_in_domainbed(tmp_path):
    # Validation accuracy (out1 + out2) / 2 = 0.25 at every checkpoint of every run: DomainBed takes
    # the first checkpoint of a run (argmax) and, across runs, the highest hparams seed (its runs
    # sorted by validation accuracy, then reversed). Seeds written out of order on purpose.
    for seed in (1, 4, 0):
        write_run(tmp_path, [record([0], seed, step=s, in0=0.1 * (s // 100), out1=0.5) for s in (100, 200)])
    assert TrainingDomainValidation().select(group_of(tmp_path), 0) == Selection(0.25, 0.1, 4, 100)
    assert Oracle().select(group_of(tmp_path), 0).hparams_seed == 4  # last checkpoint, same tie rule
    # a strictly better run still wins over a higher seed
    write_run(tmp_path, [record([0], 2, step=100, in0=0.7, out1=0.6)])
    assert TrainingDomainValidation().select(group_of(tmp_path), 0) == Selection(0.3, 0.7, 2, 100)


def test_non_finite_or_missing_accuracies_are_skipped(tmp_path):
    bad = record([0], 0, step=200, in0=0.9, out1=float("nan"), out2=1.0)
    gone = record([0], 0, step=300, in0=0.95, out1=1.0, out2=1.0)
    del gone["env0_in_acc"]
    good = record([0], 0, step=100, in0=0.4, out1=0.5, out2=0.5)
    chosen = TrainingDomainValidation().select([good, bad, gone], 0)
    assert chosen == Selection(0.5, 0.4, 0, 100)


def test_num_envs_counts_consecutive_env_keys():
    assert num_envs(record([0])) == N_ENVS
    assert num_envs({"env0_in_acc": 1.0, "env2_in_acc": 1.0}) == 1


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------

# test accuracy (env t in-split) per (algorithm, test env) and trial seed 0, 1, 2; None: no run.
SUMMARY_ACCS = {
    ("ERM", 0): (0.5, 0.6, 0.7),
    ("ERM", 1): (0.8, 0.8, 0.8),
    ("ERM", 2): (0.9, 0.7, 0.8),
    ("SAM", 0): (0.6, 0.6, 0.6),
    ("SAM", 1): (0.7, 0.9, None),
}


def summary_runs(root: Path, dataset="Toy") -> None:
    """One hparams seed, one checkpoint per run: every method's test accuracy is ``in{t}``."""
    for (algorithm, t), accs in SUMMARY_ACCS.items():
        for trial, acc in enumerate(accs):
            if acc is None:
                continue
            outs = {f"out{i}": 0.5 for i in range(N_ENVS)}
            rec = record([t], 0, trial, algorithm=algorithm, dataset=dataset, **outs, **{f"in{t}": acc})
            write_run(root, [rec])


def pstd(values):
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def test_summarize_mean_population_std_average_and_missing_cells(tmp_path):
    summary_runs(tmp_path)
    summary = summarize(load_records(tmp_path).records, TrainingDomainValidation())
    assert summary.method == "training-domain validation"
    (table,) = summary.tables
    assert table.dataset == "Toy" and table.test_envs == (0, 1, 2) and table.algorithms == ("ERM", "SAM")
    assert table.expected_trials == 3

    erm = table.row("ERM")
    for t in range(3):
        cell = erm.cells[t]
        accs = SUMMARY_ACCS[("ERM", t)]
        assert cell.n == 3 and cell.trial_seeds == (0, 1, 2)
        assert cell.test_accs == pytest.approx(accs)
        assert cell.mean == pytest.approx(sum(accs) / 3)
        assert cell.std == pytest.approx(pstd(accs))
        assert cell.sem == pytest.approx(pstd(accs) / math.sqrt(3))
    assert table.cell("ERM", 0).std == pytest.approx(math.sqrt(0.02 / 3))
    assert erm.avg == pytest.approx((0.6 + 0.8 + 0.8) / 3)
    per_trial = [(0.5 + 0.8 + 0.9) / 3, (0.6 + 0.8 + 0.7) / 3, (0.7 + 0.8 + 0.8) / 3]
    assert erm.avg_trials == pytest.approx(per_trial)
    assert erm.avg_std == pytest.approx(pstd(per_trial))

    sam = table.row("SAM")
    assert sam.cells[1].n == 2 and sam.cells[1].mean == pytest.approx(0.8)
    assert sam.cells[1].std == pytest.approx(0.1)
    assert sam.cells[2].n == 0 and sam.cells[2].mean is None and sam.cells[2].std is None
    assert sam.avg is None and sam.avg_std is None
    assert table.missing == (MissingCell("Toy", "SAM", 1, 2, 3), MissingCell("Toy", "SAM", 2, 0, 3))
    assert [str(m) for m in summary.missing] == [
        "Toy SAM env 1 (2 of 3 trials)",
        "Toy SAM env 2 (0 of 3 trials)",
    ]


def test_summarize_every_method(tmp_path):
    summary_runs(tmp_path)
    records = load_records(tmp_path).records
    tdv, loo, oracle = (summarize(records, m) for m in SELECTION_METHODS)
    assert oracle.table("Toy").cell("ERM", 2).test_accs == pytest.approx((0.9, 0.7, 0.8))
    # No [t, v] runs: leave-one-domain-out has nothing, and says every cell is missing.
    assert not loo.table("Toy").has_results
    assert len(loo.missing) == 6 and str(loo.missing[0]) == "Toy ERM env 0 (0 of 3 trials)"
    assert tdv.table("Toy").has_results
    # A class works as well as an instance.
    assert summarize(records, Oracle).tables == oracle.tables


def test_summarize_leave_one_domain_out_cell(tmp_path):
    loo_runs(tmp_path)
    table = summarize(load_records(tmp_path).records, LeaveOneDomainOut()).table("Toy")
    assert table.cell("ERM", 0).test_accs == pytest.approx((0.55,))
    assert table.cell("ERM", 0).selections[0].hparams_seed == 0


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_unfinished_runs_are_skipped_and_listed(tmp_path):
    write_run(tmp_path, [record([0], 0, in0=0.5)])
    unfinished = write_run(tmp_path, [record([1], 0, in1=0.7)], done=False)
    loaded = load_records(tmp_path)
    assert len(loaded) == 1 and loaded[0]["env0_in_acc"] == 0.5
    assert loaded.unfinished == [unfinished] and len(loaded.runs) == 2 and loaded.corrupt == []
    everything = load_records(tmp_path, include_unfinished=True)
    assert len(everything.records) == 2 and everything.unfinished == [unfinished]


def test_torn_last_line_is_reported_not_raised(tmp_path):
    run = write_run(tmp_path, [record([0], 0, step=s) for s in (100, 200)], tail='{"step": 300, "env0_in')
    loaded = load_records(tmp_path)
    assert [r["step"] for r in loaded] == [100, 200]
    assert len(loaded.corrupt) == 1
    path, problem = loaded.corrupt[0]
    assert path == run / "results.jsonl" and problem.startswith("line 3: invalid JSON")


def test_lines_that_are_not_records_are_corrupt(tmp_path):
    no_args = {"step": 1, "env0_in_acc": 0.5}
    bad_envs = record([0])
    bad_envs["args"]["test_envs"] = []
    tail = json.dumps(no_args) + "\n[1, 2]\n" + json.dumps(bad_envs) + "\n\n"
    write_run(tmp_path, [record([0])], tail=tail)
    loaded = load_records(tmp_path)
    assert len(loaded) == 1
    problems = [p for _, p in loaded.corrupt]
    assert problems == [
        "line 2: no 'args' object",
        "line 3: not a JSON object (list)",
        "line 4: args.test_envs is not a non-empty list of environment indices",
    ]


def test_done_without_results_is_corrupt(tmp_path):
    run = tmp_path / "abc"
    run.mkdir()
    (run / "done").write_text("done\n")
    (tmp_path / "unrelated").mkdir()
    loaded = load_records(tmp_path)
    assert loaded.runs == [run] and loaded.records == []
    assert loaded.corrupt == [(run / "results.jsonl", "missing although the run is marked done")]


def test_root_may_be_a_run_directory(tmp_path):
    run = write_run(tmp_path, [record([0], 0, step=s) for s in (100, 200)])
    loaded = load_records(run)
    assert loaded.runs == [run] and len(loaded) == 2


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        load_records(tmp_path / "nope")
    empty = load_records(tmp_path)
    assert empty.records == [] and empty.runs == [] and empty.unfinished == []
