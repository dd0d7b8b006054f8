"""``torchsage mtl sweep`` end to end: hashed resumable runs on the warm launcher, stl first, the
pre-launch check, the failure summary, and reports that keep runs of other settings apart."""

import pytest

from torchsage.cli import main

pytest.importorskip("torchjd")

TINY = ["--n-train", "48", "--n-test", "40", "--batch-size", "16", "--epochs", "1", "--device", "cpu"]


def test_sweep_resumes_and_reports_a_standalone_run_of_other_settings_apart(tmp_path, capsys):
    root = tmp_path / "sweep"
    argv = ["mtl", "sweep", "--benchmark", "MultiDigits", "--solvers", "stl", "LS", "--methods", "plain"]
    argv += ["--seeds", "0", "--output-dir", str(root), "--no-progress", *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 runs: 0 already done (skipped), 2 launched, 2 succeeded, 0 failed." in out
    runs = sorted(p.parent for p in root.rglob("done"))
    assert [r.relative_to(root).parts[:3] for r in runs] == [
        ("multidigits", "ls", "plain"),
        ("multidigits", "stl", "plain"),
    ]
    assert all(len(r.name) == 32 for r in runs)  # md5 of the settings
    assert main(argv) == 0
    assert "2 runs: 2 already done (skipped), 0 launched" in capsys.readouterr().out

    # a standalone run of another setting in the same folder: its own row, not a replacement
    other = ["mtl", "train", "--benchmark", "multidigits", "--solver", "ls", "--seed", "0", "--lr", "0.01"]
    assert main([*other, "--output-dir", str(root / "mine"), "--no-progress", *TINY]) == 0
    assert "test metrics after epoch 1" in capsys.readouterr().out  # the run's short table
    assert main(["mtl", "report", str(root)]) == 0
    table = capsys.readouterr().out
    assert "| LS [lr=0.001] " in table and "| LS [lr=0.01] " in table


def test_sweep_checks_its_first_runs_before_launching(tmp_path, capsys):
    argv = ["mtl", "sweep", "--benchmark", "multidigits", "--solvers", "ls", "--seeds", "0", "1"]
    with pytest.raises(SystemExit):  # argparse: not an integer
        main([*argv, "--output-dir", str(tmp_path / "s"), "--width", "x"])
    assert "argument --width: invalid int value: 'x'" in capsys.readouterr().err
    assert main([*argv, "--output-dir", str(tmp_path / "s"), "--width", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--width must be a positive integer" in err
    assert "nothing launched" in err and not (tmp_path / "s").exists()
    assert (
        main([*argv, "--solvers", "IMTL-G", "Nash-MTL", "--output-dir", str(tmp_path / "d"), "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("--solver imtlg") == 4 and out.count("--solver nashmtl") == 4  # plain and sage x 2 seeds
