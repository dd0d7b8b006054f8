"""Wall time of a sweep's runs: one fresh ``python -m torchsage`` process per run (what the local
launcher did before) against the warm worker processes of :mod:`torchsage.harness.local` (each
imports torch and builds the embedded data once, then runs job after job).

The same short demo-sized runs (ColoredDigits, ERM, the demo's narrow CNN) are launched both ways
into separate folders, one run at a time with one thread each, and the per-run wall time is
printed; the difference is the start-up cost a warm worker saves per run. The fresh-process mode
starts ``python -m torchsage.__main__``, which the launcher runs as a subprocess.

    python benchmarks/launcher.py                 # 6 runs of 20 steps each way
    python benchmarks/launcher.py --steps 200     # the demo's run length
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from torchsage.dg.sweep import make_jobs
from torchsage.harness.local import launch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--trials", type=int, default=2, help="trials per test environment (3 environments)")
    args = parser.parse_args()
    hparams = '{"cnn_width": 16, "batch_size": 32}'  # the demo's
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fresh process per run", "warm worker"):
            root = Path(tmp) / mode.replace(" ", "_")
            jobs = make_jobs(
                root, "ColoredDigits", "ERM", n_hparams=1, n_trials=args.trials, steps=args.steps,
                checkpoint_freq=args.steps, hparams=hparams,
            )  # fmt: skip

            def fresh(job):
                return [sys.executable, "-m", "torchsage.__main__", *job.command()[3:]]

            build = fresh if mode.startswith("fresh") else None
            start = time.perf_counter()
            summary = launch(jobs, processes=1, progress=False, command_builder=build, threads=1)
            wall = time.perf_counter() - start
            assert summary.ok, summary
            per_run = wall / len(jobs)
            print(f"{mode:>22}: {len(jobs)} runs of {args.steps} steps, {wall:6.1f} s, {per_run:5.2f} s/run")


if __name__ == "__main__":
    main()
