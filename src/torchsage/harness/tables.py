"""One table renderer for the reports of both harnesses: markdown, LaTeX, and PNG figures.

Example:
    >>> print(render_table(["Algorithm", "acc"], [["ERM", "91.2"]], caption="test accuracy (%)"))
    **test accuracy (%)**
    <BLANKLINE>
    | Algorithm | acc  |
    |-----------|-----:|
    | ERM       | 91.2 |
    >>> print(render_table(["Solver", "Δm% ↓"], [["PCGrad_x", "1.0"]], caption="c", fmt="latex"))
    % c
    \\begin{tabular}{lc}
    \\hline
    Solver & $\\Delta$m\\% $\\downarrow$ \\\\
    \\hline
    PCGrad\\_x & 1.0 \\\\
    \\hline
    \\end{tabular}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = ["FORMATS", "latex_escape", "render_table", "save_figure"]

#: the text formats of :func:`render_table`
FORMATS = ("markdown", "latex")

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_SYMBOLS = {"Δ": r"$\Delta$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped and Δ, ↓, ↑, ± as math symbols."""
    out = "".join(_LATEX_SPECIAL.get(c, c) for c in text)
    for symbol, latex in _LATEX_SYMBOLS.items():
        out = out.replace(symbol, latex)
    return out


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    caption: str,
    fmt: Literal["markdown", "latex"] = "markdown",
    notes: Sequence[str] = (),
    columns: str | None = None,
) -> str:
    """A table with a caption and notes below it.

    Markdown: bold caption, the first column left-aligned and the others right-aligned, notes
    after a blank line. LaTeX: the caption and the notes as ``%`` comments around a ``tabular``
    (column spec ``columns``, default ``l`` then ``c`` for each other column); header cells and the
    first cell of each row are escaped, the others are taken as LaTeX already.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "latex":
        lines = [
            f"% {caption}",
            r"\begin{tabular}{" + (columns or "l" + "c" * (len(header) - 1)) + "}",
            r"\hline",
            " & ".join(latex_escape(h) for h in header) + r" \\",
            r"\hline",
        ]
        lines += [" & ".join([latex_escape(r[0]), *r[1:]]) + r" \\" for r in rows]
        lines += [r"\hline", r"\end{tabular}"]
        lines += [f"% {n}" for n in notes]
        return "\n".join(lines)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    lines = [f"**{caption}**", "", line(header)]
    lines.append(
        "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    )
    lines += [line(r) for r in rows]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Saves a matplotlib figure as PNG through a temporary file (never half a file); returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path
