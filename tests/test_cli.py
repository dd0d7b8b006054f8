"""The command line: the demo sweep end to end on a few steps, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from torchsage.cli import main


def test_demo_runs_a_sweep_and_prints_the_training_domain_validation_table(tmp_path, capsys):
    argv = ["demo", "--output-dir", str(tmp_path / "demo"), "--datasets", "ColoredDigits"]
    argv += ["--algorithms", "ERM", "SAGE", "--n-trials", "1", "--steps", "3", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "training-domain validation" in out
    assert "| ERM " in out and "| SAGE " in out and "-90%" in out
    assert (tmp_path / "demo" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "oracle" in (tmp_path / "demo" / "report.md").read_text()
    runs = [d for d in (tmp_path / "demo").iterdir() if d.is_dir()]
    assert len(runs) == 2 * 3 and all((d / "done").exists() for d in runs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--algorithms", "ERM", "DANN"], "unknown algorithm"),
        (["demo", "--datasets", "MNIST"], "unknown dataset"),
        (["demo", "--steps", "0"], "positive integer"),
        (["dg", "report", "/nonexistent/sweep"], "/nonexistent/sweep"),
        (
            ["dg", "sweep", "--datasets", "X", "--algorithms", "ERM", "--output-dir", "/tmp/x"],
            "unknown dataset",
        ),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(argv, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torchsage", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
