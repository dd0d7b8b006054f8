"""``torchsage dg train|sweep|report``: the command line of the domain-generalization harness."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from torchsage.cli.common import (
    add_no_progress,
    add_threads,
    fraction,
    hparams_json,
    non_negative_int,
    positive_float,
    positive_int,
)

__all__ = ["add_dg_commands", "add_sweep_arguments", "run_dg", "run_from_args"]


def _dataset_names() -> str:
    from torchsage.dg.datasets import DATASETS

    return ", ".join(DATASETS)


def _algorithm_names() -> str:
    from torchsage.dg.algorithms import ALGORITHMS

    return ", ".join(ALGORITHMS)


def add_dg_commands(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Adds ``dg train|sweep|report`` to the ``torchsage`` subcommands."""
    dg = sub.add_parser("dg", help="domain generalization on the DomainBed protocol")
    dg_sub = dg.add_subparsers(dest="dg_command", required=True, parser_class=parser_class)
    train = dg_sub.add_parser(
        "train",
        help="one training run",
        description="One run on the DomainBed protocol. The default steps (1001 on the embedded digits, "
        "5001 on the image sets) with the default 64-wide CNN take tens of minutes on a CPU for the "
        "digits; --steps and --hparams '{\"cnn_width\": 16}' make a first run short.",
    )
    train.add_argument("--dataset", required=True, help=f"one of {_dataset_names()} (any case)")
    train.add_argument("--algorithm", required=True, help=f"one of {_algorithm_names()} (any case)")
    train.add_argument(
        "--test-envs",
        nargs="+",
        required=True,
        help="held-out environments, by index (0, 1, ...) or by name (e.g. 15deg, +80%%)",
    )
    train.add_argument("--output-dir", required=True, help="run directory (results.jsonl, done, model.pt)")
    train.add_argument("--data-dir", default=None, help="folder holding the image data sets")
    train.add_argument(
        "--steps", type=positive_int, default=None, help="training steps (default: the data set's)"
    )
    train.add_argument(
        "--checkpoint-freq",
        type=positive_int,
        default=None,
        help="steps between evaluations (default: the data set's)",
    )
    train.add_argument("--hparams-seed", type=non_negative_int, default=0, help="0: default hyperparameters")
    train.add_argument("--trial-seed", type=non_negative_int, default=0, help="seeds the in/out splits")
    train.add_argument("--seed", type=int, default=0, help="seeds initialisation and minibatches")
    train.add_argument(
        "--hparams", type=hparams_json, default=None, help="JSON object overriding hyperparameters"
    )
    train.add_argument(
        "--holdout-fraction", type=fraction, default=0.2, help="share of each environment held out"
    )
    train.add_argument("--save-model", action="store_true", help="write model.pt for `torchsage diagnose`")
    train.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=None,
        help="data loader processes (default: 8 for the image sets, as DomainBed; 0 for the digits)",
    )
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    train.add_argument(
        "--preset",
        choices=["authors", "authors-domainbed"],
        default=None,
        help="SAGE only: the authors' DG recipe, or their optimizer values on DomainBed's protocol",
    )
    train.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast (fp16: loss-scaled)")
    add_threads(train)
    add_no_progress(train)

    sweep = dg_sub.add_parser(
        "sweep",
        help="datasets x algorithms x test envs x hparams x trials, resumable",
        description="Runs (or resumes) a DomainBed-protocol sweep. Each run takes seconds to minutes "
        "on the embedded digits (CPU) and hours on the image data sets (GPU); the defaults "
        "(20 hparams x 3 trials per test environment) are the paper-scale protocol.",
    )
    add_sweep_arguments(sweep)
    prepare = dg_sub.add_parser(
        "prepare",
        help="build a data set's local cache from installed packages (EmojiStyles)",
        description="Builds the cache of a data set made from installed packages (EmojiStyles, "
        "EmojiStylesPip: docs/emoji_styles.md) and prints where it is. Runs build it on first use too.",
    )
    prepare.add_argument("--dataset", required=True, help="EmojiStyles or EmojiStylesPip")
    prepare.add_argument("--data-dir", default=None, help="cache folder (default: ~/.cache/torchsage/...)")
    report = dg_sub.add_parser("report", help="result tables per model-selection method")
    report.add_argument("dir", help="a sweep output directory")
    report.add_argument("--latex", action="store_true", help="LaTeX tables instead of markdown")
    report.add_argument("--plot", default=None, help="PNG path (default: DIR/report.png)")
    report.add_argument(
        "--std", action="store_true", help="± std over trials instead of DomainBed's std/sqrt(n)"
    )


def test_env_indices(dataset: str, specs: list[str]) -> list[int]:
    """Environment indices from indices or names (names matched without regard to case)."""
    from torchsage.dg.datasets import environment_names

    names = environment_names(dataset)
    by_name = {name.lower(): i for i, name in enumerate(names)}
    out = []
    for spec in specs:
        text = str(spec).strip()
        if text.lstrip("-").isdigit() and text.lower() not in by_name:
            out.append(int(text))
        elif text.lower() in by_name:
            out.append(by_name[text.lower()])
        else:
            raise ValueError(
                f"unknown test environment {text!r} of {dataset}: use an index 0..{len(names) - 1} "
                f"or a name ({', '.join(names)})"
            )
    return out


def _train(args: argparse.Namespace) -> int:
    from torchsage.dg.datasets import canonical_dataset
    from torchsage.dg.train import TrainArgs, train

    dataset = canonical_dataset(args.dataset)
    out = train(
        TrainArgs(
            dataset=dataset,
            algorithm=args.algorithm,
            test_envs=test_env_indices(dataset, args.test_envs),
            output_dir=args.output_dir,
            data_dir=args.data_dir,
            steps=args.steps,
            checkpoint_freq=args.checkpoint_freq,
            hparams_seed=args.hparams_seed,
            trial_seed=args.trial_seed,
            seed=args.seed,
            hparams=args.hparams,
            holdout_fraction=args.holdout_fraction,
            save_model=args.save_model,
            num_workers=args.num_workers,
            amp=args.amp,
            device=args.device,
            preset=args.preset,
            progress=not args.no_progress,
        )
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
        from torchsage.dg.report import run_summary

        print(run_summary(out))
        print(f"results written to {out / 'results.jsonl'}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from torchsage.dg.datasets import canonical_dataset
    from torchsage.dg.emoji import ALL_STYLES, PIP_STYLES, build_emoji_styles, load_emoji_styles

    dataset = canonical_dataset(args.dataset)
    styles = {"EmojiStyles": ALL_STYLES, "EmojiStylesPip": PIP_STYLES}.get(dataset)
    if styles is None:
        raise ValueError(f"{dataset} has no cache to prepare: only EmojiStyles and EmojiStylesPip do")
    path = build_emoji_styles(styles, args.data_dir, progress=print)
    data = load_emoji_styles(path)
    per_style = len(data.labels) // len(data.styles)
    print(f"{dataset}: {len(data.styles)} designs x {per_style} emoji, {len(data.classes)} classes")
    print(f"cache: {path}")
    return 0


def run_dg(args: argparse.Namespace) -> int:
    """Runs a ``dg`` subcommand; returns the exit code."""
    if args.dg_command == "train":
        return _train(args)
    if args.dg_command == "sweep":
        return run_from_args(args)
    if args.dg_command == "prepare":
        return _prepare(args)
    from torchsage.dg.report import report

    print(report(args.dir, latex=args.latex, plot_path=args.plot, error="std" if args.std else "sem"))
    return 0


# -- sweep ---------------------------------------------------------------------------------------


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


#: sweep options that only the submitit launcher reads (argparse dest names)
SUBMITIT_OPTIONS = (
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


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--processes``, ``--threads``, ``--launcher`` and the submitit options of a sweep."""
    from torchsage.harness.jobs import LAUNCHERS
    from torchsage.harness.submitit import SUBMITIT_CLUSTERS

    parser.add_argument(
        "--processes", type=positive_int, default=1, help="local launcher: runs at once (worker processes)"
    )
    add_threads(parser, "each run (default: the cores divided by --processes)")
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="local",
        help="local: worker processes on this machine; "
        'submitit: a Slurm job array (pip install "torchsage[cluster]")',
    )
    slurm = parser.add_argument_group("submitit launcher (Slurm)")
    slurm.add_argument("--slurm-partition", default=None, help="partition")
    slurm.add_argument(
        "--slurm-time", type=_slurm_time, default=None, help="time limit per run: minutes or [D-]HH:MM[:SS]"
    )
    slurm.add_argument("--slurm-gpus", type=non_negative_int, default=None, help="GPUs per run")
    slurm.add_argument("--slurm-cpus", type=positive_int, default=None, help="CPUs per run")
    slurm.add_argument("--slurm-mem", type=positive_float, default=None, help="memory per run, GB")
    slurm.add_argument(
        "--slurm-array-parallelism", type=positive_int, default=None, help="runs of the array at once"
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
    add_no_progress(parser)


def _test_env_spec(text: str) -> str:
    """argparse type of a sweep's ``--test-envs``: a mode, an index, or an environment name."""
    from torchsage.dg.datasets import DATASETS
    from torchsage.dg.sweep import TEST_ENV_MODES

    names = {n.lower() for envs, _ in DATASETS.values() for n in envs}
    if text in TEST_ENV_MODES or text.isdigit() or text.lower() in names:
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(TEST_ENV_MODES)}, or environment indices or names)"
    )


def _held_out(args: argparse.Namespace) -> tuple[str, list[str] | None]:
    """The test-environment mode of a sweep's arguments and the environments it keeps (None: all)."""
    from torchsage.dg.sweep import TEST_ENV_MODES

    specs = [args.test_envs] if isinstance(args.test_envs, str) else list(args.test_envs)
    modes = [s for s in specs if s in TEST_ENV_MODES]
    if modes and len(specs) > 1:
        raise ValueError(
            f"--test-envs takes one mode ({', '.join(TEST_ENV_MODES)}) or environments, not both"
        )
    return (modes[0], None) if modes else ("single", specs)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``torchsage dg sweep`` to ``parser`` (returned for chaining)."""
    parser.add_argument("--datasets", nargs="+", required=True, help=f"data sets: {_dataset_names()}")
    parser.add_argument("--algorithms", nargs="+", required=True, help=f"algorithms: {_algorithm_names()}")
    parser.add_argument("--n-trials", type=positive_int, default=3, help="trial seeds 0..T-1")
    parser.add_argument(
        "--n-hparams", type=positive_int, default=20, help="hparams seeds 0..H-1, 0 = defaults"
    )
    parser.add_argument("--output-dir", required=True, help="sweep folder, one hashed run directory per run")
    parser.add_argument("--data-dir", default=None, help="folder holding the image data sets")
    parser.add_argument("--steps", type=positive_int, default=None, help="default: each data set's")
    parser.add_argument("--checkpoint-freq", type=positive_int, default=None, help="default: each data set's")
    parser.add_argument("--hparams", type=hparams_json, default=None, help="JSON object overriding hparams")
    parser.add_argument(
        "--holdout-fraction", type=fraction, default=0.2, help="share of each environment held out"
    )
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast of every run")
    parser.add_argument(
        "--device",
        default=None,
        help="every run's device: cpu, cuda, ... (default: cuda where the run finds one)",
    )
    parser.add_argument(
        "--preset",
        choices=["authors"],
        default=None,
        help="SAGE runs twice: the authors' DG recipe and their optimizer values on DomainBed's protocol",
    )
    parser.add_argument(
        "--test-envs",
        nargs="+",
        type=_test_env_spec,
        default="single",
        metavar="MODE_OR_ENV",
        help="single: each environment held out alone; loo: also every pair (leave-one-domain-out "
        "selection); or environments by index or name, each held out alone",
    )
    add_launcher_arguments(parser)
    return parser


def slurm_options(args: argparse.Namespace) -> Any:
    """The :class:`~torchsage.harness.submitit.SlurmOptions` of a sweep's arguments."""
    from torchsage.harness.submitit import SlurmOptions

    return SlurmOptions(
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


def check_launcher(args: argparse.Namespace) -> str:
    """The launcher of a sweep's arguments; ValueError for options of the other launcher."""
    launcher = getattr(args, "launcher", "local")
    if launcher == "local":
        given = [name for name in SUBMITIT_OPTIONS if getattr(args, name, None) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --launcher submitit")
    elif args.processes != 1:
        raise ValueError("--processes is for the local launcher; use --slurm-array-parallelism with submitit")
    return launcher


def launch_summary(args: argparse.Namespace, jobs: list[Any], **hooks: Any) -> Any:
    """Launches a sweep's jobs with the launcher its arguments choose; the summary."""
    from torchsage.harness.local import launch
    from torchsage.harness.submitit import launch_submitit

    progress = not args.no_progress
    if check_launcher(args) == "submitit":
        return launch_submitit(jobs, slurm_options(args), progress=progress, **hooks)
    hooks.pop("poll_interval", None)
    return launch(jobs, processes=args.processes, progress=progress, threads=args.threads, **hooks)


def dry_run(args: argparse.Namespace, jobs: list[Any]) -> int:
    """Prints each job's state and command and the counts per state; launches nothing."""
    from torchsage.harness.jobs import STATES, sweep_status

    for job in jobs:
        print(f"{job.state:<13} {shlex.join(job.command())}")
    counts = sweep_status(jobs)
    print(
        f"dry run: {len(jobs)} runs in {args.output_dir}: "
        + ", ".join(f"{counts[s]} {s}" for s in STATES)
        + "; nothing launched."
    )
    return 0


def print_summary(args: argparse.Namespace, launch: Any) -> int:
    """Runs ``launch() -> SweepSummary``, prints the summary and each failure with its last
    stderr line; the exit code (0 all done, 1 some failed, 130 interrupted)."""
    try:
        summary = launch()
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


def run_from_args(
    args: argparse.Namespace,
    *,
    env_names: Any = None,
    algorithm_names: Any = None,
    command_builder: Any = None,
    poll_interval: float = 2.0,
) -> int:
    """Runs ``torchsage dg sweep``; returns the exit code (0: every job done, 1: some failed).

    ``--dry-run`` prints one line per job (state and training command) and the counts per state,
    and launches nothing. Before launching, the first job of every (data set, algorithm) is
    checked in this process (:func:`torchsage.dg.sweep.validate_jobs`), so a wrong setting stops
    the sweep with one line instead of failing every run. Bad arguments raise ValueError.
    ``env_names``, ``algorithm_names``, ``command_builder`` and ``poll_interval`` (seconds between
    polls of submitit's tasks) are test hooks; the first two also skip the in-process check.
    """
    from torchsage.dg.sweep import make_jobs, validate_jobs

    mode, chosen = _held_out(args)
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
        test_envs=mode,
        env_names=env_names,
        algorithm_names=algorithm_names,
        amp=getattr(args, "amp", None),
        device=getattr(args, "device", None),
        preset=getattr(args, "preset", None),
    )
    if chosen is not None:  # environments named: each of them held out alone
        keep = {d: set(test_env_indices(d, chosen)) for d in dict.fromkeys(job.dataset for job in jobs)}
        jobs = [job for job in jobs if job.test_envs[0] in keep[job.dataset]]
    if getattr(args, "device", None) is not None:
        from torchsage.dg.train import check_device_name, resolve_device

        if getattr(args, "launcher", "local") == "submitit":  # the nodes' devices: each run checks its own
            check_device_name(args.device)
        else:  # local runs need the device here
            resolve_device(args.device)
    check_launcher(args)
    if env_names is None and algorithm_names is None and not args.dry_run:
        validate_jobs(jobs)
    if args.dry_run:
        return dry_run(args, jobs)
    hooks: dict[str, Any] = {"command_builder": command_builder, "poll_interval": poll_interval}
    return print_summary(args, lambda: launch_summary(args, jobs, **hooks))
