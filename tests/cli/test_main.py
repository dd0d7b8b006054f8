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


def test_version_and_the_usage_hint(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("torchsage 0.")
    assert main(["dg", "report", "/nonexistent/sweep"]) == 2
    assert capsys.readouterr().err.strip().endswith("(see 'torchsage dg report --help')")


def test_every_option_has_a_help_line_and_shows_its_default():
    import argparse

    from torchsage.cli import build_parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, (parser.prog, action.option_strings)
        text = " ".join(parser.format_help().split())
        if parser.prog == "torchsage mtl toy":
            assert "(default: 20000)" in text and "hours" in text


def test_a_closed_pipe_ends_quietly(tmp_path):
    argv = ["dg", "sweep", "--datasets", "RotatedDigits", "ColoredDigits", "--algorithms", "ERM", "SAGE"]
    argv += ["--n-hparams", "20", "--n-trials", "20", "--output-dir", str(tmp_path), "--dry-run"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchsage", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert proc.stdout.readline().startswith(b"not launched")
    proc.stdout.close()  # `| head -1`: the reader goes away while 7200 lines are still to come
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_names_as_the_docs_spell_them(tmp_path, capsys):
    argv = ["dg", "sweep", "--datasets", "rotateddigits", "--algorithms", "sage", "SAGECurvatureOnly"]
    assert (
        main([*argv, "--n-hparams", "1", "--n-trials", "1", "--output-dir", str(tmp_path), "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "--dataset RotatedDigits --algorithm SAGE " in out
    assert "--algorithm SAGE_CurvatureOnly " in out


def test_a_sweep_checks_its_first_run_before_launching_anything(tmp_path, capsys):
    argv = ["dg", "sweep", "--datasets", "ColoredDigits", "--algorithms", "ERM", "--n-hparams", "1"]
    argv += ["--n-trials", "1", "--hparams", '{"cnn_width": 4}', "--output-dir", str(tmp_path / "s")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cnn_width must be a positive multiple of 8" in err
    assert "nothing launched" in err and not (tmp_path / "s").exists()


def test_sweep_test_environments_by_name_or_index(tmp_path, capsys):
    argv = ["dg", "sweep", "--datasets", "ColoredDigits", "--algorithms", "ERM", "--n-hparams", "1"]
    argv += ["--n-trials", "1", "--output-dir", str(tmp_path), "--dry-run", "--test-envs"]
    assert main([*argv, "+80%", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert [line.split("--test-envs ")[1].split()[0] for line in lines] == ["0", "1"]
    assert main([*argv, "loo", "0"]) == 2
    assert "one mode (single, loo) or environments, not both" in capsys.readouterr().err
