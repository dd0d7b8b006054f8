"""Sweeps of multi-task runs: solvers x methods x seeds of one benchmark, resumable.

Every run is a :class:`~torchsage.harness.jobs.HashedJob`: ``torchsage mtl train ...`` in
``ROOT/<benchmark>/<solver>/<method>/<md5 of its settings>``, the settings being the benchmark, solver,
method, seed and every training option, so runs with different options never share a folder and
the same sweep maps each run to the same folder again: finished runs (a ``done`` file) are
skipped, unfinished ones deleted and rerun. ``stl`` runs (single-task learning, plain only) run
first, so that every other run of a benchmark without published baselines (MultiDigits) records
Delta-m% against them (``--stl-dir ROOT/<benchmark>/stl``). The launchers are the dg sweep's:
a pool of worker processes here, or a Slurm job array through submitit.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchsage.harness.jobs import HashedJob, SweepSummary
from torchsage.mtl.benchmarks import get_benchmark
from torchsage.mtl.solvers import STL, canonical_solver, solver_spec

__all__ = ["METHODS", "make_jobs", "run_sweep", "sweep"]

#: ``plain`` (the solver alone), ``sage`` (SAGE on top) and ``sam`` (SAM on top)
METHODS = ("plain", "sage", "sam")


def _options(train_options: Sequence[str]) -> dict[str, Any]:
    """``["--epochs", "2", "--no-augment"]`` -> ``{"epochs": "2", "no_augment": True}`` (hashed)."""
    out: dict[str, Any] = {}
    items = list(train_options)
    i = 0
    while i < len(items):
        name = items[i].lstrip("-").replace("-", "_")
        if i + 1 < len(items) and not items[i + 1].startswith("--"):
            out[name] = items[i + 1]
            i += 2
        else:
            out[name] = True
            i += 1
    return out


def _method_options(options: Sequence[str], method: str) -> list[str]:
    """``options`` without the ones ``method`` does not take (a sweep passes --rho to plain runs)."""
    sage_only = {"--gamma", "--preset", "--rho-scaling", "--disagreement", "--disagreement-scope"}
    drop = {"plain": {"--rho", *sage_only}, "sam": sage_only}.get(method, set())
    kept: list[str] = []
    skip = False
    for item in options:
        if skip:
            skip = False
        elif item in drop:
            skip = True
        else:
            kept.append(item)
    return kept


def make_jobs(
    root: str | Path,
    benchmark: str,
    solvers: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    train_options: Sequence[str] = (),
) -> list[HashedJob]:
    """The runs of a sweep, ``stl`` runs first (names in any case and punctuation).

    Raises:
        ValueError: unknown benchmark, solver or method, or no seeds.
    """
    bench = get_benchmark(benchmark)
    solver_list = list(dict.fromkeys(canonical_solver(s) for s in solvers))
    for s in solver_list:
        if s != STL:
            solver_spec(s)
    method_list = list(dict.fromkeys(str(m).lower() for m in methods))
    for m in method_list:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}: use one of {', '.join(METHODS)}")
    if not seeds:
        raise ValueError("no seeds given: name at least one")
    stl_root = Path(root) / bench.name / STL
    jobs: list[HashedJob] = []
    for s in sorted(solver_list, key=lambda name: name != STL):  # stl first, order kept otherwise
        for m in ["plain"] if s == STL else method_list:
            for seed in dict.fromkeys(int(x) for x in seeds):
                argv = ["mtl", "train", "--benchmark", bench.name, "--solver", s, "--seed", str(seed)]
                options = _method_options(train_options, m)  # plain runs take no --rho, ...
                argv += options
                if m != "plain":
                    argv.append(f"--{m}")
                if s != STL and STL in solver_list and bench.published_baseline is None:
                    argv += ["--stl-dir", str(stl_root)]
                settings = {
                    "benchmark": bench.name,
                    "solver": s,
                    "method": m,
                    "seed": seed,
                    "options": options,
                }
                label = f"{bench.name} {s}{'' if m == 'plain' else ' + ' + m} seed={seed}"
                jobs.append(HashedJob(root, argv, settings, label, subdir=f"{bench.name}/{s}/{m}"))
    return jobs


def run_sweep(jobs: Sequence[HashedJob], launch: Any) -> SweepSummary:
    """Launches the ``stl`` jobs, then the others (they read the stl runs' metrics), with
    ``launch(jobs) -> SweepSummary``; returns the combined summary."""
    first = [j for j in jobs if j.settings["solver"] == STL]
    rest = [j for j in jobs if j.settings["solver"] != STL]
    total = SweepSummary()
    for stage in (first, rest):
        if not stage:
            continue
        part = launch(stage)
        total.total += part.total
        total.skipped += part.skipped
        total.deleted += part.deleted
        total.launched += part.launched
        total.succeeded += part.succeeded
        total.failed += part.failed
    return total


def sweep(
    *,
    benchmark: str,
    solvers: list[str],
    methods: list[str],
    seeds: list[int],
    output_dir: str,
    processes: int = 1,
    train_options: list[str] | None = None,
    progress: bool = True,
    dry_run: bool = False,
    threads: int | None = None,
) -> SweepSummary:
    """Runs solvers x methods x seeds of one benchmark on the local launcher (``processes``
    worker processes, ``threads`` torch threads each), ``stl`` runs first.

    Finished runs are skipped; unfinished ones restart. ``train_options`` are extra ``mtl train``
    options (e.g. ``["--epochs", "3"]``). Each run's output goes to ``out.txt`` and ``err.txt``
    in its directory. With ``dry_run`` the commands left to run are printed and nothing runs.
    Returns the summary (its ``failed`` list names each failed run with its last stderr line).
    """
    from torchsage.harness.local import launch

    jobs = make_jobs(output_dir, benchmark, solvers, methods, seeds, train_options or [])
    if dry_run:
        for job in jobs:
            if job.state != "done":
                print("torchsage " + shlex.join([*job.argv, "--output-dir", str(job.output_dir)]))
        return SweepSummary(total=len(jobs))
    return run_sweep(jobs, lambda part: launch(part, processes=processes, progress=progress, threads=threads))
