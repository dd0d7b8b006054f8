"""How the diagnostics are shown: the figure and the text summary of a
:class:`~torchsage.diagnostics.DecompositionReport` (used by ``torchsage diagnose``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_report", "report_figure", "summary"]


def plot_report(report: Any, names: list[str], path: Path, title: str = "") -> None:
    """Cosine matrix heatmap, per-distribution gradient norms and the terms, as one PNG."""
    fig = report_figure(report, names, title)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def report_figure(report: Any, names: list[str], title: str) -> Any:
    """The figure :func:`plot_report` saves (a :class:`matplotlib.figure.Figure`, not tied to
    pyplot): the cosine matrix, the gradient norms and the report's terms as text.

    Example:
        >>> from types import SimpleNamespace
        >>> report = SimpleNamespace(
        ...     cosine_matrix=[[1.0, 0.5], [0.5, 1.0]], grad_norms=[1.0, 2.0], mean_grad_norm=1.3,
        ...     alignment=0.01, damping=5.0, alignment_residuals=1e-3, curvature_trace=10.0,
        ...     curvature_trace_stderr=1.0, curvature_top=[3.0], curvature_min=-0.1,
        ...     disagreement={"normalized_std": 0.5}, K=2, num_params=100, hessian_vector_products=20)
        >>> report_figure(report, ["a", "b"], "SAGE").axes[1].get_title()
        'per-distribution gradient norms'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.1, 1, 1]})
    cos = report.cosine_matrix
    im = ax1.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    ax1.set_xticks(range(len(names)))
    ax1.set_yticks(range(len(names)))
    ax1.set_xticklabels(names, rotation=45, fontsize=7)
    ax1.set_yticklabels(names, fontsize=7)
    for i, row in enumerate(cos):
        for j, value in enumerate(row):
            ax1.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax1, fraction=0.046).set_label("cosine", fontsize=8)
    ax1.set_title("cosine of the gradients of two distributions", fontsize=9)
    ax1.set_xlabel("distribution", fontsize=8)
    ax1.set_ylabel("distribution", fontsize=8)
    ax2.bar(range(len(names)), report.grad_norms, color="tab:gray")
    ax2.axhline(report.mean_grad_norm, color="k", ls="--", lw=0.8, label="‖mean gradient‖")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=45, fontsize=7)
    ax2.set_title("per-distribution gradient norms", fontsize=9)
    ax2.set_xlabel("distribution", fontsize=8)
    ax2.set_ylabel("gradient norm ‖g_k‖", fontsize=8)
    ax2.legend(fontsize=7)
    ax3.axis("off")
    alignment = "nan (negative curvature)" if math.isnan(report.alignment) else f"{report.alignment:.4g}"
    lines = [
        f"alignment tr((H+{report.damping:g}I)^-1 Sigma_g) = {alignment}",
        f"   CG residual {report.alignment_residuals:.2g}",
        f"curvature tr(H) = {report.curvature_trace:.4g} ± {report.curvature_trace_stderr:.2g}",
        f"top eigenvalue(s) = {', '.join(f'{v:.4g}' for v in report.curvature_top)}",
        f"smallest (Ritz) eigenvalue = {report.curvature_min:.4g}",
        f"disagreement (normalized_std) = {report.disagreement.get('normalized_std', math.nan):.4g}",
        f"K = {report.K}, parameters = {report.num_params}",
        f"Hessian-vector products = {report.hessian_vector_products}",
    ]
    ax3.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=8, transform=ax3.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def summary(report: Any, names: list[str]) -> str:
    """The terms of a report as text, one line each, with its warnings."""
    alignment = (
        "nan (negative curvature: raise --damping)"
        if math.isnan(report.alignment)
        else f"{report.alignment:.6g}"
    )
    lines = [
        f"distributions: {', '.join(names)} (K={report.K}, {report.num_params} parameters)",
        f"alignment term  tr((H_bar + {report.damping:g} I)^-1 Sigma_g) = {alignment}"
        f"  (largest CG residual {report.alignment_residuals:.2g})",
        f"curvature term  tr(H_bar) = {report.curvature_trace:.6g} ± {report.curvature_trace_stderr:.2g}"
        f"{' (exact)' if report.exact else ' (Hutchinson)'}",
        f"                top eigenvalue(s) = {', '.join(f'{v:.6g}' for v in report.curvature_top)}; "
        f"smallest {'eigenvalue' if report.exact else 'Ritz value'} = {report.curvature_min:.6g}",
        f"gradient norms  {', '.join(f'{v:.4g}' for v in report.grad_norms)}"
        f" (mean gradient {report.mean_grad_norm:.4g})",
        "disagreement    " + ", ".join(f"{k} {v:.4g}" for k, v in report.disagreement.items()),
    ]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)
