"""The ``torchsage`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit code 2
        self.exit(2, f"torchsage: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchsage", description="SAGE for multi-distribution learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="SGD, SAM and SAGE on RotatedDigits (embedded data)")
    demo.add_argument("--methods", default="SGD,SAM,SAGE", help="comma-separated: SGD, SAM, SAGE")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="number of seeds per method")
    demo.add_argument("--steps", type=_positive_int, default=500)
    demo.add_argument("--batch-size", type=_positive_int, default=32, help="per domain")
    demo.add_argument("--lr", type=float, default=0.05)
    demo.add_argument("--rho", type=float, default=0.05, help="SAM and SAGE ascent radius")
    demo.add_argument("--gamma", type=float, default=1e-3, help="SAGE noise scale")
    demo.add_argument("--test-env", type=int, default=5, help="held-out domain (5 = 75 degrees)")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from torchsage.demo import format_results, run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = run_demo(
        methods=methods,
        seeds=range(args.seeds),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        rho=args.rho,
        gamma=args.gamma,
        test_env=args.test_env,
        progress=not args.no_progress,
    )
    print(
        f"RotatedDigits, test domain {args.test_env} (trained on the others), "
        f"{args.steps} steps, batch {args.batch_size} per domain, rho {args.rho}, gamma {args.gamma}"
    )
    print(format_results(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
    except (ValueError, ImportError, FileNotFoundError) as error:
        print(f"torchsage: error: {error}", file=sys.stderr)
        return 1
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
