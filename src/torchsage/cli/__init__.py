"""The ``torchsage`` command line.

One parser builder per command group (:mod:`.dg`, :mod:`.mtl`, :mod:`.diagnose`, the demo here)
and one error handler (:func:`main`): bad input prints one line on stderr (the message and where
to look for help) and exits 2; a closed output pipe (``torchsage dg report DIR | head``) ends
quietly. Nothing in the library imports this package: it sits on top of the harnesses.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from torchsage.cli.common import Parser, add_no_progress, add_threads, positive_int

__all__ = ["build_parser", "main"]

#: the exceptions that mean bad input (exit code 2, one line, no traceback)
BAD_INPUT = (ValueError, ImportError, OSError, FloatingPointError)


def _version() -> str:
    from torchsage import __version__

    return f"torchsage {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``torchsage`` command."""
    from torchsage.cli.dg import add_dg_commands
    from torchsage.cli.diagnose import add_diagnose_command
    from torchsage.cli.mtl import add_mtl_commands

    parser = Parser(prog="torchsage", description="SAGE for multi-distribution learning.")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    demo = sub.add_parser(
        "demo",
        help="ERM, SAM and SAGE swept on the embedded digits data sets (minutes on a CPU)",
        description="A DomainBed-protocol sweep on the embedded digits: 81 short runs, 8 min 16 s "
        "on two idle CPU cores (measured 30 November 2026), several times longer on a loaded machine. "
        "Resumable: rerunning skips finished runs.",
    )
    demo.add_argument("--output-dir", default="demo_output", help="sweep folder (report.md, report.png)")
    demo.add_argument("--datasets", nargs="+", default=["RotatedDigits", "ColoredDigits"], help="data sets")
    demo.add_argument("--algorithms", nargs="+", default=["ERM", "SAM", "SAGE"], help="algorithms")
    demo.add_argument("--n-trials", type=positive_int, default=3, help="trial seeds per test environment")
    demo.add_argument("--steps", type=positive_int, default=200, help="training steps per run")
    demo.add_argument("--processes", type=positive_int, default=2, help="runs at once (worker processes)")
    add_threads(demo, "each run (default: the cores divided by --processes)")
    add_no_progress(demo)
    add_dg_commands(sub, Parser)
    add_mtl_commands(sub, Parser)
    add_diagnose_command(sub)
    return parser


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
            threads=args.threads,
        )
    except DemoFailed as error:
        print(f"torchsage: error: demo runs failed: {error}", file=sys.stderr)
        return 1
    print(tables)
    print(f"\nplot: {plot_path}; all selection methods: {Path(args.output_dir) / 'report.md'}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    threads = getattr(args, "threads", None)
    if threads is not None and not hasattr(args, "launcher") and args.command != "demo":  # sweeps: per run
        import torch

        torch.set_num_threads(threads)
    if args.command == "demo":
        return _demo(args)
    if args.command == "dg":
        from torchsage.cli.dg import run_dg

        return run_dg(args)
    if args.command == "mtl":
        from torchsage.cli.mtl import run_mtl

        return run_mtl(args)
    from torchsage.cli.diagnose import run_diagnose

    return run_diagnose(args)


def _command(args: argparse.Namespace) -> str:
    words = ["torchsage", args.command]
    for key in ("dg_command", "mtl_command"):
        if getattr(args, key, None):
            words.append(getattr(args, key))
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``torchsage ARGV``; returns the exit code (2: bad input, reported as one line)."""
    args = build_parser().parse_args(argv)  # usage errors: one line, SystemExit(2)
    try:
        code = _dispatch(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a program ended by a closed pipe
    except BAD_INPUT as error:
        text = str(error).strip()
        message = text.splitlines()[0] if text else type(error).__name__
        print(f"torchsage: error: {message} (see '{_command(args)} --help')", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
