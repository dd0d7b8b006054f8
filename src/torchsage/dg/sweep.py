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

Launchers (:mod:`torchsage.harness`, shared with the mtl sweep): :func:`launch` runs the jobs on
a pool of worker processes on this machine (each imports torch and builds the embedded data once);
:func:`launch_submitit` submits them to Slurm as one job array, each array task running the same
``torchsage dg train`` command in the same hashed run directory, so the two launchers can be
mixed and either one resumes what the other left unfinished. :func:`validate_jobs` checks the
first job of every (data set, algorithm) in this process before anything is launched.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchsage.harness.jobs import (
    LAUNCHERS,
    STATES,
    JobFailure,
    SweepSummary,
    delete_incomplete,
    run_state,
    sweep_status,
)
from torchsage.harness.local import launch
from torchsage.harness.seeds import digest, stable_seed
from torchsage.harness.submitit import SlurmOptions, launch_submitit
from torchsage.registry import resolve

__all__ = [
    "LAUNCHERS",
    "STATES",
    "TEST_ENV_MODES",
    "Job",
    "JobFailure",
    "SlurmOptions",
    "SweepSummary",
    "delete_incomplete",
    "held_out_env_sets",
    "job_seed",
    "launch",
    "launch_submitit",
    "make_jobs",
    "sweep_status",
    "validate_jobs",
]

#: The accepted values of ``make_jobs(test_envs=...)``.
TEST_ENV_MODES = ("single", "loo")

EnvNames = Callable[[str], Sequence[str]]
AlgorithmNames = Callable[[], Iterable[str]]


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
    return stable_seed([dataset, algorithm, sorted(int(i) for i in test_envs), hparams_seed, trial_seed])


@dataclass(frozen=True)
class Job:
    """One training run of a sweep.

    Attributes:
        root: the sweep's output folder; the run directory is ``root / run_id``.
        dataset, algorithm, test_envs, hparams_seed, trial_seed, steps, checkpoint_freq,
        holdout_fraction, data_dir, hparams, amp, device, preset: the arguments of ``torchsage dg train``
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
    preset: str | None = None
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
            **({"preset": self.preset} if self.preset is not None else {}),
        }

    @property
    def run_id(self) -> str:
        """md5 hex digest of the canonical JSON (sorted keys) of :meth:`key`."""
        return digest(self.key())

    @property
    def state(self) -> str:
        """``"done"`` (a ``done`` file), ``"incomplete"`` (directory without it) or ``"not launched"``."""
        return run_state(self.output_dir)

    def describe(self) -> str:
        """A short human-readable identity, e.g. ``PACS ERM test_envs=[0] hparams_seed=0 trial_seed=1``."""
        name = self.algorithm if self.preset is None else f"{self.algorithm}@{self.preset}"
        return (
            f"{self.dataset} {name} test_envs={list(self.test_envs)} "
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
        if self.preset is not None:
            argv += ["--preset", self.preset]
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
    preset: str | None = None,
) -> list[Job]:
    """Every job of a sweep, in the order dataset, algorithm, test envs, hparams seed, trial seed.

    Args:
        root: output folder of the sweep (one run directory per job inside it).
        datasets, algorithms: names (repeats are dropped).
        n_hparams: hyperparameter seeds ``0 .. n_hparams - 1`` (0: the defaults).
        n_trials: trial seeds ``0 .. n_trials - 1``.
        steps, checkpoint_freq, data_dir, hparams, holdout_fraction, amp, device: passed to every run.
        preset: ``"authors"`` runs SAGE twice, under each of
            :data:`torchsage.dg.recipe.DG_PRESETS` (the other algorithms as usual).
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
    if env_names is None:  # the registry: any case and punctuation, recorded as registered
        from torchsage.dg.datasets import canonical_dataset

        dataset_list = list(dict.fromkeys(canonical_dataset(d) for d in dataset_list))
    env_names = env_names or _default_env_names
    known = list((algorithm_names or _default_algorithm_names)())
    algorithm_list = list(dict.fromkeys(resolve(a, known, "algorithm") for a in algorithm_list))
    combos = {d: held_out_env_sets(len(env_names(d)), test_envs) for d in dataset_list}
    jobs = []
    for dataset in dataset_list:
        for algorithm, variant in [(a, v) for a in algorithm_list for v in _preset_variants(a, preset)]:
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
                                preset=variant,
                            )
                        )
    return jobs


def _preset_variants(algorithm: str, preset: str | None) -> list[str | None]:
    if preset is None:
        return [None]
    from torchsage.dg.recipe import preset_variants

    return preset_variants(algorithm, preset)


def validate_jobs(jobs: Iterable[Job]) -> None:
    """Checks the first job of every (data set, algorithm) in this process before a sweep
    launches anything: the hyperparameters, the data set (its folder for the image sets, the
    optional dependencies) and the network (backbone and hparams such as ``cnn_width``) are
    built as the run would build them; nothing is trained or written.

    Raises:
        ValueError: one line naming the run and what is wrong (``ImportError``,
            ``FileNotFoundError`` and network construction errors are reported the same way).
    """
    from torchsage.dg.algorithms import get_algorithm
    from torchsage.dg.datasets import get_dataset
    from torchsage.dg.train import TrainArgs, _check

    seen: set[tuple[str, str]] = set()
    for job in jobs:
        if (job.dataset, job.algorithm) in seen:
            continue
        seen.add((job.dataset, job.algorithm))
        args = TrainArgs(
            dataset=job.dataset,
            algorithm=job.algorithm,
            test_envs=list(job.test_envs),
            output_dir=str(job.output_dir),
            data_dir=job.data_dir,
            steps=job.steps,
            checkpoint_freq=job.checkpoint_freq,
            hparams_seed=job.hparams_seed,
            trial_seed=job.trial_seed,
            seed=int(job.seed or 0),
            hparams=job.hparams,
            holdout_fraction=job.holdout_fraction,
            amp=job.amp,
            preset=job.preset,
        )
        try:
            hparams = _check(args)
            dataset = get_dataset(
                job.dataset,
                job.data_dir,
                augment=bool(hparams["data_augmentation"]),
                image_size=int(hparams.get("image_size", 224)),
            )
            n_train = len(dataset.environments) - len(job.test_envs)
            get_algorithm(job.algorithm)(dataset.input_shape, dataset.num_classes, n_train, hparams)
        except (ValueError, ImportError, OSError, RuntimeError, KeyError, TypeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{job.describe()}: {first} (nothing launched)") from None
