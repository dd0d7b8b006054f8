"""The submitit launcher of ``torchsage dg sweep``: job arrays through submitit's local and debug
executors (subprocesses on this machine, or in this process), the skipping of finished runs, the
rerun of unfinished and failed ones, the Slurm options and their errors.

Training is replaced by the tiny fake program of ``tests/dg/test_sweep.py`` (``sys.executable -c
...``), so nothing here trains except the one end-to-end run through the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest

from torchsage.cli.dg import add_sweep_arguments, run_from_args
from torchsage.dg import sweep
from torchsage.dg.sweep import SlurmOptions, launch_submitit

pytest.importorskip("submitit")  # the [cluster] extra, part of [dev]


def fake_env_names(dataset: str) -> list[str]:
    return {"Two": ["x", "y"]}[dataset]


def two_jobs(root: Path) -> list[sweep.Job]:
    jobs = sweep.make_jobs(
        root, "Two", "ERM", n_hparams=1, n_trials=1, env_names=fake_env_names, algorithm_names=lambda: ["ERM"]
    )
    assert len(jobs) == 2  # one per test environment of "Two"
    return jobs


# A stand-in for `torchsage dg train`: argv = [run_dir, mode]; "ok" writes results.jsonl and done,
# "fail" writes a traceback-like stderr and exits 1.
FAKE_TRAIN = """
import json, pathlib, sys
run, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
print("training", run.name)
if mode == "fail":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("ValueError: fake failure", file=sys.stderr)
    sys.exit(1)
(run / "results.jsonl").write_text(json.dumps({"step": 0, "fake": True}) + "\\n")
(run / "done").write_text("done")
"""


def fake_builder(failing: frozenset[Path] = frozenset()):
    def build(job: sweep.Job) -> list[str]:
        mode = "fail" if job.output_dir in failing else "ok"
        return [sys.executable, "-c", FAKE_TRAIN, str(job.output_dir), mode]

    return build


def test_local_executor_runs_the_array_reruns_failures_and_skips_finished_runs(tmp_path):
    first, second = jobs = two_jobs(tmp_path)
    options = SlurmOptions(cluster="local", cpus=1, time_min=5)

    def build(job: sweep.Job) -> list[str]:  # the first run's task raises (no such program)
        return [str(tmp_path / "no-such-program")] if job is first else fake_builder()(job)

    summary = launch_submitit(jobs, options, progress=False, command_builder=build, poll_interval=0.1)
    assert (summary.total, summary.skipped, summary.launched, summary.succeeded) == (2, 0, 2, 1)
    assert [f.output_dir for f in summary.failed] == [first.output_dir]
    assert summary.failed[0].message.startswith("submitit task ")
    assert "no-such-program" in summary.failed[0].message
    assert (first.state, second.state) == ("incomplete", "done")
    assert json.loads((second.output_dir / "results.jsonl").read_text()) == {"step": 0, "fake": True}
    assert (second.output_dir / "out.txt").read_text().strip() == f"training {second.output_dir.name}"
    assert (tmp_path / ".submitit").is_dir()  # submitit's logs, hidden from the report

    rerun = launch_submitit(jobs, options, progress=False, command_builder=fake_builder(), poll_interval=0.1)
    assert (rerun.skipped, rerun.deleted, rerun.launched, rerun.succeeded) == (1, 1, 1, 1)
    assert first.state == "done"
    # Everything done: the third sweep submits nothing (no new task folder appears).
    before = sorted(p.name for p in (tmp_path / ".submitit").iterdir())
    again = launch_submitit(jobs, options, progress=False, command_builder=fake_builder(), poll_interval=0.1)
    assert (again.total, again.skipped, again.launched, again.succeeded) == (2, 2, 0, 0)
    assert sorted(p.name for p in (tmp_path / ".submitit").iterdir()) == before


def test_debug_executor_reruns_failed_and_unfinished_runs(tmp_path):
    jobs = two_jobs(tmp_path)
    first, second = jobs
    options = SlurmOptions(cluster="debug")
    summary = launch_submitit(
        jobs,
        options,
        progress=False,
        command_builder=fake_builder(failing={first.output_dir}),
        poll_interval=0,
    )
    assert summary.succeeded == 1
    assert [f.output_dir for f in summary.failed] == [first.output_dir]
    assert summary.failed[0].returncode == 1
    assert summary.failed[0].message == "ValueError: fake failure"  # the last line of err.txt
    assert (first.state, second.state) == ("incomplete", "done")
    stale = first.output_dir / "stale.txt"
    stale.write_text("from the failed attempt")
    rerun = launch_submitit(jobs, options, progress=False, command_builder=fake_builder(), poll_interval=0)
    assert (rerun.skipped, rerun.deleted, rerun.launched, rerun.succeeded) == (1, 1, 1, 1)
    assert first.state == "done" and not stale.exists()  # restarted from scratch


def test_slurm_options_become_executor_parameters():
    options = SlurmOptions(
        partition="gpu",
        time_min=90,
        gpus=1,
        cpus=8,
        mem_gb=32,
        array_parallelism=16,
        extra={"account": "proj", "qos": "high"},
        setup=("module load cuda",),
    )
    assert options.parameters() == {
        "name": "torchsage-sweep",
        "timeout_min": 90,
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        "mem_gb": 32,
        "slurm_partition": "gpu",
        "slurm_array_parallelism": 16,
        "slurm_additional_parameters": {"account": "proj", "qos": "high"},
        "slurm_setup": ["module load cuda"],
        "local_setup": ["module load cuda"],
    }
    # Unset options are left to the cluster; the local executor gets a week instead of its 2 minutes.
    assert SlurmOptions().parameters() == {"name": "torchsage-sweep"}
    assert SlurmOptions(cluster="local").parameters()["timeout_min"] == 7 * 24 * 60


FAKE_SBATCH = """#!/bin/sh
cp "$1" "$(dirname "$0")/script.sh"
echo "Submitted batch job 4242"
"""


def test_slurm_array_script_carries_every_option(tmp_path, monkeypatch):
    # No cluster here: fake srun and sbatch programs; sbatch keeps the script it was given.
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", "#!/bin/sh\n"), ("sbatch", FAKE_SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    options = SlurmOptions(
        partition="gpu", time_min=90, gpus=2, cpus=4, mem_gb=16, array_parallelism=2, extra={"account": "p"}
    )
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
    executor.update_parameters(**options.parameters())
    tasks = executor.map_array(print, ["a", "b", "c"])
    assert [t.job_id for t in tasks] == ["4242_0", "4242_1", "4242_2"]
    lines = (bin_dir / "script.sh").read_text().splitlines()
    for line in (
        "#SBATCH --array=0-2%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16GB",
        "#SBATCH --account=p",
        "#SBATCH --job-name=torchsage-sweep",
    ):
        assert line in lines


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cluster="pbs"), "unknown submitit cluster 'pbs'"),
        (dict(time_min=0), "time_min must be a positive integer"),
        (dict(cpus=-2), "cpus must be a positive integer"),
        (dict(gpus=-1), "gpus must be a non-negative integer"),
        (dict(mem_gb=0), "mem_gb must be a positive number"),
        (dict(array_parallelism=1.5), "array_parallelism must be a positive integer"),
    ],
)
def test_bad_slurm_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**kwargs)


def test_missing_submitit_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    with pytest.raises(ImportError, match=r'pip install "torchsage\[cluster\]"'):
        launch_submitit(two_jobs(tmp_path), SlurmOptions(cluster="debug"), progress=False)


# ---------------------------------------------------------------------------------------------
# Command line


def parse(*argv: str) -> argparse.Namespace:
    return add_sweep_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_submitit_launcher_runs_the_array(tmp_path, capsys):
    args = parse(
        "--datasets", "Two", "--algorithms", "ERM", "--n-trials", "1", "--n-hparams", "1",
        "--output-dir", str(tmp_path), "--launcher", "submitit", "--submitit-cluster", "debug",
        "--no-progress",
    )  # fmt: skip
    code = run_from_args(
        args,
        env_names=fake_env_names,
        algorithm_names=lambda: ["ERM"],
        command_builder=fake_builder(),
        poll_interval=0,
    )
    assert code == 0
    assert "2 runs: 0 already done (skipped), 2 launched, 2 succeeded, 0 failed." in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("01:30:00", 90), ("1:30", 90), ("2-00:00", 2880), ("0:00:30", 1), ("1-2:03:04", 1564)],
)
def test_slurm_time_formats(text, minutes):
    assert parse(
        "--datasets", "D", "--algorithms", "A", "--output-dir", "o", "--slurm-time", text
    ).slurm_time == (minutes)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from torchsage.cli import main

    base = [
        "dg",
        "sweep",
        "--datasets",
        "RotatedDigits",
        "--algorithms",
        "ERM",
        "--output-dir",
        str(tmp_path),
    ]
    usage_errors = [  # argparse: exit code 2
        (["--slurm-time", "soon"], "expected minutes or [D-]HH:MM[:SS]"),
        (["--slurm-extra", "account"], "expected KEY=VALUE"),
        (["--slurm-gpus", "-1"], "expected a non-negative integer"),
        (["--launcher", "pbs"], "invalid choice: 'pbs'"),
    ]
    for extra, message in usage_errors:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, lines)
    value_errors = [
        (["--slurm-partition", "gpu"], "--slurm-partition needs --launcher submitit"),
        (["--launcher", "submitit", "--processes", "4"], "--processes is for the local launcher"),
    ]
    for extra, message in value_errors:
        assert main([*base, *extra]) != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, lines)
    assert not any(tmp_path.iterdir())  # nothing was launched


def test_amp_reaches_the_command_and_the_run_id_only_when_set(tmp_path):
    fake = dict(env_names=fake_env_names, algorithm_names=lambda: ["ERM"])
    plain = two_jobs(tmp_path)
    mixed = sweep.make_jobs(tmp_path, "Two", "ERM", 1, 1, amp="bf16", **fake)
    assert "--amp" not in plain[0].command()
    assert plain[0].command()[-1] == "--no-progress"
    argv = mixed[0].command()
    assert argv[argv.index("--amp") + 1] == "bf16"
    assert "amp" not in plain[0].key() and mixed[0].key()["amp"] == "bf16"
    assert plain[0].run_id != mixed[0].run_id  # a bf16 run is another run
    with pytest.raises(ValueError, match="amp must be 'bf16', 'fp16' or None, got 'fp8'"):
        sweep.make_jobs(tmp_path, "Two", "ERM", 1, 1, amp="fp8", **fake)


def test_relative_run_directories_resolve_from_the_submission_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = two_jobs(Path("sweep"))  # relative root, as `--output-dir sweep` gives
    summary = launch_submitit(
        jobs, SlurmOptions(cluster="debug"), progress=False, command_builder=fake_builder(), poll_interval=0
    )
    assert summary.succeeded == 2
    for job in jobs:
        assert (tmp_path / job.output_dir / "done").exists()
