"""The data-parallel session of a training run under ``torchrun`` and the slicing of its batches.

Both harnesses train the same way under ``torchrun`` (``WORLD_SIZE`` > 1): every process reads the
same batches and keeps its slice of each (:func:`shard_batch`), the optimizer averages the
gradients, and rank 0 writes. :func:`torchrun_session` (from :mod:`torchsage.optim`) joins the
gloo group, yields its communicator (``None`` in a plain run) and tears it down.

Example:
    >>> import torch
    >>> [shard_batch(torch.arange(5), r, 2).tolist() for r in range(2)]
    [[0, 1, 2], [3, 4]]
"""

from __future__ import annotations

from typing import Any

from torchsage.optim import torchrun_session

__all__ = ["shard_batch", "torchrun_session"]


def shard_batch(x: Any, rank: int, world: int) -> Any:
    """Process ``rank``'s part of a batch (a tensor, a dict or a list/tuple of them) among
    ``world`` processes, split along the first dimension as evenly as possible (the first
    ``len % world`` parts one longer): the parts in rank order make up the batch."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.tensor_split(world)[rank]
    if isinstance(x, dict):
        return {k: shard_batch(v, rank, world) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return type(x)(shard_batch(v, rank, world) for v in x)
    return x
