"""``torchsage mtl train|sweep|report|toy``: the command line of the multi-task harness."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from torchsage.cli.common import (
    add_device,
    add_no_progress,
    add_threads,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

__all__ = ["TOY_SOLVERS", "add_mtl_commands", "run_mtl"]

#: solvers drawn by ``torchsage mtl toy`` by default
TOY_SOLVERS = ("ls", "mgda", "pcgrad", "cagrad", "imtlg", "nashmtl", "upgrad", "famo")
#: ``mtl train`` options a sweep passes on to every run (argparse dest names)
TRAIN_OPTIONS = (
    "rho", "gamma", "epochs", "data_dir", "batch_size", "lr", "width", "n_train", "n_test",
    "preset", "rho_scaling", "disagreement", "disagreement_scope",
)  # fmt: skip


def _benchmarks() -> str:
    from torchsage.mtl.benchmarks import BENCHMARKS

    return ", ".join(BENCHMARKS)


def _solvers() -> str:
    from torchsage.mtl.solvers import SOLVER_NAMES

    return ", ".join(SOLVER_NAMES)


def _run_options(p: argparse.ArgumentParser) -> None:
    """The options of one run (``mtl train``; a sweep passes them to every run). Their values are
    checked by :func:`torchsage.mtl.train.train`, with messages naming the option."""
    p.add_argument(
        "--rho", type=float, default=None, help="ascent radius of --sage/--sam (default: the benchmark's)"
    )
    p.add_argument("--gamma", type=float, default=None, help="SAGE's noise scale (default: the benchmark's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the benchmark's)")
    p.add_argument("--data-dir", default=None, help="preprocessed NYUv2 / Cityscapes numpy folder")
    p.add_argument("--batch-size", type=int, default=None, help="default: the benchmark's")
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default: the benchmark's)")
    p.add_argument(
        "--width", type=int, default=None, help="channel width of the network (default: the benchmark's)"
    )
    p.add_argument("--n-train", type=int, default=None, help="MultiDigits training pairs (default: all)")
    p.add_argument("--n-test", type=int, default=None, help="MultiDigits test pairs (default: all)")
    p.add_argument("--num-workers", type=non_negative_int, default=None, help="data loader processes")
    # Choices are checked by train() (one line naming the option), so a sweep fails before launching.
    p.add_argument(
        "--preset",
        default=None,
        metavar="authors",
        help="SAGE with the settings of the authors' code (implies --sage; NYUv2/MultiDigits: "
        "torchsage.preset('authors-mtl'), Cityscapes: 'authors-mtl-cityscapes'; LS summed, FAMO "
        "updated from the perturbed losses); options given here override its values "
        "(default: none, the benchmark's and the library's settings)",
    )
    p.add_argument(
        "--rho-scaling",
        default=None,
        metavar="{global,layer,weight}",
        help="SAGE's rho scaling (default: global; with --preset authors: weight)",
    )
    p.add_argument(
        "--disagreement",
        default=None,
        metavar="{normalized_std,cosine,normalized_var,raw_std,raw_var}",
        help="SAGE's disagreement measure (default: normalized_std, also with --preset authors)",
    )
    p.add_argument(
        "--disagreement-scope",
        default=None,
        metavar="{shared,all}",
        help="parameters the disagreement covers: shared (those two or more tasks reach) or all "
        "(other tasks' heads count as zero gradient) (default: shared; with --preset authors: all)",
    )


def add_mtl_commands(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """Adds ``mtl train|sweep|report|toy`` to the ``torchsage`` subcommands."""
    from torchsage.cli.dg import add_launcher_arguments

    mtl = sub.add_parser("mtl", help="multi-task learning: base solvers with and without SAGE")
    mtl_sub = mtl.add_subparsers(dest="mtl_command", required=True, parser_class=parser_class)

    train_p = mtl_sub.add_parser(
        "train",
        help="one training run",
        description="One run. MultiDigits' defaults (10 epochs) take a few minutes on a CPU; "
        "NYUv2 and Cityscapes (200 epochs) take hours to days on a GPU.",
    )
    train_p.add_argument("--benchmark", required=True, help=f"one of {_benchmarks()} (any case)")
    train_p.add_argument("--solver", required=True, help=f"one of {_solvers()} (any case, e.g. IMTL-G)")
    train_p.add_argument("--sage", action="store_true", help="SAGE on top of the solver")
    train_p.add_argument("--sam", action="store_true", help="SAM on top of the solver")
    train_p.add_argument("--seed", type=int, default=0, help="seeds initialisation, batches, noise")
    train_p.add_argument("--output-dir", required=True, help="run directory (results.jsonl, done, model.pt)")
    train_p.add_argument("--stl-dir", default=None, help="folder of finished stl runs (Delta-m%% baseline)")
    train_p.add_argument("--save-model", action="store_true", help="write model.pt for `torchsage diagnose`")
    train_p.add_argument("--no-augment", action="store_true", help="NYUv2/Cityscapes: no scale-crop/flip")
    _run_options(train_p)
    add_device(train_p)
    add_threads(train_p)
    add_no_progress(train_p)

    sweep_p = mtl_sub.add_parser(
        "sweep",
        help="solvers x methods x seeds, hashed resumable runs",
        description="Runs (or resumes) solvers x methods x seeds of one benchmark; stl runs first.",
    )
    sweep_p.add_argument("--benchmark", required=True, help=f"one of {_benchmarks()} (any case)")
    sweep_p.add_argument("--solvers", nargs="+", default=None, help=f"default: every solver ({_solvers()})")
    sweep_p.add_argument("--methods", nargs="+", default=["plain", "sage"], help="plain, sage, sam")
    sweep_p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    sweep_p.add_argument(
        "--output-dir", required=True, help="sweep folder: BENCHMARK/SOLVER/METHOD/<hash> per run"
    )
    _run_options(sweep_p)
    add_device(sweep_p, "every run")
    add_launcher_arguments(sweep_p)

    report_p = mtl_sub.add_parser("report", help="tables of solvers with and without SAGE")
    report_p.add_argument("dir", help="a folder of runs (searched recursively)")
    report_p.add_argument("--latex", action="store_true", help="LaTeX tables instead of markdown")
    report_p.add_argument("--plot", default=None, help="PNG path (default: DIR/report.png)")

    toy_p = mtl_sub.add_parser(
        "toy",
        help="two-task toy problem: trajectories with and without SAGE",
        description="Trajectories of each solver, plain and with SAGE, from five starting points. "
        "The default 20000 steps per trajectory take hours on a CPU (about 7 hours on 2 cores); "
        "--steps 1000 gives a first picture in minutes.",
    )
    toy_p.add_argument(
        "--output-dir", "--output", dest="output_dir", required=True, help="folder for mtl_toy.png"
    )
    toy_p.add_argument("--solvers", nargs="+", default=list(TOY_SOLVERS), help="solvers drawn")
    toy_p.add_argument(
        "--steps", type=positive_int, default=20000, help="Adam steps per trajectory (hours: see above)"
    )
    toy_p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate")
    toy_p.add_argument("--rho", type=non_negative_float, default=0.05, help="ascent radius")
    toy_p.add_argument("--gamma", type=non_negative_float, default=1e-3, help="SAGE noise scale")
    toy_p.add_argument("--seed", type=int, default=0, help="seeds SAGE's noise")
    add_threads(toy_p)
    add_no_progress(toy_p)


def _train(args: argparse.Namespace) -> int:
    from torchsage.mtl.train import MTLArgs, train

    out = train(
        MTLArgs(
            benchmark=args.benchmark,
            solver=args.solver,
            output_dir=args.output_dir,
            sage=args.sage,
            sam=args.sam,
            rho=args.rho,
            gamma=args.gamma,
            epochs=args.epochs,
            seed=args.seed,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            lr=args.lr,
            width=args.width,
            n_train=args.n_train,
            n_test=args.n_test,
            augment=not args.no_augment,
            stl_dir=args.stl_dir,
            save_model=args.save_model,
            progress=not args.no_progress,
            device=args.device,
            num_workers=args.num_workers or 0,
            preset=args.preset,
            rho_scaling=args.rho_scaling,
            disagreement=args.disagreement,
            disagreement_scope=args.disagreement_scope,
        )
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
        from torchsage.mtl.report import run_summary

        print(run_summary(out))
        print(f"results written to {out / 'results.jsonl'}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from torchsage.cli.dg import check_launcher, dry_run, launch_summary, print_summary
    from torchsage.mtl.sage_settings import check_choices
    from torchsage.mtl.solvers import SOLVER_NAMES
    from torchsage.mtl.sweep import make_jobs, run_sweep

    check_choices(args.preset, args.rho_scaling, args.disagreement, args.disagreement_scope)
    options: list[str] = []
    for name in (*TRAIN_OPTIONS, "device", "num_workers"):
        value = getattr(args, name)
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    jobs = make_jobs(
        args.output_dir, args.benchmark, args.solvers or list(SOLVER_NAMES), args.methods, args.seeds, options
    )
    check_launcher(args)
    if args.dry_run:
        return dry_run(args, jobs)
    _check_first_runs(args, jobs)
    return print_summary(args, lambda: run_sweep(jobs, lambda part: launch_summary(args, part)))


def _check_first_runs(args: argparse.Namespace, jobs: list[Any]) -> None:
    """Builds the first run of every (solver, method) in this process before anything is launched
    (:func:`torchsage.mtl.train.check`); a problem stops the sweep with one line."""
    from torchsage.mtl.train import MTLArgs, check

    seen = set()
    for job in jobs:
        solver, method = job.settings["solver"], job.settings["method"]
        if (solver, method) in seen:
            continue
        seen.add((solver, method))
        run = MTLArgs(
            benchmark=job.settings["benchmark"],
            solver=solver,
            output_dir=str(job.output_dir),
            sage=method == "sage",
            sam=method == "sam",
            rho=args.rho if method != "plain" else None,
            gamma=args.gamma if method == "sage" else None,
            epochs=args.epochs,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            lr=args.lr,
            width=args.width,
            n_train=args.n_train,
            n_test=args.n_test,
            device=args.device,
            **{
                name: getattr(args, name) if method == "sage" else None
                for name in ("preset", "rho_scaling", "disagreement", "disagreement_scope")
            },
        )
        try:
            check(run)
        except (ValueError, ImportError, OSError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{job.describe()}: {first} (nothing launched)") from None


def _toy(args: argparse.Namespace) -> int:
    import functools

    from torchsage.mtl import toy
    from torchsage.mtl.solvers import canonical_solver, make_solver, solver_spec

    names = [canonical_solver(n) for n in args.solvers]
    for name in names:
        solver_spec(name)  # unknown names and stl fail before anything runs
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mtl_toy.png"
    toy.run_toy(
        {name: functools.partial(make_solver, name, 2) for name in names},
        path,
        steps=args.steps,
        lr=args.lr,
        rho=args.rho,
        gamma=args.gamma,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"figure: {path}")
    return 0


def run_mtl(args: argparse.Namespace) -> int:
    """Runs an ``mtl`` subcommand; returns the exit code."""
    if args.mtl_command == "train":
        return _train(args)
    if args.mtl_command == "sweep":
        return _sweep(args)
    if args.mtl_command == "toy":
        return _toy(args)
    from torchsage.mtl.report import report

    print(report(args.dir, latex=args.latex, plot_path=args.plot))
    return 0
