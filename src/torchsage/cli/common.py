"""What every ``torchsage`` command shares: the parser class (one-line errors with a usage hint,
defaults shown in ``--help``), the argparse value types, and the options that mean the same thing
in every command (``--output-dir``, ``--device``, ``--threads``, ``--no-progress``)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

__all__ = [
    "HelpFormatter",
    "Parser",
    "add_device",
    "add_no_progress",
    "add_threads",
    "default_device",
    "fraction",
    "hparams_json",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help line and keeps descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # booleans switched on by their flag and required options have no default worth showing
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        if action.required or "%(default)" in text:
            return text
        return super()._get_help_string(action) or text


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr with a hint, exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _number(text: str, kind: type, expected: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, float, "a finite non-negative number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    value = _number(text, float, "a number in (0, 1)")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def hparams_json(text: str) -> str:
    """argparse type: a JSON object (kept as the string the user gave)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({error.msg} at character {error.pos}): {text}"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object such as '{{\"lr\": 1e-4}}': {text}")
    return text


def default_device() -> str:
    """``"cuda"`` when a CUDA device is usable, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device(parser: argparse.ArgumentParser, what: str = "training") -> None:
    """``--device``: where the model and batches live (default: cuda when available)."""
    parser.add_argument(
        "--device",
        default=None,
        help=f"device of the {what}: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)",
    )


def add_threads(parser: argparse.ArgumentParser, what: str = "this process") -> None:
    """``--threads``: torch's intra-op CPU threads."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help=f"torch CPU threads of {what} (default: torch's choice, usually one per core)",
    )


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress output (bars on a terminal, plain lines otherwise)."""
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress output (a bar on a terminal, a plain line every 30 s otherwise)",
    )
