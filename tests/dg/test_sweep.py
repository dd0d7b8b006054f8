"""The sweep: job enumeration, stable run directories and seeds, resume, failures, the CLI hooks.

Training is replaced by a tiny fake program (``sys.executable -c ...``) through the
``command_builder`` hook, and environment names by a fake ``env_names``, so nothing here trains.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchsage.cli.dg import add_sweep_arguments, run_from_args
from torchsage.dg import sweep
from torchsage.dg.sweep import Job, launch, make_jobs, sweep_status

FAKE_ENVS = {"Three": ["a", "b", "c"], "Two": ["x", "y"]}
FAKE_ALGORITHMS = ["ERM", "SAGE"]


def fake_env_names(dataset: str) -> list[str]:
    if dataset not in FAKE_ENVS:
        raise ValueError(f"unknown dataset {dataset!r}")
    return FAKE_ENVS[dataset]


def jobs_of(root, **kwargs) -> list[Job]:
    defaults = dict(
        datasets=["Three", "Two"],
        algorithms=FAKE_ALGORITHMS,
        n_hparams=2,
        n_trials=3,
        env_names=fake_env_names,
        algorithm_names=lambda: FAKE_ALGORITHMS,
    )
    defaults.update(kwargs)
    return make_jobs(root, **defaults)


# A stand-in for `torchsage dg train`: argv = [run_dir, mode]; "ok" writes results.jsonl and done,
# "fail" writes a traceback-like stderr and exits 1, "sleep" records its pid and sleeps.
FAKE_TRAIN = """
import json, os, pathlib, sys, time
run, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
assert run.is_dir(), "the sweep creates the run directory first"
print("training", run.name)
if mode == "fail":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("ValueError: fake failure", file=sys.stderr)
    sys.exit(1)
if mode == "sleep":
    (run / "pid").write_text(str(os.getpid()))
    time.sleep(60)
(run / "results.jsonl").write_text(json.dumps({"step": 0, "fake": True}) + "\\n")
(run / "done").write_text("done")
"""


def fake_builder(failing: set[Path] = frozenset(), sleeping: set[Path] = frozenset()):
    def build(job: Job) -> list[str]:
        mode = "fail" if job.output_dir in failing else "sleep" if job.output_dir in sleeping else "ok"
        return [sys.executable, "-c", FAKE_TRAIN, str(job.output_dir), mode]

    return build


# ---------------------------------------------------------------------------------------------
# Enumeration


def test_job_counts_single_and_loo(tmp_path):
    jobs = jobs_of(tmp_path)
    # (3 + 2 test envs) x 2 algorithms x 2 hparams x 3 trials
    assert len(jobs) == (3 + 2) * 2 * 2 * 3 == 60
    assert len({job.output_dir for job in jobs}) == 60
    assert {job.hparams_seed for job in jobs} == {0, 1}
    assert {job.trial_seed for job in jobs} == {0, 1, 2}
    assert {job.test_envs for job in jobs if job.dataset == "Two"} == {(0,), (1,)}
    first = jobs[0]
    assert (first.dataset, first.algorithm, first.test_envs, first.hparams_seed, first.trial_seed) == (
        "Three",
        "ERM",
        (0,),
        0,
        0,
    )

    loo = jobs_of(tmp_path, datasets=["Three"], n_hparams=1, n_trials=1)
    assert len(loo) == 3 * 2
    loo = jobs_of(tmp_path, datasets=["Three"], n_hparams=1, n_trials=1, algorithms=["ERM"], test_envs="loo")
    assert [job.test_envs for job in loo] == [(0,), (0, 1), (0, 2), (1,), (1, 2), (2,)]


def test_held_out_env_sets():
    assert sweep.held_out_env_sets(4, "loo") == [
        (0,),
        (0, 1),
        (0, 2),
        (0, 3),
        (1,),
        (1, 2),
        (1, 3),
        (2,),
        (2, 3),
        (3,),
    ]
    with pytest.raises(ValueError, match="at least 3 environments"):
        sweep.held_out_env_sets(2, "loo")


def test_repeated_names_are_dropped(tmp_path):
    assert len(jobs_of(tmp_path, datasets=["Two", "Two"], algorithms=["ERM", "ERM"])) == 2 * 2 * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(test_envs="pairs"), "unknown test_envs mode 'pairs'"),
        (dict(n_hparams=0), "n_hparams must be a positive integer"),
        (dict(n_trials=0), "n_trials must be a positive integer"),
        (dict(datasets=[]), "no datasets given"),
        (dict(algorithms=[]), "no algorithms given"),
        (dict(algorithms=["Nope"]), "unknown algorithm 'Nope'"),
        (dict(datasets=["Nope"]), "unknown dataset 'Nope'"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(holdout_fraction=1.0), "holdout_fraction"),
        (dict(hparams="{lr: 1}"), "hparams is not valid JSON"),
        (dict(hparams="[1, 2]"), "hparams is not a JSON object"),
        (dict(datasets=["Two"], test_envs="loo"), "needs at least 3 environments"),
    ],
)
def test_bad_arguments_raise_one_clear_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("{", r"\{")):
        jobs_of(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Run directories and seeds


def test_run_dir_is_stable_and_distinct(tmp_path):
    a = jobs_of(tmp_path / "a")
    b = jobs_of(tmp_path / "b")
    # the name does not depend on the output root, nor on the data location
    assert [j.run_id for j in a] == [j.run_id for j in b]
    assert all(j.output_dir == tmp_path / "a" / j.run_id for j in a)
    job = Job(tmp_path, "Three", "ERM", (2, 0), hparams_seed=1, trial_seed=2, hparams='{"lr": 0.1, "b": 2}')
    same = Job(tmp_path / "x", "Three", "ERM", [0, 2], 1, 2, data_dir="/data", hparams='{"b":2,  "lr":0.1}')
    assert job.run_id == same.run_id and job.test_envs == (0, 2)
    # md5 of the canonical JSON of the defining arguments, recomputed independently
    key = {
        "algorithm": "ERM",
        "checkpoint_freq": None,
        "dataset": "Three",
        "holdout_fraction": 0.2,
        "hparams": {"b": 2, "lr": 0.1},
        "hparams_seed": 1,
        "seed": job.seed,
        "steps": None,
        "test_envs": [0, 2],
        "trial_seed": 2,
    }
    assert (
        job.run_id == hashlib.md5(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    )
    # every defining argument changes the name
    for change in (
        dict(algorithm="SAGE"),
        dict(test_envs=(0,)),
        dict(hparams_seed=0),
        dict(trial_seed=0),
        dict(seed=5),
        dict(steps=10),
        dict(checkpoint_freq=10),
        dict(holdout_fraction=0.3),
        dict(hparams=None),
    ):
        fields = dict(
            root=tmp_path, dataset="Three", algorithm="ERM", test_envs=(0, 2), hparams_seed=1, trial_seed=2
        )
        fields["hparams"] = '{"lr": 0.1, "b": 2}'
        fields.update(change)
        assert Job(**fields).run_id != job.run_id, change


def expected_seed(dataset, algorithm, test_envs, hparams_seed, trial_seed) -> int:
    text = json.dumps(
        [dataset, algorithm, sorted(test_envs), hparams_seed, trial_seed], separators=(",", ":")
    )
    return int(hashlib.md5(text.encode()).hexdigest(), 16) % 2**31


def test_seed_is_a_stable_hash_independent_of_the_process(tmp_path):
    jobs = jobs_of(tmp_path)
    for job in jobs:
        assert job.seed == expected_seed(
            job.dataset, job.algorithm, job.test_envs, job.hparams_seed, job.trial_seed
        )
        assert 0 <= job.seed < 2**31
    assert len({job.seed for job in jobs}) == len(jobs)
    # another interpreter with a different hash salt agrees
    code = "from torchsage.dg.sweep import job_seed; print(job_seed('PACS', 'SAGE', [1, 3], 4, 2))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert (
        int(out.stdout)
        == expected_seed("PACS", "SAGE", [1, 3], 4, 2)
        == sweep.job_seed("PACS", "SAGE", [3, 1], 4, 2)
    )


def test_command_line(tmp_path):
    job = Job(
        tmp_path,
        "PACS",
        "SAGE",
        (1, 3),
        hparams_seed=4,
        trial_seed=2,
        steps=100,
        checkpoint_freq=10,
        data_dir="/data",
        hparams='{"lr": 1e-4}',
    )
    argv = job.command(python="py")
    assert argv[:5] == ["py", "-m", "torchsage", "dg", "train"]

    def value(flag, n=1):
        i = argv.index(flag)
        return argv[i + 1 : i + 1 + n]

    assert value("--dataset") == ["PACS"] and value("--algorithm") == ["SAGE"]
    assert value("--test-envs", 2) == ["1", "3"]
    assert value("--output-dir") == [str(tmp_path / job.run_id)]
    assert (
        value("--data-dir") == ["/data"]
        and value("--steps") == ["100"]
        and value("--checkpoint-freq") == ["10"]
    )
    assert value("--hparams-seed") == ["4"] and value("--trial-seed") == ["2"]
    assert value("--seed") == [str(expected_seed("PACS", "SAGE", [1, 3], 4, 2))]
    assert value("--hparams") == ['{"lr": 1e-4}'] and value("--holdout-fraction") == ["0.2"]
    assert argv[-1] == "--no-progress"
    bare = Job(tmp_path, "PACS", "ERM", (0,)).command()
    assert bare[0] == sys.executable
    for flag in ("--data-dir", "--steps", "--checkpoint-freq", "--hparams"):
        assert flag not in bare


# ---------------------------------------------------------------------------------------------
# Launching and resuming


def resume_scenario(root: Path, processes: int) -> None:
    jobs = jobs_of(root, datasets=["Two"], n_hparams=1, n_trials=2)  # 2 envs x 2 algorithms x 2 trials = 8
    assert len(jobs) == 8
    done, incomplete, failing = jobs[0], jobs[1], jobs[5]
    done.output_dir.mkdir(parents=True)
    (done.output_dir / "results.jsonl").write_text("original\n")
    (done.output_dir / "done").write_text("")
    incomplete.output_dir.mkdir(parents=True)
    (incomplete.output_dir / "results.jsonl").write_text('{"step": 0}\n{"step": 1')
    (incomplete.output_dir / "stale.pt").write_text("stale")
    assert sweep_status(jobs) == {"done": 1, "incomplete": 1, "not launched": 6}
    assert [job.state for job in jobs[:3]] == ["done", "incomplete", "not launched"]

    summary = launch(
        jobs, processes=processes, progress=False, command_builder=fake_builder({failing.output_dir})
    )

    assert (summary.total, summary.skipped, summary.deleted, summary.launched) == (8, 1, 1, 7)
    assert summary.succeeded == 6 and not summary.ok
    (failure,) = summary.failed
    assert failure.output_dir == failing.output_dir and failure.returncode == 1
    assert failure.message == "ValueError: fake failure"
    assert (done.output_dir / "results.jsonl").read_text() == "original\n"  # untouched
    assert not (done.output_dir / "out.txt").exists()
    assert not (incomplete.output_dir / "stale.pt").exists()  # deleted, then rerun from scratch
    assert json.loads((incomplete.output_dir / "results.jsonl").read_text()) == {"step": 0, "fake": True}
    for job in jobs[1:]:
        assert (job.output_dir / "out.txt").read_text().startswith("training")
    assert sweep_status(jobs) == {"done": 7, "incomplete": 1, "not launched": 0}

    # a second launch reruns only the failed job
    again = launch(jobs, processes=processes, progress=False, command_builder=fake_builder())
    assert (again.skipped, again.deleted, again.launched, again.succeeded, again.failed) == (7, 1, 1, 1, [])
    assert sweep_status(jobs)["done"] == 8
    assert "8 runs: 7 already done" in str(again)


def test_launch_skips_done_reruns_incomplete_and_records_failures(tmp_path):
    resume_scenario(tmp_path, processes=1)


def test_launch_in_parallel_gives_the_same_outcome(tmp_path):
    resume_scenario(tmp_path, processes=2)


def test_exit_zero_without_done_is_a_failure(tmp_path):
    (job,) = jobs_of(tmp_path, datasets=["Two"], algorithms=["ERM"], n_hparams=1, n_trials=1)[:1]
    summary = launch([job], progress=False, command_builder=lambda job: [sys.executable, "-c", "pass"])
    assert summary.failed[0].message == "exited 0 without writing its done file"
    assert job.state == "incomplete"


def test_interrupt_stops_the_running_children(tmp_path):
    jobs = jobs_of(tmp_path, datasets=["Two"], algorithms=["ERM"], n_hparams=1, n_trials=1)
    first = jobs[0]
    sleeping = fake_builder(sleeping={first.output_dir})

    def build(job: Job) -> list[str]:
        if job is first:
            return sleeping(job)
        deadline = time.monotonic() + 10  # the first child is running: now "press Ctrl-C"
        while not (first.output_dir / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch(jobs, processes=2, progress=False, command_builder=build)
    assert time.monotonic() - start < 10
    pid = int((first.output_dir / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(pid, 0)
    assert first.state == "incomplete"
    assert sweep.delete_incomplete(jobs) == [first.output_dir]
    assert sweep_status(jobs) == {"done": 0, "incomplete": 0, "not launched": 2}


# ---------------------------------------------------------------------------------------------
# Command-line helpers


def parser() -> argparse.ArgumentParser:
    return add_sweep_arguments(argparse.ArgumentParser(prog="sweep"))


def test_arguments_and_defaults(tmp_path):
    args = parser().parse_args(
        ["--datasets", "Two", "--algorithms", "ERM", "SAGE", "--output-dir", str(tmp_path)]
    )
    assert args.datasets == ["Two"] and args.algorithms == ["ERM", "SAGE"]
    assert (args.n_trials, args.n_hparams, args.processes, args.test_envs) == (3, 20, 1, "single")
    assert args.holdout_fraction == 0.2 and args.hparams is None and not args.dry_run and not args.no_progress


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hparams", "{lr: 1}"], "argument --hparams: not valid JSON"),
        (["--hparams", "3"], "argument --hparams: not a JSON object"),
        (["--test-envs", "pairs"], "invalid choice: 'pairs'"),
        (["--n-trials", "0"], "expected a positive integer"),
    ],
)
def test_bad_command_line_exits_with_one_clear_message(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(
            ["--datasets", "Two", "--algorithms", "ERM", "--output-dir", str(tmp_path), *extra]
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_launches_nothing(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["--datasets", "Three", "--algorithms", "ERM", "--n-hparams", "1", "--n-trials", "2"]
    args = parser().parse_args([*argv, "--output-dir", str(root), "--dry-run"])

    def forbidden(job):
        raise AssertionError("--dry-run must not launch")

    hooks = dict(env_names=fake_env_names, algorithm_names=lambda: FAKE_ALGORITHMS)
    assert run_from_args(args, **hooks) == 0
    assert not root.exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 * 2 + 1
    assert all(line.startswith("not launched") and "dg train --dataset Three" in line for line in lines[:-1])
    assert "6 runs" in lines[-1] and "6 not launched" in lines[-1] and "nothing launched" in lines[-1]

    # a real run through the hook, then the summary and exit codes
    args = parser().parse_args([*argv, "--output-dir", str(root), "--no-progress", "--processes", "2"])
    failing = {make_jobs(root, ["Three"], ["ERM"], 1, 2, **hooks)[3].output_dir}
    assert run_from_args(args, command_builder=fake_builder(failing), **hooks) == 1
    out = capsys.readouterr().out
    assert "6 runs: 0 already done (skipped), 6 launched" in out and "5 succeeded, 1 failed" in out
    assert "ValueError: fake failure" in out
    assert run_from_args(args, command_builder=fake_builder(), **hooks) == 0
    assert "5 already done" in capsys.readouterr().out

    args = parser().parse_args([*argv, "--output-dir", str(root), "--dry-run"])
    assert run_from_args(args, command_builder=forbidden, **hooks) == 0
    assert capsys.readouterr().out.count("done ") == 6


def test_torchsage_cli_dry_run(tmp_path, capsys):
    from torchsage.cli import main

    root = tmp_path / "sweep"
    argv = ["dg", "sweep", "--datasets", "RotatedDigits", "--algorithms", "ERM", "--n-hparams", "1"]
    assert main([*argv, "--n-trials", "1", "--output-dir", str(root), "--dry-run"]) == 0
    assert not root.exists()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 + 1  # six rotation environments
    assert main([*argv, "--algorithms", "Nope", "--output-dir", str(root), "--dry-run"]) == 2
    assert "unknown algorithm 'Nope'" in capsys.readouterr().err
