"""The job model shared by the dg and mtl sweeps.

A job is one run of ``torchsage ...``: an argv, a run directory named by the md5 of the settings
that define the run (so the same sweep maps every run to the same folder on every machine), and
the ``done`` file that marks it finished. Launching a sweep again skips finished runs, deletes
unfinished directories and reruns them from scratch (:func:`todo`), and counts every exit in one
:class:`SweepSummary` whose failures carry the last line of the run's ``err.txt``.

Example:
    >>> import tempfile
    >>> job = HashedJob(tempfile.mkdtemp(), ["mtl", "train", "--seed", "0"], {"seed": 0}, "seed 0")
    >>> job.state, job.output_dir.name == digest({"seed": 0})
    ('not launched', True)
    >>> job.command(python="python")[:3]
    ['python', '-m', 'torchsage']
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torchsage.harness.records import DONE
from torchsage.harness.seeds import digest

__all__ = [
    "LAUNCHERS",
    "STATES",
    "HashedJob",
    "Job",
    "JobFailure",
    "SweepSummary",
    "delete_incomplete",
    "last_line",
    "record_exit",
    "run_state",
    "sweep_status",
    "todo",
]

#: The states of a job's run directory, in the order they are reported.
STATES = ("done", "incomplete", "not launched")
#: The launchers of a sweep.
LAUNCHERS = ("local", "submitit")


class Job(Protocol):
    """What the launchers need of a job."""

    @property
    def output_dir(self) -> Path: ...

    @property
    def state(self) -> str: ...

    def describe(self) -> str: ...

    def command(self, python: str = ..., progress: bool = ...) -> list[str]: ...


CommandBuilder = Callable[[Any], Sequence[str]]


def run_state(run_dir: Path) -> str:
    """``"done"`` (a ``done`` file), ``"incomplete"`` (directory without it) or ``"not launched"``."""
    if (run_dir / DONE).exists():
        return "done"
    if run_dir.exists():
        return "incomplete"
    return "not launched"


@dataclass(frozen=True)
class HashedJob:
    """A generic job: ``torchsage *argv`` in ``root / [subdir /] md5(settings)``.

    Attributes:
        root: the sweep's folder.
        argv: the ``torchsage`` arguments (without the program), including ``--output-dir``
            when :meth:`with_output_dir` built it.
        settings: what defines the run (hashed into the directory name).
        description: a short human-readable identity.
        subdir: an optional folder between ``root`` and the hashed name.
    """

    root: Path
    argv: tuple[str, ...]
    settings: dict[str, Any]
    description: str = ""
    subdir: str = ""
    output_dir: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "argv", tuple(str(a) for a in self.argv))
        base = self.root / self.subdir if self.subdir else self.root
        object.__setattr__(self, "output_dir", base / self.run_id)

    @property
    def run_id(self) -> str:
        """md5 hex digest of the canonical JSON of :attr:`settings`."""
        return digest(self.settings)

    @property
    def state(self) -> str:
        """See :func:`run_state`."""
        return run_state(self.output_dir)

    def describe(self) -> str:
        """:attr:`description`, or the run id."""
        return self.description or self.run_id

    def command(self, python: str = sys.executable, progress: bool = False) -> list[str]:
        """``python -m torchsage *argv --output-dir DIR`` (and ``--no-progress`` unless ``progress``)."""
        argv = [python, "-m", "torchsage", *self.argv, "--output-dir", str(self.output_dir)]
        return argv if progress else [*argv, "--no-progress"]


def sweep_status(jobs: Iterable[Job]) -> dict[str, int]:
    """Number of jobs in each state (every key of :data:`STATES` present)."""
    counts = dict.fromkeys(STATES, 0)
    for job in jobs:
        counts[job.state] += 1
    return counts


def delete_incomplete(jobs: Iterable[Job]) -> list[Path]:
    """Deletes the run directories of unfinished jobs; returns the deleted directories."""
    deleted = []
    for job in jobs:
        if job.state == "incomplete":
            shutil.rmtree(job.output_dir)
            deleted.append(job.output_dir)
    return deleted


@dataclass
class JobFailure:
    """A job that exited non-zero (or exited 0 without writing ``done``)."""

    output_dir: Path
    returncode: int
    message: str
    description: str = ""


@dataclass
class SweepSummary:
    """The outcome of a launch."""

    total: int = 0
    skipped: int = 0  # already done
    deleted: int = 0  # incomplete directories removed before their rerun
    launched: int = 0
    succeeded: int = 0
    failed: list[JobFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no job failed."""
        return not self.failed

    def __str__(self) -> str:
        restarted = f" ({self.deleted} of them restarted from scratch)" if self.deleted else ""
        text = (
            f"{self.total} runs: {self.skipped} already done (skipped), {self.launched} launched{restarted}, "
            f"{self.succeeded} succeeded, {len(self.failed)} failed."
        )
        if self.failed:
            text += " Failed runs are rerun by the next sweep; their logs are out.txt and err.txt."
        return text


def last_line(path: Path) -> str:
    """The last non-blank line of a text file (progress frames split at carriage returns), or ''."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def todo(jobs: Iterable[Job]) -> tuple[SweepSummary, list[Job]]:
    """Skips finished jobs, deletes unfinished directories; returns the summary so far and the
    jobs to run (repeats of one run directory once)."""
    unique = list({job.output_dir: job for job in jobs}.values())
    summary = SweepSummary(total=len(unique))
    left = []
    for job in unique:
        state = job.state
        if state == "done":
            summary.skipped += 1
            continue
        if state == "incomplete":
            shutil.rmtree(job.output_dir)
            summary.deleted += 1
        left.append(job)
    return summary, left


def record_exit(summary: SweepSummary, job: Job, code: int) -> None:
    """Counts a finished run: a success when it exited 0 and wrote its done file."""
    if code == 0 and job.state == "done":
        summary.succeeded += 1
        return
    message = last_line(job.output_dir / "err.txt")
    if code == 0:
        message = "exited 0 without writing its done file" + (f" ({message})" if message else "")
    else:
        message = message or f"exit code {code}, nothing on stderr"
    summary.failed.append(JobFailure(job.output_dir, code, message, job.describe()))


def sort_failures(summary: SweepSummary, jobs: Sequence[Job]) -> None:
    """Puts the failures in job order (not finishing order)."""
    order = {job.output_dir: i for i, job in enumerate(jobs)}
    summary.failed.sort(key=lambda failure: order[failure.output_dir])
