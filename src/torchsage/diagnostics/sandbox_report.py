"""The sandbox's output: its markdown tables and its two figures (see :mod:`.sandbox`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchsage.harness.tables import save_figure

__all__ = [
    "counterexample_table",
    "method_table",
    "plot_counterexample",
    "plot_prediction",
    "prediction_table",
]


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    save_figure(fig, path, dpi=110)


def _figure(*args: Any, **kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("the sandbox figures need matplotlib: pip install 'torchsage[plot]'") from error
    return Figure(*args, **kwargs)


def _g(x: float) -> str:
    return f"{x:.3g}"


def prediction_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`prediction_experiment`."""
    lines = [
        "| H spectrum | C = cI | sigma^2 | A/(2(K-1)) | sigma^2 tr(H)/2 | predicted | closed form "
        "| measured (± s.e.) | decompose A rel. err | Hutchinson tr(H) vs exact | Lanczos top vs exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["decompose_check"]
        check = (
            "| | | |"
            if c is None
            else f"| {c['alignment_rel_error']:.1e} | {_g(c['trace_hutchinson'])} ± {_g(c['trace_stderr'])} "
            f"vs {_g(c['trace_closed_form'])} | {_g(c['top_lanczos'])} vs {_g(c['top_closed_form'])} |"
        )
        lines.append(
            f"| {r['spectrum']} | {_g(r['meta_scale'])} | {_g(r['sigma2'])} | {_g(r['alignment_part'])} "
            f"| {_g(r['curvature_part'])} | {_g(r['predicted_excess'])} | {_g(r['closed_form_excess'])} "
            f"| {_g(r['measured_excess'])} ± {_g(r['measured_excess_stderr'])} " + check
        )
    return "\n".join(lines)


def counterexample_table(result: dict[str, Any]) -> str:
    """Markdown table of the four configurations of :func:`counterexample`."""
    lines = [
        "| configuration | tr(H) | C = cI | alignment A | A/(2(K-1)) | curvature sigma^2 tr(H)/2 "
        "| closed form | measured (± s.e.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["pairs"]:
        lines.append(
            f"| {r['config']} | {_g(r['hessian_trace'])} | {_g(r['meta_scale'])} | {_g(r['alignment'])} "
            f"| {_g(r['alignment_part'])} | {_g(r['curvature_part'])} | {_g(r['closed_form_excess'])} "
            f"| {_g(r['measured_excess'])} ± {_g(r['measured_excess_stderr'])} |"
        )
    return "\n".join(lines)


def method_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`method_experiment`, averaged over seeds."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    lines = [
        "| method | held-out excess | alignment part E(w_bar) | curvature part | alignment A (decompose) "
        "| tr(H) (decompose) | top eigenvalue | descent noise std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in by.items():

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> str:
            return _g(sum(r[key] for r in rs) / len(rs))

        lines.append(
            f"| {name} | {mean('excess')} | {mean('alignment_part')} | {mean('curvature_part')} "
            f"| {mean('alignment')} | {mean('curvature_trace')} | {mean('curvature_top')} "
            f"| {mean('noise_std')} |"
        )
    return "\n".join(lines)


def plot_prediction(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fig = _figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 3)
    measured = [r["measured_excess"] for r in rows]
    panels = [
        ("both terms: A/(2(K-1)) + sigma^2 tr(H)/2", "predicted_excess"),
        ("alignment term only: A/(2(K-1))", "alignment_part"),
        ("curvature term only: sigma^2 tr(H)/2", "curvature_part"),
    ]
    low = min(measured) / 3
    high = max(measured) * 3
    for ax, (title, key) in zip(axes, panels):
        for spectrum, marker in (("flat", "o"), ("decaying", "s")):
            sel = [r for r in rows if r["spectrum"] == spectrum]
            pred = [max(r[key], low) for r in sel]
            ax.scatter(pred, [r["measured_excess"] for r in sel], marker=marker, label=f"H {spectrum}")
        ax.plot([low, high], [low, high], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("predicted (0 drawn at the left edge)", fontsize=8)
    axes[0].set_ylabel("measured held-out excess risk")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_counterexample(result: dict[str, Any], path: Path) -> None:
    fig = _figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    pairs = result["pairs"]
    xs = range(len(pairs))
    a = [r["alignment_part"] for r in pairs]
    c = [r["curvature_part"] for r in pairs]
    ax1.bar(xs, a, label="alignment part A/(2(K-1))", color="tab:blue")
    ax1.bar(xs, c, bottom=a, label="curvature part sigma^2 tr(H)/2", color="tab:orange")
    ax1.errorbar(
        xs,
        [r["measured_excess"] for r in pairs],
        yerr=[2 * r["measured_excess_stderr"] for r in pairs],
        fmt="kD",
        label="measured excess (± 2 s.e.)",
    )
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels([r["config"].replace(", ", ",\n") for r in pairs], fontsize=7)
    ax1.set_ylabel("held-out excess risk")
    ax1.legend(fontsize=7, loc="upper right")
    ax1.set_title("equal curvature / equal alignment pairs", fontsize=9)
    sweep = result["sweep"]
    t = [r["hessian_scale"] for r in sweep]
    ax2.plot(t, [r["alignment_part"] for r in sweep], label="alignment part (~1/t)")
    ax2.plot(t, [r["curvature_part"] for r in sweep], label="curvature part (~t)")
    ax2.plot(t, [r["closed_form_excess"] for r in sweep], "k-", lw=0.8, label="closed form")
    ax2.errorbar(
        t,
        [r["measured_excess"] for r in sweep],
        yerr=[2 * r["measured_excess_stderr"] for r in sweep],
        fmt="kD",
        ms=3,
        label="measured",
    )
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("Hessian scale t (H = t H0), gradient covariance fixed")
    ax2.set_title("flattening alone trades one term for the other", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
