"""Report tables, figure and the text of ``torchsage dg report`` on hand-made sweeps."""

import json
import sys
from pathlib import Path

import pytest

from torchsage.dg.report import env_labels, format_tables, plot, report
from torchsage.dg.selection import TrainingDomainValidation, load_records, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASET = "ColoredDigits"  # registered: environments "+90%", "+80%", "-90%"

# test accuracy per (algorithm, test env) and trial seed 0, 1, 2; None: no run. By hand: population
# std over trials, and the standard error std / sqrt(n) that DomainBed prints.
ACCS = {
    ("ERM", 0): (0.5, 0.6, 0.7),  # 60.0, std sqrt(0.02/3) = 8.16, SE 8.16/sqrt(3) = 4.71
    ("ERM", 1): (0.8, 0.8, 0.8),  # 80.0 ± 0.0
    ("ERM", 2): (0.9, 0.7, 0.8),  # 80.0, std 8.16, SE 4.71
    # ERM Avg: per-trial 73.33, 70.00, 76.67 -> 73.3, std sqrt((0 + 3.33^2 + 3.33^2)/3) = 2.72, SE 1.57
    ("SAM", 0): (0.6, 0.6, 0.6),
    ("SAM", 1): (0.7, 0.9, None),  # 80.0 over 2 trials, std 10.0, SE 10/sqrt(2) = 7.07
}


def write_run(
    root: Path, name: str, algorithm: str, test_env: int, trial: int, acc: float, done=True, tail=""
):
    rec = {"step": 99, "epoch": 1.0, "loss": 0.5, "hparams": {"lr": 1e-3}}
    for i in range(3):
        rec[f"env{i}_in_acc"] = acc if i == test_env else 0.5
        rec[f"env{i}_out_acc"] = 0.5
    rec["args"] = {
        "dataset": DATASET,
        "algorithm": algorithm,
        "test_envs": [test_env],
        "hparams_seed": 0,
        "trial_seed": trial,
    }
    run = root / name
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text(json.dumps(rec) + "\n" + tail)
    if done:
        (run / "done").write_text("done\n")
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for (algorithm, t), accs in ACCS.items():
        for trial, acc in enumerate(accs):
            if acc is not None:
                write_run(root, f"{algorithm}{t}{trial}", algorithm, t, trial, acc)
    return root


def test_markdown_report(sweep):
    text = report(sweep)
    for heading in (
        "## training-domain validation",
        "## leave-one-domain-out cross-validation",
        "## test-domain validation (oracle)",
    ):
        assert heading in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    assert header == ["Algorithm (% ± SE)", "+90%", "+80%", "-90%", "Avg"]
    erm = [c.strip() for c in rows[1]]
    assert erm == ["ERM", "60.0 ± 4.7", "80.0 ± 0.0", "80.0 ± 4.7", "73.3 ± 1.6"]
    sam = [c.strip() for c in rows[2]]
    assert sam == ["SAM", "60.0 ± 0.0", "80.0 ± 7.1", "—", "—"]
    assert "standard error over trials (std/sqrt(n), as DomainBed prints it)" in text
    missing = "missing: ColoredDigits SAM env 1 (2 of 3 trials); ColoredDigits SAM env 2 (0 of 3 trials)"
    assert text.count(missing) == 2  # training-domain validation and oracle
    assert "ColoredDigits, leave-one-domain-out cross-validation: no results" in text
    assert "Unfinished" not in text and "Corrupt" not in text
    png = sweep / "report.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert str(png) in text


def test_latex_report(sweep, tmp_path):
    text = report(sweep, latex=True, plot_path=tmp_path / "figs" / "out.png")
    # per method with results: the data set's table and DomainBed's Averages table
    assert text.count(r"\begin{tabular}") == 4 and text.count(r"\end{tabular}") == 4
    assert r"Algorithm (\% $\pm$ SE) & +90\% & +80\% & -90\% & Avg \\" in text
    assert r"ERM & 60.0 $\pm$ 4.7 & 80.0 $\pm$ 0.0 & 80.0 $\pm$ 4.7 & 73.3 $\pm$ 1.6 \\" in text
    assert r"SAM & 60.0 $\pm$ 0.0 & 80.0 $\pm$ 7.1 & -- & -- \\" in text
    assert (
        "% missing: ColoredDigits SAM env 1 (2 of 3 trials); ColoredDigits SAM env 2 (0 of 3 trials)" in text
    )
    # Everything that is not a table is a LaTeX comment, so the text pastes into a document.
    in_table = False
    for line in text.splitlines():
        if line.startswith(r"\begin{tabular}"):
            in_table = True
        if not in_table:
            assert not line or line.startswith("%"), line
        if line.startswith(r"\end{tabular}"):
            in_table = False
    assert (tmp_path / "figs" / "out.png").read_bytes()[:8] == PNG_MAGIC
    assert not (sweep / "report.png").exists()


def test_report_names_unfinished_and_corrupt_runs(sweep):
    write_run(sweep, "killed", "ERM", 0, 0, 0.99, done=False)
    write_run(sweep, "torn", "SAM", 2, 0, 0.4, tail='{"step": 199, "env0')
    text = report(sweep, make_plot=False)
    assert "Unfinished runs skipped (1): killed" in text
    assert "Corrupt lines or files skipped (1):" in text
    assert "- torn/results.jsonl: line 2: invalid JSON" in text
    # The unfinished run's .99 is not used; the torn run's valid line is.
    assert "60.0 ± 4.7" in text
    assert "missing: ColoredDigits SAM env 1 (2 of 3 trials); ColoredDigits SAM env 2 (1 of 3 trials)" in text
    assert not (sweep / "report.png").exists()


def test_report_rejects_missing_and_empty_directories(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        report(tmp_path / "nope")
    with pytest.raises(ValueError, match="no usable records"):
        report(tmp_path)
    write_run(tmp_path, "running", "ERM", 0, 0, 0.5, done=False)
    with pytest.raises(ValueError, match="1 unfinished"):
        report(tmp_path)


def test_plot_writes_a_png(sweep, tmp_path):
    summary = summarize(load_records(sweep), TrainingDomainValidation())
    out = plot(summary, tmp_path / "a.png")
    assert out == tmp_path / "a.png" and out.read_bytes()[:8] == PNG_MAGIC
    empty = summarize([], TrainingDomainValidation())
    assert plot(empty, tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib(sweep, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    summary = summarize(load_records(sweep), TrainingDomainValidation())
    with pytest.raises(ImportError, match=r"pip install 'torchsage\[plot\]'"):
        plot(summary, tmp_path / "a.png")
    assert "Plot skipped" in report(sweep)  # the default figure is optional
    with pytest.raises(ImportError):
        report(sweep, plot_path=tmp_path / "a.png")  # a requested one is not


def test_format_tables_options(sweep):
    records = load_records(sweep)
    summary = summarize(records, TrainingDomainValidation())
    named = format_tables(summary, env_names={DATASET: ["red", "green", "blue"]}, error="std")
    assert "| Algorithm (% ± std) | red" in named and "mean ± population std over trials" in named
    assert "60.0 ± 8.2" in named and "73.3 ± 2.7" in named and "80.0 ± 10.0" in named
    assert "60.0 ± 4.7" in format_tables(summary)  # the standard error by default
    both = format_tables([summary, summary])
    assert both.count("| Algorithm (% ± SE) |") == 2
    with pytest.raises(ValueError, match="fmt"):
        format_tables(summary, fmt="html")


def test_env_labels_fall_back_to_indices():
    assert env_labels("ColoredDigits", 3) == ["+90%", "+80%", "-90%"]
    assert env_labels("NoSuchDataset", 2) == ["env0", "env1"]
    assert env_labels("ColoredDigits", 4) == ["env0", "env1", "env2", "env3"]


def test_cli_report_prints_the_standard_error_or_the_std_on_request(sweep, capsys):
    from torchsage.cli import main

    assert main(["dg", "report", str(sweep), "--plot", str(sweep / "a.png")]) == 0
    text = capsys.readouterr().out
    assert "| Algorithm (% ± SE) |" in text and "73.3 ± 1.6" in text
    assert main(["dg", "report", str(sweep), "--std", "--plot", str(sweep / "b.png")]) == 0
    text = capsys.readouterr().out
    assert "| Algorithm (% ± std) |" in text and "73.3 ± 2.7" in text and "± SE" not in text


def test_figure_points_are_the_table_cells(sweep):
    """The figure's panels hold the table's numbers (in %), and the markdown table parses back
    to the same panels (to the printed decimal)."""
    from torchsage.dg.figure import panels_from_markdown, panels_from_summary

    summary = summarize(load_records(sweep), TrainingDomainValidation())
    for error in ("sem", "std"):
        (panel,) = panels_from_summary(summary, error=error)
        assert panel.labels == ("+90%", "+80%", "-90%", "Avg") and panel.trials == 3
        erm = panel.series["ERM"]
        assert erm[0][0] == pytest.approx(60.0) and erm[3][0] == pytest.approx(73.333, abs=1e-3)
        assert erm[0][1] == pytest.approx(8.165 if error == "std" else 4.714, abs=1e-3)
        assert panel.series["SAM"][2] == (None, None)  # no run
        (parsed,) = panels_from_markdown(format_tables(summary, error=error), summary.method)
        assert parsed.labels == panel.labels and parsed.trials == panel.trials
        for algorithm, points in panel.series.items():
            for (m, e), (pm, pe) in zip(points, parsed.series[algorithm]):
                assert (m is None) == (pm is None)
                if m is not None:
                    assert pm == pytest.approx(m, abs=0.05) and pe == pytest.approx(e, abs=0.05)
