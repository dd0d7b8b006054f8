"""The figures read properly: display names in titles, every marker explained, legends clear of
axis labels, labelled axes, distinct styles for many series, counts written as words are."""

import numpy as np
import pytest

from torchsage.harness import style

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _texts_clear_of(fig, legend) -> None:
    """No axis label or tick label of ``fig`` overlaps ``legend``."""
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        if not ax.axison:
            continue
        texts = [ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
        for text in texts:
            if text.get_text():
                assert not _boxes_overlap(box, text.get_window_extent(renderer)), text.get_text()


def test_series_styles_are_distinct():
    for n in (1, 11, 12, 30):
        styles = style.series_styles(n)
        assert len(set(styles)) == n
    eleven = style.series_styles(11)
    assert len({c for c, _ in eleven}) == 11 and len({m for _, m in eleven}) == 11


def test_counts_read_properly():
    assert style.count(1, "trial") == "1 trial" and style.count(2, "trial") == "2 trials"
    assert style.seeds_phrase([0]) == "seed 0" and style.seeds_phrase([0, 2]) == "seeds 0, 2"


@pytest.mark.parametrize("solvers", [["ls", "imtlg", "nashmtl", "upgrad"], ["ls"], ["mgda", "cagrad"]])
def test_toy_figure(solvers):
    from torchsage.mtl import toy

    line = np.array([[0.0, 0.0], [3.0, -5.0]])
    fig = toy.toy_figure({s: {False: [line, line + 1], True: [line - 1]} for s in solvers}, None, "title")
    try:
        fig.canvas.draw()
        titles = [ax.get_title() for ax in fig.axes if ax.axison]
        names = {"ls": "LS", "imtlg": "IMTL-G", "nashmtl": "Nash-MTL", "upgrad": "UPGrad", "mgda": "MGDA"}
        names["cagrad"] = "CAGrad"
        assert titles == [names[s] for s in solvers]
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        meanings = ("Pareto set", "plain solver", "with SAGE", "start", "end", "mean loss", "starting point")
        for meaning in meanings:
            assert any(meaning in label for label in labels), meaning
        _texts_clear_of(fig, legend)
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes if ax.axison)
    finally:
        plt.close(fig)


def _dg_panels(n_algorithms: int, trials: int):
    from torchsage.dg.figure import Panel

    labels = ("0deg", "15deg", "30deg", "Avg")
    series = {f"ALG{k}": tuple((50.0 + k + i, 1.0) for i in range(len(labels))) for k in range(n_algorithms)}
    return [Panel("RotatedDigits", labels, series, trials), Panel("ColoredDigits", labels[1:], series, 1)]


def test_dg_figure_eleven_algorithms_are_told_apart():
    from torchsage.dg.figure import figure

    fig = figure(_dg_panels(11, 3), "training-domain validation")
    fig.canvas.draw()
    ax = fig.axes[0]
    containers = ax.containers  # one errorbar container per algorithm
    assert len(containers) == 11
    colours = {matplotlib.colors.to_hex(c.lines[0].get_color()) for c in containers}
    markers = {c.lines[0].get_marker() for c in containers}
    assert len(colours) == 11 and len(markers) == 11
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("held-out") and ax.get_ylabel() == "test accuracy (%)"
    assert [ax.get_title() for ax in fig.axes] == ["RotatedDigits (3 trials)", "ColoredDigits (1 trial)"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"ALG{k}" for k in range(11)]
    _texts_clear_of(fig, legend)


def test_diagnose_figure_axes_are_labelled():
    from types import SimpleNamespace

    from torchsage.diagnostics.summary import report_figure

    report = SimpleNamespace(
        cosine_matrix=np.array([[1.0, 0.3], [0.3, 1.0]]),
        grad_norms=[1.0, 2.0],
        mean_grad_norm=1.2,
        alignment=0.01,
        damping=50.0,
        alignment_residuals=1e-3,
        curvature_trace=10.0,
        curvature_trace_stderr=1.0,
        curvature_top=[3.0],
        curvature_min=-0.1,
        disagreement={"normalized_std": 0.5},
        K=2,
        num_params=100,
        hessian_vector_products=20,
    )
    fig = report_figure(report, ["15deg", "30deg"], "SAGE")
    fig.canvas.draw()
    heatmap, norms = fig.axes[0], fig.axes[1]  # the colour bar's axes come last
    for ax in (heatmap, norms):
        assert ax.get_xlabel() == "distribution" and ax.get_ylabel()
    assert "norm" in norms.get_ylabel()
    assert fig.axes[-1].get_ylabel() == "cosine"  # the colour bar says what it shows
