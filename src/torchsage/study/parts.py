"""Every part of the evidence study, both regimes: the from-scratch parts of
:mod:`torchsage.study.spec` and the pretrained-regime parts of :mod:`torchsage.study.pretrained`,
for the commands that run and budget them (``python -m torchsage.study run|plan``)."""

from __future__ import annotations

from pathlib import Path

from torchsage.harness.jobs import HashedJob
from torchsage.study.pretrained import PT_PARTS, pt_part_jobs
from torchsage.study.spec import PARTS, part_jobs

__all__ = ["ALL_PARTS", "all_part_jobs"]

#: the parts in the order the study ran them: the from-scratch study, then the pretrained regime
ALL_PARTS: tuple[str, ...] = (*PARTS, *PT_PARTS)


def all_part_jobs(root: str | Path, part: str) -> list[HashedJob]:
    """The runs of any part of :data:`ALL_PARTS`.

    Raises:
        ValueError: an unknown part (the message lists them).

    Example:
        >>> len(all_part_jobs("runs/study", "pt-symbola")) > 0
        True
    """
    jobs = pt_part_jobs(str(root), part)
    if jobs is not None:
        return jobs
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}: use one of {', '.join(ALL_PARTS)}")
    return part_jobs(root, part)
