"""Names in the registries (data sets, algorithms, benchmarks, solvers) are matched without regard
to case and punctuation, so the spellings of the docs and papers work on the command line:
``rotateddigits`` and ``RotatedDigits``, ``IMTL-G`` and ``imtlg``, ``SAGECurvatureOnly`` and
``SAGE_CurvatureOnly``.

Example:
    >>> resolve("Nash-MTL", ["upgrad", "nashmtl"], "solver")
    'nashmtl'
    >>> resolve("sagecurvatureonly", ["SAGE", "SAGE_CurvatureOnly"], "algorithm")
    'SAGE_CurvatureOnly'
    >>> resolve("MNIST", ["RotatedDigits"], "dataset")
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset 'MNIST': use one of RotatedDigits
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["normalize", "resolve"]


def normalize(name: str) -> str:
    """Lower case without anything but letters and digits: ``"IMTL-G"`` -> ``"imtlg"``."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def resolve(name: str, known: Iterable[str], what: str) -> str:
    """The registered spelling of ``name`` among ``known``; ``ValueError`` listing them otherwise."""
    known = list(known)
    if name in known:
        return name
    matches = [k for k in known if normalize(k) == normalize(name)]
    if len(matches) != 1:
        raise ValueError(f"unknown {what} {name!r}: use one of {', '.join(known)}")
    return matches[0]
