"""The shared table renderer: markdown layout, LaTeX escapes, the PNG written atomically."""

import pytest

from torchsage.harness.tables import latex_escape, render_table, save_figure


def test_markdown_layout():
    text = render_table(["name", "v"], [["a_b", "1.0"], ["c", "10.25"]], caption="cap", notes=["note 1"])
    assert text.splitlines() == [
        "**cap**",
        "",
        "| name | v     |",
        "|------|------:|",
        "| a_b  | 1.0   |",
        "| c    | 10.25 |",
        "",
        "note 1",
    ]


def test_latex_escapes_the_header_and_first_column_only():
    text = render_table(
        ["50%", "Δm% ↓"], [["x_1", r"1.0 $\pm$ 0.1"]], caption="c", fmt="latex", columns="l|c"
    )
    assert text.splitlines() == [
        "% c",
        r"\begin{tabular}{l|c}",
        r"\hline",
        r"50\% & $\Delta$m\% $\downarrow$ \\",
        r"\hline",
        r"x\_1 & 1.0 $\pm$ 0.1 \\",
        r"\hline",
        r"\end{tabular}",
    ]
    assert latex_escape("a&b#{c}~^\\") == r"a\&b\#\{c\}\textasciitilde{}\textasciicircum{}\textbackslash{}"
    with pytest.raises(ValueError, match="fmt must be one of markdown, latex"):
        render_table(["a"], [], caption="", fmt="html")  # type: ignore[arg-type]


def test_save_figure_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1])
    path = save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "f.png.tmp").exists()
