"""Small helpers that make the figures and reports readable: distinct colour and marker pairs for
many series, and counts written as a reader says them. Shared by :mod:`torchsage.dg.figure` and
:mod:`torchsage.mtl.report`."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["count", "seeds_phrase", "series_styles"]

# Colour-blind-friendlier than matplotlib's default cycle and 12 long (tab10 repeats after 10):
# Paul Tol's "muted" scheme plus black and two greys.
_COLOURS = (
    "#332288",
    "#88CCEE",
    "#44AA99",
    "#117733",
    "#999933",
    "#DDCC77",
    "#CC6677",
    "#882255",
    "#AA4499",
    "#000000",
    "#777777",
    "#BBBBBB",
)
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")


def series_styles(n: int) -> list[tuple[str, str]]:
    """``n`` (colour, marker) pairs, no two alike: colours and markers both differ up to 12
    series, and past that the pair still does (the markers shift by one for each round of colours).

    Example:
        >>> styles = series_styles(14)
        >>> len(set(styles)), styles[0], styles[12]
        (14, ('#332288', 'o'), ('#332288', 's'))
    """
    return [
        (_COLOURS[k % len(_COLOURS)], _MARKERS[(k + k // len(_COLOURS)) % len(_MARKERS)]) for k in range(n)
    ]


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 trial"``, ``"3 trials"``.

    Example:
        >>> count(1, "trial"), count(3, "trial"), count(0, "run")
        ('1 trial', '3 trials', '0 runs')
    """
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def seeds_phrase(seeds: Sequence[int]) -> str:
    """``"seed 0"``, ``"seeds 0, 1, 2"``.

    Example:
        >>> seeds_phrase([0]), seeds_phrase([0, 1, 2])
        ('seed 0', 'seeds 0, 1, 2')
    """
    return f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"
