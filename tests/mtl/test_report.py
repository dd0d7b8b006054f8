"""Report over hand-made run records: means, stds and Delta-m% computed by hand, missing seeds
named, unfinished and torn runs ignored, markdown/LaTeX tables, the figure, the CLI."""

import json

import pytest

from torchsage.cli import main
from torchsage.mtl.report import format_table, load_runs, report, stl_baseline, summarize


def _run(root, solver, method, seed, left, right, benchmark="multidigits", done=True, torn=False):
    d = root / benchmark / solver / method / f"seed{seed}"
    d.mkdir(parents=True)
    args = {
        "benchmark": benchmark,
        "solver": solver,
        "method": method,
        "seed": seed,
        "tasks": ["left", "right"],
    }
    lines = [  # an earlier epoch first: only the last record counts
        json.dumps({"epoch": 1, "left/acc": 0.1, "right/acc": 0.1, "loss/left": 2.0, "args": args}),
        json.dumps({"epoch": 2, "left/acc": left, "right/acc": right, "loss/left": 1.0, "args": args}),
    ]
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"epoch": 3, "left/acc": 0.'  # a killed writer's partial line
    (d / "results.jsonl").write_text(text)
    if done:
        (d / "done").write_text("done\n")
    return d


@pytest.fixture
def runs(tmp_path):
    # baseline: left (0.8 + 0.9) / 2 = 0.85, right (0.6 + 0.8) / 2 = 0.7
    _run(tmp_path, "stl", "plain", 0, 0.8, 0.6)
    _run(tmp_path, "stl", "plain", 1, 0.9, 0.8, torn=True)
    _run(tmp_path, "ls", "plain", 0, 0.85, 0.7)  # Delta-m 0
    _run(tmp_path, "ls", "plain", 1, 0.765, 0.56)  # Delta-m = 50 * (0.1 + 0.2) = 15
    _run(tmp_path, "ls", "sage", 0, 0.935, 0.77)  # Delta-m = 50 * (-0.1 - 0.1) = -10
    _run(tmp_path, "ls", "sage", 1, 0.5, 0.5, done=False)  # unfinished: not counted, seed 1 missing
    return tmp_path


def test_loads_only_finished_runs_and_their_last_record(runs):
    loaded = load_runs(runs)
    assert len(loaded) == 5
    stl1 = next(r for r in loaded if r.solver == "stl" and r.seed == 1)
    assert stl1.epoch == 2 and stl1.metrics == {"left/acc": 0.9, "right/acc": 0.8}
    assert stl_baseline(runs, "multidigits") == pytest.approx({"left/acc": 0.85, "right/acc": 0.7})
    assert stl_baseline(runs, "nyuv2") is None


def test_means_stds_and_delta_m_against_hand_computation(runs):
    (table,) = summarize(load_runs(runs))
    assert table.baseline == pytest.approx({"left/acc": 0.85, "right/acc": 0.7})
    assert table.seeds == (0, 1)
    assert [(r.solver, r.method) for r in table.rows] == [("stl", "plain"), ("ls", "plain"), ("ls", "sage")]
    ls = table.row("ls", "plain")
    assert ls.metrics["left/acc"].mean == pytest.approx((0.85 + 0.765) / 2)
    assert ls.metrics["left/acc"].std == pytest.approx(abs(0.85 - 0.765) / 2)  # population std of two
    assert ls.delta_m.mean == pytest.approx(7.5) and ls.delta_m.std == pytest.approx(7.5)
    sage = table.row("ls", "sage")
    assert sage.seeds == (0,) and sage.missing_seeds == (1,)
    assert sage.delta_m.mean == pytest.approx(-10.0) and sage.delta_m.std == 0.0 and sage.delta_m.n == 1
    stl = table.row("stl", "plain")
    # stl seeds are each off the mean baseline by +-: 50 * ((0.05/0.85) + (0.1/0.7)) for seed 0
    d0 = 50 * (0.05 / 0.85 + 0.1 / 0.7)
    assert stl.delta_m.mean == pytest.approx(0.0, abs=1e-12) and stl.delta_m.std == pytest.approx(d0)


def test_markdown_and_latex_tables_name_missing_seeds(runs):
    (table,) = summarize(load_runs(runs))
    text = format_table(table)
    assert "LS + SAGE*" in text and "seeds 1 missing (mean over 0)" in text
    assert "7.50 ± 7.50" in text and "-10.00 ± 0.00" in text
    assert "+17.50" in text  # ΔSAGE = 7.5 - (-10)
    assert "85.00 ± 5.00" in text  # stl left accuracy in percent
    assert "80.75 ± 4.25" in text  # ls left accuracy
    latex = format_table(table, "latex")
    assert r"\begin{tabular}" in latex and r"$\pm$" in latex and "% * LS + SAGE: seeds 1 missing" in latex
    with pytest.raises(ValueError, match="fmt"):
        format_table(table, "html")


def test_published_baselines_for_dense_benchmarks(tmp_path):
    from torchsage.mtl.metrics import BASELINES

    base = BASELINES["cityscapes"]
    d = tmp_path / "cityscapes" / "ls" / "plain" / "seed0"
    d.mkdir(parents=True)
    metrics = {k: v * 1.1 for k, v in base.items()}  # every metric 10% higher than the baseline
    args = {"benchmark": "cityscapes", "solver": "ls", "method": "plain", "seed": 0,
            "tasks": ["segmentation", "depth"]}  # fmt: skip
    (d / "results.jsonl").write_text(json.dumps({"epoch": 1, **metrics, "args": args}) + "\n")
    (d / "done").write_text("done\n")
    (table,) = summarize(load_runs(tmp_path))
    # mIoU, pixAcc higher is better (-10% each), absErr, relErr lower is better (+10% each)
    assert table.row("ls", "plain").delta_m.mean == pytest.approx(0.0, abs=1e-9)
    assert table.baseline_source == "published single-task baselines"


def test_cli_report_prints_tables_and_writes_the_figure(runs, capsys):
    assert main(["mtl", "report", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "LS + SAGE*" in out and (runs / "report.png").stat().st_size > 1000
    assert main(["mtl", "report", str(runs), "--latex", "--plot", str(runs / "x.png")]) == 0
    assert r"\begin{tabular}" in capsys.readouterr().out and (runs / "x.png").exists()


def test_cli_report_bad_input_exits_2(tmp_path, capsys):
    assert main(["mtl", "report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and err.count("\n") == 1
    assert main(["mtl", "report", str(tmp_path)]) == 2
    assert "no finished multi-task runs" in capsys.readouterr().err


def test_report_without_stl_runs_says_delta_m_needs_them(tmp_path):
    _run(tmp_path, "ls", "plain", 0, 0.8, 0.8)
    text = report(tmp_path)
    assert "no stl runs" in text and "—" in text


def test_captions_and_figure_read_properly(tmp_path, monkeypatch):
    """Display names (MultiDigits, IMTL-G) and '1 seed' / 'seed 0' in the caption and the figure."""
    import matplotlib.pyplot as plt

    _run(tmp_path, "stl", "plain", 0, 0.8, 0.6)
    _run(tmp_path, "imtlg", "plain", 0, 0.85, 0.7)
    _run(tmp_path, "imtlg", "sage", 0, 0.8, 0.7)
    (table,) = summarize(load_runs(tmp_path))
    assert table.baseline_source == "STL runs (mean over seed 0)"
    text = format_table(table)
    assert "MultiDigits: final test metrics" in text and "over 1 seed (0)" in text and "IMTL-G" in text
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    report(tmp_path, plot_path=tmp_path / "fig.png")
    (ax,) = figures[0].axes
    assert ax.get_title() == "MultiDigits: Delta-m% vs STL runs (mean over seed 0), mean ± std over seed 0"
    assert ax.get_xlabel() == "base solver" and "Δm%" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["IMTL-G"]
