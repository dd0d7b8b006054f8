"""The main job on the embedded default: a DomainBed-protocol sweep on the digits data sets.

ERM, SAM and SAGE on RotatedDigits and ColoredDigits, every environment held out in turn, several
trials, default hyperparameters with a narrow MNIST CNN so the whole sweep fits in minutes on two
CPU cores. Prints the training-domain-validation table, writes the full report (all selection
methods) to ``report.md`` and the plot to ``report.png`` in the output directory. The sweep is
resumable: rerunning the command skips finished runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torchsage.dg.report import format_tables, report
from torchsage.dg.selection import TrainingDomainValidation, load_records, summarize
from torchsage.dg.sweep import launch, make_jobs

__all__ = ["DEMO_HPARAMS", "DemoFailed", "run_demo"]


class DemoFailed(RuntimeError):
    """Some runs of the demo sweep failed; the message names them."""


#: a narrow network and small batches: the demo trades accuracy for minutes
DEMO_HPARAMS = {"cnn_width": 16, "batch_size": 32}


def run_demo(
    output_dir: str | Path = "demo_output",
    datasets: Sequence[str] = ("RotatedDigits", "ColoredDigits"),
    algorithms: Sequence[str] = ("ERM", "SAM", "SAGE"),
    n_trials: int = 3,
    steps: int = 200,
    processes: int = 2,
    progress: bool = True,
    threads: int | None = None,
) -> tuple[str, Path]:
    """Runs (or resumes) the demo sweep; returns the training-domain-validation tables and the
    path of the plot. ``threads``: torch threads of each run (default: the cores divided by
    ``processes``). Raises :class:`DemoFailed` naming the failed runs if any run failed."""
    root = Path(output_dir)
    jobs = make_jobs(
        root,
        datasets,
        algorithms,
        n_hparams=1,
        n_trials=n_trials,
        steps=steps,
        checkpoint_freq=max(steps // 4, 1),
        hparams=json.dumps(DEMO_HPARAMS),
    )
    summary = launch(jobs, processes=processes, progress=progress, threads=threads)
    if not summary.ok:
        raise DemoFailed(str(summary))
    plot_path = root / "report.png"  # report() draws the training-domain-validation plot there
    (root / "report.md").write_text(report(root, plot_path=plot_path) + "\n")
    tables = summarize(load_records(root).records, TrainingDomainValidation())
    return format_tables(tables), plot_path
