"""The figures read properly: display names in titles, every marker explained, legends clear of
axis labels, labelled axes, distinct styles for many series, counts written as words are."""

import numpy as np
import pytest

from torchsage import _style

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
        styles = _style.series_styles(n)
        assert len(set(styles)) == n
    eleven = _style.series_styles(11)
    assert len({c for c, _ in eleven}) == 11 and len({m for _, m in eleven}) == 11


def test_counts_read_properly():
    assert _style.count(1, "trial") == "1 trial" and _style.count(2, "trial") == "2 trials"
    assert _style.seeds_phrase([0]) == "seed 0" and _style.seeds_phrase([0, 2]) == "seeds 0, 2"


@pytest.mark.parametrize("solvers", [["ls", "imtlg", "nashmtl", "upgrad"], ["ls"], ["mgda", "cagrad"]])
def test_toy_figure(solvers):
    from torchsage.mtl import toy

    line = np.array([[0.0, 0.0], [3.0, -5.0]])
    fig = toy._toy_figure({s: {False: [line, line + 1], True: [line - 1]} for s in solvers}, None, "title")
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
