"""The submitit launcher: a sweep as one Slurm job array.

Every array task runs the job's command (``python -m torchsage ...``) in the same hashed run
directory as the local launcher, with ``out.txt`` and ``err.txt`` there, so the two launchers can
be mixed and either one resumes what the other left unfinished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchsage.harness.jobs import (
    CommandBuilder,
    Job,
    JobFailure,
    SweepSummary,
    record_exit,
    sort_failures,
    todo,
)
from torchsage.harness.progress import Progress

__all__ = ["SUBMITIT_CLUSTERS", "SlurmOptions", "launch_submitit"]


def _positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


#: submitit's executors: ``slurm`` (sbatch), ``local`` (subprocesses on this machine, for tests and
#: single nodes) and ``debug`` (in this process, one after another).
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ImportError('the submitit launcher needs submitit: pip install "torchsage[cluster]"') from None
    return submitit


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of every array task of a submitit sweep (``None``: the cluster's default).

    Attributes:
        partition: Slurm partition.
        time_min: wall-clock limit of one run, minutes.
        gpus: GPUs per task.
        cpus: CPUs per task; also the training process's ``OMP_NUM_THREADS`` unless that is set.
        mem_gb: memory per task, GB.
        array_parallelism: how many runs of the array run at once.
        extra: further ``#SBATCH`` options, e.g. ``{"account": "proj", "qos": "high"}``.
        setup: shell lines run before each task (``module load ...``, ``source venv/bin/activate``).
        cluster: submitit executor, one of :data:`SUBMITIT_CLUSTERS`.
        folder: submitit's folder (scripts, pickles, logs); default ``<sweep>/.submitit``, which
            the report ignores (a hidden folder).
    """

    partition: str | None = None
    time_min: int | None = None
    gpus: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    cluster: str = "slurm"
    folder: Path | None = None

    def __post_init__(self) -> None:
        if self.cluster not in SUBMITIT_CLUSTERS:
            raise ValueError(
                f"unknown submitit cluster {self.cluster!r}: use one of {', '.join(SUBMITIT_CLUSTERS)}"
            )
        for name in ("time_min", "cpus", "array_parallelism"):
            _positive(getattr(self, name), name)
        gpus = self.gpus
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0):
            raise ValueError(f"gpus must be a non-negative integer, got {gpus!r}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ValueError(f"mem_gb must be a positive number, got {self.mem_gb!r}")

    def parameters(self) -> dict[str, Any]:
        """The keyword arguments of ``submitit.AutoExecutor.update_parameters``."""
        params: dict[str, Any] = {"name": "torchsage-sweep"}
        time_min = self.time_min
        if time_min is None and self.cluster == "local":
            time_min = 7 * 24 * 60  # the local executor's own default is 2 minutes
        optional = {
            "timeout_min": time_min,
            "gpus_per_node": self.gpus,
            "cpus_per_task": self.cpus,
            "mem_gb": self.mem_gb,
            "slurm_partition": self.partition,
            "slurm_array_parallelism": self.array_parallelism,
            "slurm_additional_parameters": dict(self.extra) or None,
            "slurm_setup": list(self.setup) or None,
            "local_setup": list(self.setup) or None,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def _submitted_run(argv: Sequence[str], output_dir: str, threads: int | None, cwd: str | None = None) -> int:
    """Body of one array task (runs on the cluster node): the training command with its stdout
    and stderr in the run directory, as the local launcher runs it, from the directory the sweep
    was submitted from (relative paths in ``argv`` keep their meaning). Returns the exit code."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = None
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out / "out.txt", "wb") as stdout, open(out / "err.txt", "wb") as stderr:
        proc = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, cwd=cwd
        )
    return proc.returncode


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _task_error(error: BaseException) -> str:
    """The exception line of a failed task's traceback, which submitit frames with dashed lines
    and follows with the paths of its logs."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    if len(rules) >= 2 and rules[-1] > rules[0] + 1:
        return lines[rules[-1] - 1]
    return lines[0] if lines else type(error).__name__


def launch_submitit(
    jobs: Iterable[Job],
    options: SlurmOptions | None = None,
    progress: bool = True,
    python: str = sys.executable,
    command_builder: CommandBuilder | None = None,
    poll_interval: float = 2.0,
) -> SweepSummary:
    """Submits the jobs that are not done as one submitit job array and waits for them.

    Finished jobs are skipped and unfinished directories deleted, as by
    :func:`torchsage.harness.local.launch`; every array task runs the job's training command
    (``job.command(python)``) in its run directory with ``out.txt`` and ``err.txt`` there, and
    submitit's own logs in ``options.folder``. A run that exits non-zero, exits without a
    ``done`` file, or whose task fails (time limit, node failure) is recorded as failed and rerun
    by the next sweep. On Ctrl-C the array's tasks are cancelled and ``KeyboardInterrupt``
    propagates.

    Args:
        jobs: the jobs (repeats of the same run directory are submitted once).
        options: the resources; default :class:`SlurmOptions` ``()`` (the cluster's defaults).
        progress: progress on stderr (a bar on a terminal, plain lines otherwise).
        python: the interpreter of the training processes (the same path must exist on the nodes).
        command_builder: ``job -> argv``; default ``job.command(python)`` (tests use a fake).
        poll_interval: seconds between polls of the tasks' states.

    Raises:
        ImportError: submitit is not installed.
        ValueError: submitit refused the executor or its parameters.
    """
    options = options or SlurmOptions()
    submitit = _import_submitit()
    summary, left = todo(jobs)
    if not left:
        return summary
    build = command_builder or (lambda job: job.command(python))
    folder = options.folder or (Path(getattr(left[0], "root", left[0].output_dir.parent)) / ".submitit")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
        executor.update_parameters(**options.parameters())
    except (NameError, RuntimeError, TypeError, AssertionError) as error:
        raise ValueError(f"submitit refused the {options.cluster} executor: {_first_line(error)}") from None
    argvs = [list(build(job)) for job in left]
    submitted = executor.map_array(
        _submitted_run,
        argvs,
        [str(job.output_dir.resolve()) for job in left],
        [options.cpus] * len(left),
        [os.getcwd()] * len(left),
    )
    summary.launched = len(submitted)
    bar = Progress(
        summary.total, f"sweep ({options.cluster})", "run", initial=summary.skipped, enabled=progress
    )
    waiting = list(zip(left, submitted))
    try:
        while waiting:
            still = []
            for job, task in waiting:
                if not task.done():
                    still.append((job, task))
                    continue
                try:
                    code = int(task.result())
                except Exception as error:  # the task itself failed: time limit, node, pickling
                    message = f"submitit task {task.job_id} failed: {_task_error(error)}"
                    summary.failed.append(JobFailure(job.output_dir, -1, message, job.describe()))
                else:
                    record_exit(summary, job, code)
                bar.update(1)
                bar.set_postfix(failed=len(summary.failed))
            waiting = still
            if waiting:
                time.sleep(poll_interval)
    except BaseException:
        for _, task in waiting:
            task.cancel(check=False)
        raise
    finally:
        bar.close()
    sort_failures(summary, left)
    return summary
