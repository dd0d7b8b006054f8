"""The command line: the demo end to end on a few steps, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from torchsage.cli import main
from torchsage.demo import run_demo


def test_demo_prints_a_table_for_each_method(capsys):
    assert main(["demo", "--steps", "3", "--seeds", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for method in ("SGD", "SAM", "SAGE"):
        assert f"| {method} |" in out
    assert "test domain 5" in out


def test_demo_trains_the_model():
    (result,) = run_demo(methods=["SGD"], seeds=[0], steps=60, progress=False)
    assert result.train_accuracy > 0.3  # chance is 0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--methods", "SGD,Adam"], "unknown demo method"),
        (["demo", "--test-env", "9"], "test_env"),
        (["demo", "--steps", "0"], "positive integer"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "torchsage", *argv, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
