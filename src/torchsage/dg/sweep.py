"""Sweeps of domain-generalization runs: enumerate, launch, resume.

A sweep is the product datasets x algorithms x test environments x hyperparameter seeds x trial
seeds (the DomainBed protocol). Every element is one :class:`Job`, i.e. one
``python -m torchsage dg train ...`` process writing to its own run directory. The name of that
directory is the md5 hash of the canonical JSON of the arguments that define the run, so running
the same sweep again maps every job to the same directory: finished runs (those holding a ``done``
file) are skipped, unfinished ones are deleted and rerun from scratch, missing ones are launched.

Seeds follow DomainBed: ``hparams_seed`` 0 means the default hyperparameters and ``k > 0`` the
``k``-th random draw; ``trial_seed`` seeds the in/out splits; the ``seed`` of initialisation and
minibatches is a stable hash of (dataset, algorithm, test_envs, hparams_seed, trial_seed), the same
on every machine and in every process (Python's ``hash`` is salted per process, so it is not used).

Test-environment modes:

* ``"single"``: every environment alone as the test environment (what training-domain validation
  and oracle selection need).
* ``"loo"``: additionally every unordered pair ``[t, v]`` with ``t < v``. Leave-one-domain-out
  selection for test environment ``t`` scores hyperparameters by their accuracy on a held-out
  training domain ``v``, using the runs that held out both ``t`` and ``v``; both environments of
  the pair are excluded from training, so ``[t, v]`` and ``[v, t]`` are the same run and one
  unordered pair suffices. This mode needs at least three environments per data set.

Launchers: ``"local"`` (the default) runs the training processes on this machine; ``"submitit"``
submits them to Slurm as one job array through submitit (:func:`launch_submitit`), each array
task running the same ``torchsage dg train`` command in the same hashed run directory, so the two
launchers can be mixed and either one resumes what the other left unfinished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from torchsage._util import fraction as _fraction
from torchsage._util import non_negative_int as _non_negative_int
from torchsage._util import positive_float as _positive_float
from torchsage._util import positive_int as _positive_int

__all__ = [
    "LAUNCHERS",
    "STATES",
    "TEST_ENV_MODES",
    "Job",
    "JobFailure",
    "SlurmOptions",
    "SweepSummary",
    "add_sweep_arguments",
    "delete_incomplete",
    "held_out_env_sets",
    "job_seed",
    "launch",
    "launch_submitit",
    "make_jobs",
    "run_from_args",
    "sweep_status",
]

#: The states of a job's run directory, in the order they are reported.
STATES = ("done", "incomplete", "not launched")
#: The accepted values of ``make_jobs(test_envs=...)``.
TEST_ENV_MODES = ("single", "loo")
#: The accepted values of ``torchsage dg sweep --launcher``.
LAUNCHERS = ("local", "submitit")

EnvNames = Callable[[str], Sequence[str]]
AlgorithmNames = Callable[[], Iterable[str]]
CommandBuilder = Callable[["Job"], Sequence[str]]


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _hparams_problem(text: str) -> str | None:
    """What is wrong with a hyperparameter JSON string, or ``None`` when it is a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg} at character {error.pos}): {text}"
    if not isinstance(value, dict):
        return f"not a JSON object such as '{{\"lr\": 1e-4}}': {text}"
    return None


def _parse_hparams(text: str | None) -> dict[str, Any] | None:
    """Parses a JSON object of hyperparameters; ``None`` stays ``None``; anything else: ValueError."""
    if text is None:
        return None
    problem = _hparams_problem(text)
    if problem is not None:
        raise ValueError(f"hparams is {problem}")
    return json.loads(text)


def job_seed(
    dataset: str, algorithm: str, test_envs: Sequence[int], hparams_seed: int, trial_seed: int
) -> int:
    """The training seed of a run: a stable hash of its identity, in ``[0, 2**31)``.

    md5 of the canonical JSON ``[dataset, algorithm, sorted test_envs, hparams_seed, trial_seed]``,
    so the value does not depend on the process, the machine or the Python version.
    """
    key = _canonical_json([dataset, algorithm, sorted(int(i) for i in test_envs), hparams_seed, trial_seed])
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % (2**31)


@dataclass(frozen=True)
class Job:
    """One training run of a sweep.

    Attributes:
        root: the sweep's output folder; the run directory is ``root / run_id``.
        dataset, algorithm, test_envs, hparams_seed, trial_seed, steps, checkpoint_freq,
        holdout_fraction, data_dir, hparams, amp, device: the arguments of ``torchsage dg train``
            (``hparams`` is a JSON object as a string, or ``None``; ``amp`` is ``"bf16"``,
            ``"fp16"`` or ``None``).
        seed: initialisation and minibatch seed; ``None`` (the default) derives it with
            :func:`job_seed`.
        output_dir: the run directory (computed, not an argument).

    The run id hashes every argument except ``root``, ``data_dir`` and ``device`` (where the data
    lie and which card trains do not define the run, so moving either does not restart finished
    runs). ``device`` ``None`` lets every run take cuda where available, on the node it runs on.
    ``hparams`` is hashed as parsed JSON, so whitespace and key order do not matter.
    """

    root: Path
    dataset: str
    algorithm: str
    test_envs: tuple[int, ...]
    hparams_seed: int = 0
    trial_seed: int = 0
    seed: int | None = None
    steps: int | None = None
    checkpoint_freq: int | None = None
    holdout_fraction: float = 0.2
    data_dir: str | None = None
    hparams: str | None = None
    amp: str | None = None
    device: str | None = None
    output_dir: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise the fields once, here
        set_(self, "root", Path(self.root))
        set_(self, "test_envs", tuple(sorted(int(i) for i in self.test_envs)))
        if not self.test_envs:
            raise ValueError("a job needs at least one test environment")
        if len(set(self.test_envs)) != len(self.test_envs):
            raise ValueError(f"repeated test environment in {list(self.test_envs)}")
        _parse_hparams(self.hparams)
        if self.seed is None:
            seed = job_seed(self.dataset, self.algorithm, self.test_envs, self.hparams_seed, self.trial_seed)
            set_(self, "seed", seed)
        set_(self, "output_dir", self.root / self.run_id)

    def key(self) -> dict[str, Any]:
        """The arguments that define the run (what :attr:`run_id` hashes)."""
        return {
            "dataset": self.dataset,
            "algorithm": self.algorithm,
            "test_envs": list(self.test_envs),
            "hparams_seed": self.hparams_seed,
            "trial_seed": self.trial_seed,
            "seed": self.seed,
            "steps": self.steps,
            "checkpoint_freq": self.checkpoint_freq,
            "holdout_fraction": self.holdout_fraction,
            "hparams": _parse_hparams(self.hparams),
            # only when set, so the directories of full-precision runs keep their names
            **({"amp": self.amp} if self.amp is not None else {}),
        }

    @property
    def run_id(self) -> str:
        """md5 hex digest of the canonical JSON (sorted keys) of :meth:`key`."""
        return hashlib.md5(_canonical_json(self.key()).encode()).hexdigest()

    @property
    def state(self) -> str:
        """``"done"`` (a ``done`` file), ``"incomplete"`` (directory without it) or ``"not launched"``."""
        if (self.output_dir / "done").exists():
            return "done"
        if self.output_dir.exists():
            return "incomplete"
        return "not launched"

    def describe(self) -> str:
        """A short human-readable identity, e.g. ``PACS ERM test_envs=[0] hparams_seed=0 trial_seed=1``."""
        return (
            f"{self.dataset} {self.algorithm} test_envs={list(self.test_envs)} "
            f"hparams_seed={self.hparams_seed} trial_seed={self.trial_seed}"
        )

    def command(self, python: str = sys.executable, progress: bool = False) -> list[str]:
        """The argv of the training process (``--no-progress`` unless ``progress``)."""
        argv = [python, "-m", "torchsage", "dg", "train"]
        argv += ["--dataset", self.dataset, "--algorithm", self.algorithm]
        argv += ["--test-envs", *(str(i) for i in self.test_envs)]
        argv += ["--output-dir", str(self.output_dir)]
        if self.data_dir is not None:
            argv += ["--data-dir", str(self.data_dir)]
        if self.steps is not None:
            argv += ["--steps", str(self.steps)]
        if self.checkpoint_freq is not None:
            argv += ["--checkpoint-freq", str(self.checkpoint_freq)]
        argv += ["--hparams-seed", str(self.hparams_seed), "--trial-seed", str(self.trial_seed)]
        argv += ["--seed", str(self.seed), "--holdout-fraction", repr(float(self.holdout_fraction))]
        if self.hparams is not None:
            argv += ["--hparams", self.hparams]
        if self.amp is not None:
            argv += ["--amp", self.amp]
        if self.device is not None:
            argv += ["--device", self.device]
        if not progress:
            argv.append("--no-progress")
        return argv


def _default_env_names(dataset: str) -> Sequence[str]:
    from torchsage.dg.datasets import environment_names

    return environment_names(dataset)


def _default_algorithm_names() -> Iterable[str]:
    from torchsage.dg.algorithms import ALGORITHMS

    return ALGORITHMS.keys()


def held_out_env_sets(n_envs: int, mode: str = "single") -> list[tuple[int, ...]]:
    """The test-environment sets of a data set with ``n_envs`` environments.

    ``"single"``: ``(0,), (1,), ...``; ``"loo"``: each ``(i,)`` followed by the pairs ``(i, j)``,
    ``j > i``. At least one environment is always left for training.
    """
    if mode not in TEST_ENV_MODES:
        raise ValueError(f"unknown test_envs mode {mode!r}: use one of {', '.join(TEST_ENV_MODES)}")
    needed = 2 if mode == "single" else 3
    if n_envs < needed:
        raise ValueError(
            f"test_envs mode {mode!r} needs at least {needed} environments "
            f"(one left to train on), got {n_envs}"
        )
    if mode == "single":
        return [(i,) for i in range(n_envs)]
    out: list[tuple[int, ...]] = []
    for i in range(n_envs):
        out.append((i,))
        out.extend((i, j) for j in range(i + 1, n_envs))
    return out


def _names(values: str | Iterable[str], what: str) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    if not items:
        raise ValueError(f"no {what} given: name at least one")
    return list(dict.fromkeys(items))  # drop repeats, keep order


def _positive(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_jobs(
    root: str | Path,
    datasets: str | Iterable[str],
    algorithms: str | Iterable[str],
    n_hparams: int,
    n_trials: int,
    steps: int | None = None,
    checkpoint_freq: int | None = None,
    data_dir: str | None = None,
    hparams: str | None = None,
    holdout_fraction: float = 0.2,
    test_envs: str = "single",
    env_names: EnvNames | None = None,
    algorithm_names: AlgorithmNames | None = None,
    amp: str | None = None,
    device: str | None = None,
) -> list[Job]:
    """Every job of a sweep, in the order dataset, algorithm, test envs, hparams seed, trial seed.

    Args:
        root: output folder of the sweep (one run directory per job inside it).
        datasets, algorithms: names (repeats are dropped).
        n_hparams: hyperparameter seeds ``0 .. n_hparams - 1`` (0: the defaults).
        n_trials: trial seeds ``0 .. n_trials - 1``.
        steps, checkpoint_freq, data_dir, hparams, holdout_fraction, amp, device: passed to every run.
        test_envs: ``"single"`` or ``"loo"`` (see the module docstring).
        env_names: ``dataset -> environment names``; default
            :func:`torchsage.dg.datasets.environment_names` (raises on unknown data sets).
        algorithm_names: returns the known algorithms; default the keys of
            :data:`torchsage.dg.algorithms.ALGORITHMS`.

    Raises:
        ValueError: unknown mode, data set or algorithm, empty lists, non-positive counts,
            a holdout fraction outside (0, 1) or malformed ``hparams`` JSON.
    """
    if test_envs not in TEST_ENV_MODES:
        raise ValueError(f"unknown test_envs mode {test_envs!r}: use one of {', '.join(TEST_ENV_MODES)}")
    dataset_list = _names(datasets, "datasets")
    algorithm_list = _names(algorithms, "algorithms")
    _positive(n_hparams, "n_hparams")
    _positive(n_trials, "n_trials")
    _positive(steps, "steps")
    if amp not in (None, "bf16", "fp16"):
        raise ValueError(f"amp must be 'bf16', 'fp16' or None, got {amp!r}")
    _positive(checkpoint_freq, "checkpoint_freq")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    _parse_hparams(hparams)
    env_names = env_names or _default_env_names
    known = list((algorithm_names or _default_algorithm_names)())
    unknown = [a for a in algorithm_list if a not in known]
    if unknown:
        raise ValueError(f"unknown algorithm {unknown[0]!r}: use one of {', '.join(known)}")
    combos = {d: held_out_env_sets(len(env_names(d)), test_envs) for d in dataset_list}
    jobs = []
    for dataset in dataset_list:
        for algorithm in algorithm_list:
            for envs in combos[dataset]:
                for hparams_seed in range(n_hparams):
                    for trial_seed in range(n_trials):
                        jobs.append(
                            Job(
                                root=Path(root),
                                dataset=dataset,
                                algorithm=algorithm,
                                test_envs=envs,
                                hparams_seed=hparams_seed,
                                trial_seed=trial_seed,
                                steps=steps,
                                checkpoint_freq=checkpoint_freq,
                                holdout_fraction=holdout_fraction,
                                data_dir=data_dir,
                                hparams=hparams,
                                amp=amp,
                                device=device,
                            )
                        )
    return jobs


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
    """The outcome of :func:`launch`."""

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


def _last_line(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _child_env(processes: int) -> dict[str, str] | None:
    """With several processes on one machine, split the CPU threads unless the user chose."""
    if processes <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    files: tuple[IO[bytes], IO[bytes]]

    def close(self) -> None:
        for f in self.files:
            f.close()


def _start(job: Job, argv: Sequence[str], env: dict[str, str] | None) -> _Running:
    job.output_dir.mkdir(parents=True, exist_ok=True)
    out = open(job.output_dir / "out.txt", "wb")  # closed when the job ends
    err = open(job.output_dir / "err.txt", "wb")
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
    except OSError:
        out.close()
        err.close()
        raise
    return _Running(job, proc, (out, err))


def _stop(running: Iterable[_Running], grace: float = 10.0) -> None:
    """Terminates the children, waits up to ``grace`` seconds, then kills the rest."""
    running = list(running)
    for r in running:
        if r.proc.poll() is None:
            r.proc.terminate()
    deadline = time.monotonic() + grace
    for r in running:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
        r.close()


def _todo(jobs: Iterable[Job]) -> tuple[SweepSummary, list[Job]]:
    """Skips finished jobs, deletes unfinished directories; returns the summary so far and the
    jobs to run (repeats of one run directory once)."""
    unique = list({job.output_dir: job for job in jobs}.values())
    summary = SweepSummary(total=len(unique))
    todo = []
    for job in unique:
        state = job.state
        if state == "done":
            summary.skipped += 1
            continue
        if state == "incomplete":
            shutil.rmtree(job.output_dir)
            summary.deleted += 1
        todo.append(job)
    return summary, todo


def _record_exit(summary: SweepSummary, job: Job, code: int) -> None:
    """Counts a finished run: a success when it exited 0 and wrote its done file."""
    if code == 0 and job.state == "done":
        summary.succeeded += 1
    else:
        summary.failed.append(JobFailure(job.output_dir, code, _failure_message(job, code), job.describe()))


def _failure_message(job: Job, code: int) -> str:
    message = _last_line(job.output_dir / "err.txt")
    if code == 0:
        return "exited 0 without writing its done file" + (f" ({message})" if message else "")
    return message or f"exit code {code}, nothing on stderr"


def launch(
    jobs: Iterable[Job],
    processes: int = 1,
    progress: bool = True,
    python: str = sys.executable,
    command_builder: CommandBuilder | None = None,
    poll_interval: float = 0.05,
) -> SweepSummary:
    """Runs the jobs that are not done, up to ``processes`` at a time.

    Finished jobs are skipped; unfinished directories are deleted and their jobs rerun from
    scratch. Each job runs as a subprocess with stdout and stderr in ``out.txt`` and ``err.txt``
    of its run directory. A job that exits non-zero (or exits 0 without a ``done`` file) is
    recorded as failed with the last line of its ``err.txt`` and the sweep goes on. On Ctrl-C the
    children are terminated (killed after 10 s) and ``KeyboardInterrupt`` propagates; their
    directories stay unfinished and are rerun by the next launch.

    Args:
        jobs: the jobs (repeats of the same run directory are launched once).
        processes: how many jobs run at once.
        progress: a tqdm bar over the jobs on stderr.
        python: the interpreter of the training processes.
        command_builder: ``job -> argv``; default ``job.command(python)`` (tests use a fake).
        poll_interval: seconds between polls of the running children.
    """
    _positive(processes, "processes")
    summary, todo = _todo(jobs)
    build = command_builder or (lambda job: job.command(python))
    env = _child_env(processes)
    bar = tqdm(
        total=summary.total,
        initial=summary.skipped,
        desc="sweep",
        unit="run",
        file=sys.stderr,
        disable=not progress or not todo,
        dynamic_ncols=True,
    )
    pending = list(reversed(todo))  # pop() from the end keeps the original order
    running: list[_Running] = []
    try:
        while pending or running:
            while pending and len(running) < processes:
                job = pending.pop()
                running.append(_start(job, build(job), env))
                summary.launched += 1
            still = []
            for r in running:
                code = r.proc.poll()
                if code is None:
                    still.append(r)
                    continue
                r.close()
                _record_exit(summary, r.job, code)
                bar.update(1)
                bar.set_postfix(failed=len(summary.failed), refresh=False)
            running = still
            if running:
                time.sleep(poll_interval)
    except BaseException:
        _stop(running)
        raise
    finally:
        bar.close()
    order = {job.output_dir: i for i, job in enumerate(todo)}
    summary.failed.sort(key=lambda failure: order[failure.output_dir])  # job order, not finishing order
    return summary


# ---------------------------------------------------------------------------------------------
# Slurm through submitit

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

    Finished jobs are skipped and unfinished directories deleted, as by :func:`launch`; every
    array task runs the job's training command (``job.command(python)``) in its run directory
    with ``out.txt`` and ``err.txt`` there, and submitit's own logs in ``options.folder``. A run
    that exits non-zero, exits without a ``done`` file, or whose task fails (time limit, node
    failure) is recorded as failed and rerun by the next sweep. On Ctrl-C the array's tasks are
    cancelled and ``KeyboardInterrupt`` propagates.

    Args:
        jobs: the jobs (repeats of the same run directory are submitted once).
        options: the resources; default :class:`SlurmOptions` ``()`` (the cluster's defaults).
        progress: a tqdm bar over the jobs on stderr.
        python: the interpreter of the training processes (the same path must exist on the nodes).
        command_builder: ``job -> argv``; default ``job.command(python)`` (tests use a fake).
        poll_interval: seconds between polls of the tasks' states.

    Raises:
        ImportError: submitit is not installed.
        ValueError: submitit refused the executor or its parameters.
    """
    options = options or SlurmOptions()
    submitit = _import_submitit()
    summary, todo = _todo(jobs)
    if not todo:
        return summary
    build = command_builder or (lambda job: job.command(python))
    folder = options.folder or (todo[0].root / ".submitit")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
        executor.update_parameters(**options.parameters())
    except (NameError, RuntimeError, TypeError, AssertionError) as error:
        raise ValueError(f"submitit refused the {options.cluster} executor: {_first_line(error)}") from None
    argvs = [list(build(job)) for job in todo]
    submitted = executor.map_array(
        _submitted_run,
        argvs,
        [str(job.output_dir.resolve()) for job in todo],
        [options.cpus] * len(todo),
        [os.getcwd()] * len(todo),
    )
    summary.launched = len(submitted)
    bar = tqdm(
        total=summary.total,
        initial=summary.skipped,
        desc=f"sweep ({options.cluster})",
        unit="run",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    waiting = list(zip(todo, submitted))
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
                    _record_exit(summary, job, code)
                bar.update(1)
                bar.set_postfix(failed=len(summary.failed), refresh=False)
            waiting = still
            if waiting:
                time.sleep(poll_interval)
    except BaseException:
        for _, task in waiting:
            task.cancel(check=False)
        raise
    finally:
        bar.close()
    order = {job.output_dir: i for i, job in enumerate(todo)}
    summary.failed.sort(key=lambda failure: order[failure.output_dir])
    return summary


# ---------------------------------------------------------------------------------------------
# Command line


def _hparams_type(text: str) -> str:
    problem = _hparams_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)  # argparse prefixes "argument --hparams: "
    return text


def _slurm_time(text: str) -> int:
    """Minutes, or Slurm's ``[D-]HH:MM[:SS]``, as whole minutes (seconds round up)."""
    text = text.strip()
    try:
        if text.isdigit():
            minutes = int(text)
        else:
            days, _, clock = text.rpartition("-")
            parts = [int(x) for x in clock.split(":")]
            if not 2 <= len(parts) <= 3 or any(x < 0 for x in parts):
                raise ValueError
            hours, mins, secs = (*parts, 0) if len(parts) == 2 else parts
            minutes = (int(days) if days else 0) * 1440 + hours * 60 + mins + (1 if secs else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected minutes or [D-]HH:MM[:SS] (e.g. 90, 01:30:00, 2-00:00), got {text!r}"
        ) from None
    if minutes < 1:
        raise argparse.ArgumentTypeError(f"expected at least one minute, got {text!r}")
    return minutes


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. account=myproject), got {text!r}")
    return key, value


#: ``torchsage dg sweep`` options that only the submitit launcher reads (argparse dest names).
_SUBMITIT_OPTIONS = (
    "slurm_partition",
    "slurm_time",
    "slurm_gpus",
    "slurm_cpus",
    "slurm_mem",
    "slurm_array_parallelism",
    "slurm_extra",
    "slurm_setup",
    "submitit_cluster",
    "submitit_dir",
)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``torchsage dg sweep`` to ``parser`` (returned for chaining)."""
    parser.add_argument("--datasets", nargs="+", required=True, help="data set names")
    parser.add_argument("--algorithms", nargs="+", required=True, help="algorithm names")
    parser.add_argument("--n-trials", type=_positive_int, default=3, help="trial seeds 0..T-1 (default 3)")
    parser.add_argument(
        "--n-hparams", type=_positive_int, default=20, help="hparams seeds 0..H-1, 0 = defaults (default 20)"
    )
    parser.add_argument("--output-dir", required=True, help="sweep folder, one hashed run directory per job")
    parser.add_argument("--data-dir", default=None, help="folder holding the image data sets")
    parser.add_argument("--steps", type=_positive_int, default=None, help="default: each data set's")
    parser.add_argument(
        "--checkpoint-freq", type=_positive_int, default=None, help="default: each data set's"
    )
    parser.add_argument("--hparams", type=_hparams_type, default=None, help="JSON object overriding hparams")
    parser.add_argument("--holdout-fraction", type=_fraction, default=0.2)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast of every run")
    parser.add_argument(
        "--device",
        default=None,
        help="every run's device: cpu, cuda, ... (default: cuda where the run finds one)",
    )
    parser.add_argument(
        "--test-envs",
        choices=TEST_ENV_MODES,
        default="single",
        help="single: each environment held out alone; loo: also every pair (leave-one-domain-out selection)",
    )
    parser.add_argument(
        "--processes", type=_positive_int, default=1, help="local launcher: runs at once (default 1)"
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local (default): processes on this machine; submitit: a Slurm job array "
        '(pip install "torchsage[cluster]")',
    )
    slurm = parser.add_argument_group("submitit launcher (Slurm)")
    slurm.add_argument("--slurm-partition", default=None, help="partition")
    slurm.add_argument(
        "--slurm-time", type=_slurm_time, default=None, help="time limit per run: minutes or [D-]HH:MM[:SS]"
    )
    slurm.add_argument("--slurm-gpus", type=_non_negative_int, default=None, help="GPUs per run")
    slurm.add_argument("--slurm-cpus", type=_positive_int, default=None, help="CPUs per run")
    slurm.add_argument("--slurm-mem", type=_positive_float, default=None, help="memory per run, GB")
    slurm.add_argument(
        "--slurm-array-parallelism", type=_positive_int, default=None, help="runs of the array at once"
    )
    slurm.add_argument(
        "--slurm-extra",
        type=_key_value,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. account=proj or qos=high (repeatable)",
    )
    slurm.add_argument(
        "--slurm-setup", action="append", default=None, metavar="LINE", help="shell line run before each run"
    )
    slurm.add_argument(
        "--submitit-cluster",
        choices=SUBMITIT_CLUSTERS,
        default=None,
        help="slurm (default); local: subprocesses here (testing); debug: in this process",
    )
    slurm.add_argument("--submitit-dir", default=None, help="submitit logs (default OUTPUT_DIR/.submitit)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the runs and their states, launch nothing"
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_from_args(
    args: argparse.Namespace,
    *,
    env_names: EnvNames | None = None,
    algorithm_names: AlgorithmNames | None = None,
    command_builder: CommandBuilder | None = None,
    poll_interval: float = 2.0,
) -> int:
    """Runs ``torchsage dg sweep``; returns the exit code (0: every job done, 1: some failed).

    ``--dry-run`` prints one line per job (state and training command) and the counts per state,
    and launches nothing.
    Bad arguments raise ValueError (the command line prints it as one line and exits 1).
    ``env_names``, ``algorithm_names``, ``command_builder`` and ``poll_interval`` (seconds between
    polls of submitit's tasks) are test hooks.
    """
    jobs = make_jobs(
        root=args.output_dir,
        datasets=args.datasets,
        algorithms=args.algorithms,
        n_hparams=args.n_hparams,
        n_trials=args.n_trials,
        steps=args.steps,
        checkpoint_freq=args.checkpoint_freq,
        data_dir=args.data_dir,
        hparams=args.hparams,
        holdout_fraction=args.holdout_fraction,
        test_envs=args.test_envs,
        env_names=env_names,
        algorithm_names=algorithm_names,
        amp=getattr(args, "amp", None),
        device=getattr(args, "device", None),
    )
    launcher = getattr(args, "launcher", "local")
    if getattr(args, "device", None) is not None:
        from torchsage.dg.train import check_device_name, resolve_device

        if launcher == "submitit":  # the nodes' devices: each run checks its own
            check_device_name(args.device)
        else:  # local runs need the device here
            resolve_device(args.device)
    if launcher == "local":
        given = [name for name in _SUBMITIT_OPTIONS if getattr(args, name, None) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --launcher submitit")
    elif args.processes != 1:
        raise ValueError("--processes is for the local launcher; use --slurm-array-parallelism with submitit")
    if args.dry_run:
        for job in jobs:
            print(f"{job.state:<13} {shlex.join(job.command())}")
        counts = sweep_status(jobs)
        print(
            f"dry run: {len(jobs)} runs in {args.output_dir}: "
            + ", ".join(f"{counts[s]} {s}" for s in STATES)
            + "; nothing launched."
        )
        return 0
    try:
        if launcher == "submitit":
            options = SlurmOptions(
                partition=args.slurm_partition,
                time_min=args.slurm_time,
                gpus=args.slurm_gpus,
                cpus=args.slurm_cpus,
                mem_gb=args.slurm_mem,
                array_parallelism=args.slurm_array_parallelism,
                extra=dict(args.slurm_extra or []),
                setup=tuple(args.slurm_setup or ()),
                cluster=args.submitit_cluster or "slurm",
                folder=Path(args.submitit_dir) if args.submitit_dir else None,
            )
            summary = launch_submitit(
                jobs,
                options,
                progress=not args.no_progress,
                command_builder=command_builder,
                poll_interval=poll_interval,
            )
        else:
            summary = launch(
                jobs, processes=args.processes, progress=not args.no_progress, command_builder=command_builder
            )
    except KeyboardInterrupt:
        print(
            "torchsage: sweep interrupted; running jobs were stopped and are rerun by the next sweep.",
            file=sys.stderr,
        )
        return 130
    print(f"Sweep in {args.output_dir}: {summary}")
    for failure in summary.failed:
        print(f"  failed: {failure.output_dir} ({failure.description}): {failure.message}")
    return 0 if summary.ok else 1
