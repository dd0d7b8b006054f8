"""The local launcher's warm workers: a run inside a worker writes what a fresh process writes."""

import json
import sys

import torch

from torchsage.dg.sweep import make_jobs
from torchsage.dg.train import TrainArgs, train
from torchsage.harness import local
from torchsage.harness.local import launch

HPARAMS = '{"cnn_width": 8, "batch_size": 8}'


def _records(path):
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("step_time")  # wall-clock
        record["args"].pop("output_dir")
        out.append(record)
    return out


def test_runs_in_a_worker_match_direct_runs_and_the_worker_is_reused(tmp_path, monkeypatch):
    started = []

    class CountingWorker(local.Worker):
        def __init__(self, *args):
            started.append(1)
            super().__init__(*args)

    monkeypatch.setattr(local, "Worker", CountingWorker)
    jobs = make_jobs(
        tmp_path / "sweep", "ColoredDigits", "ERM", n_hparams=1, n_trials=1, steps=2, checkpoint_freq=1,
        hparams=HPARAMS,
    )  # fmt: skip
    assert all(job.command()[:3] == [sys.executable, "-m", "torchsage"] for job in jobs)
    summary = launch(jobs, processes=1, progress=False, threads=1)
    assert (summary.launched, summary.succeeded, summary.failed) == (3, 3, [])
    assert len(started) == 1  # one worker ran the three runs
    # bit for bit only at the worker's thread count (threads=1): two threads split the float sums
    # differently (TORCHSAGE_TEST_THREADS=2 runs this test with two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for job in jobs:
        try:
            direct = train(
                TrainArgs(
                    dataset=job.dataset, algorithm=job.algorithm, test_envs=list(job.test_envs),
                    output_dir=str(tmp_path / "direct" / job.run_id), steps=2, checkpoint_freq=1,
                    seed=job.seed, hparams=HPARAMS, progress=False,
                )
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        assert _records(job.output_dir / "results.jsonl") == _records(direct / "results.jsonl")
        assert (job.output_dir / "err.txt").read_text() == ""  # no progress frames: --no-progress
        assert "accuracy (%)" in (job.output_dir / "out.txt").read_text()  # the run's own stdout


def test_a_failing_run_in_a_worker_reports_its_last_error_line(tmp_path):
    jobs = make_jobs(
        tmp_path, "ColoredDigits", "ERM", n_hparams=1, n_trials=1, steps=1, hparams='{"cnn_width": 4}'
    )[:1]
    summary = launch(jobs, processes=1, progress=False, threads=1)
    assert summary.succeeded == 0 and summary.failed[0].returncode == 2
    assert "cnn_width must be a positive multiple of 8" in summary.failed[0].message
