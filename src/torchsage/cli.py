"""The ``torchsage`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from torchsage._util import positive_int as _positive_int

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit code 2
        self.exit(2, f"torchsage: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchsage", description="SAGE for multi-distribution learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="ERM, SAM and SAGE swept on the embedded digits data sets")
    demo.add_argument("--output-dir", default="demo_output")
    demo.add_argument("--datasets", nargs="+", default=["RotatedDigits", "ColoredDigits"])
    demo.add_argument("--algorithms", nargs="+", default=["ERM", "SAM", "SAGE"])
    demo.add_argument("--n-trials", type=_positive_int, default=3)
    demo.add_argument("--steps", type=_positive_int, default=200)
    demo.add_argument("--processes", type=_positive_int, default=2)
    demo.add_argument("--no-progress", action="store_true")
    dg = sub.add_parser("dg", help="domain generalization on the DomainBed protocol")
    dg_sub = dg.add_subparsers(dest="dg_command", required=True, parser_class=_Parser)
    train = dg_sub.add_parser("train", help="one training run")
    train.add_argument("--dataset", required=True)
    train.add_argument("--algorithm", required=True)
    train.add_argument("--test-envs", type=int, nargs="+", required=True)
    train.add_argument("--output-dir", required=True)
    train.add_argument("--data-dir", default=None, help="folder holding the image data sets")
    train.add_argument("--steps", type=int, default=None, help="default: the data set's")
    train.add_argument("--checkpoint-freq", type=int, default=None)
    train.add_argument("--hparams-seed", type=int, default=0, help="0: default hyperparameters")
    train.add_argument("--trial-seed", type=int, default=0, help="seeds the in/out splits")
    train.add_argument("--seed", type=int, default=0, help="seeds initialisation and minibatches")
    train.add_argument("--hparams", default=None, help="JSON object overriding hyperparameters")
    train.add_argument("--holdout-fraction", type=float, default=0.2)
    train.add_argument("--save-model", action="store_true", help="write model.pt for diagnostics")
    train.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data loader processes (default: 8 for image sets, else 0)",
    )
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    train.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast (fp16: loss-scaled)")
    train.add_argument("--no-progress", action="store_true")
    from torchsage.dg.sweep import add_sweep_arguments

    sweep = dg_sub.add_parser("sweep", help="datasets x algorithms x test envs x hparams x trials")
    add_sweep_arguments(sweep)
    report = dg_sub.add_parser("report", help="result tables per model-selection method")
    report.add_argument("dir", help="a sweep output directory")
    report.add_argument("--latex", action="store_true", help="LaTeX tables instead of markdown")
    report.add_argument("--plot", default=None, help="PNG path (default: DIR/report.png)")
    report.add_argument(
        "--std", action="store_true", help="± std over trials instead of DomainBed's std/sqrt(n)"
    )
    from torchsage.mtl.train import add_mtl_commands

    add_mtl_commands(sub, _Parser)
    from torchsage.diagnostics.command import add_arguments as add_diagnose_arguments

    diagnose = sub.add_parser("diagnose", help="alignment and curvature terms of a saved model, or sandbox")
    add_diagnose_arguments(diagnose)
    return parser


def _dg(args: argparse.Namespace) -> int:
    if args.dg_command == "train":
        from torchsage.dg.train import TrainArgs, train

        out = train(
            TrainArgs(
                dataset=args.dataset,
                algorithm=args.algorithm,
                test_envs=args.test_envs,
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
                progress=not args.no_progress,
            )
        )
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
            print(f"results written to {out / 'results.jsonl'}")
        return 0
    if args.dg_command == "sweep":
        from torchsage.dg.sweep import run_from_args

        return run_from_args(args)
    from torchsage.dg.report import report

    print(report(args.dir, latex=args.latex, plot_path=args.plot, error="std" if args.std else "sem"))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from torchsage.demo import DemoFailed, run_demo

    try:
        tables, plot_path = run_demo(
            output_dir=args.output_dir,
            datasets=args.datasets,
            algorithms=args.algorithms,
            n_trials=args.n_trials,
            steps=args.steps,
            processes=args.processes,
            progress=not args.no_progress,
        )
    except DemoFailed as error:
        print(f"torchsage: error: demo runs failed: {error}", file=sys.stderr)
        return 1
    print(tables)
    print(f"\nplot: {plot_path}; all selection methods: {Path(args.output_dir) / 'report.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "dg":
            return _dg(args)
        if args.command == "mtl":
            from torchsage.mtl.train import run_mtl

            return run_mtl(args)
        if args.command == "diagnose":
            from torchsage.diagnostics.command import run as run_diagnose

            return run_diagnose(args)
    except (ValueError, ImportError, FileNotFoundError, FloatingPointError) as error:
        print(f"torchsage: error: {error}", file=sys.stderr)
        return 2  # like argparse's usage errors: bad input, nothing run
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
