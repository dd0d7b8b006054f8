"""Helpers for FSDP2 (``fully_shard``, DTensor) parameters: their local shards, and sums of
squares over every shard (see :mod:`torchsage.optim._sharded` for how the step uses them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from torchsage.disagreement import GradientStatistics, sum_of_squares

__all__ = [
    "ShardSums",
    "as_sharded",
    "check_sharded",
    "is_sharded",
    "local_shards",
    "shard_group",
    "sharded_statistics",
]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 ``fully_shard`` parameter or its gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def check_sharded(params: Sequence[Tensor], owner: str, reason: str | None) -> bool:
    """True when the parameters are FSDP2 shards (DTensors); with a ``reason`` why ``owner`` cannot
    step them, a ValueError that says so and names what to use instead."""
    if not any(is_sharded(p) for p in params):
        return False
    if reason is not None:
        raise ValueError(
            f"{owner} does not take FSDP2 (fully_shard, DTensor) parameters with these options: "
            f"{reason}; or use {owner} on a DistributedDataParallel model (model=ddp) with "
            "torchsage.MicroBatches to bound the memory"
        )
    return True


def local_shards(tensors: Sequence[Any]) -> list[Any]:
    """The local shards of DTensors (sharing their storage); other tensors and None as they are."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def as_sharded(local: Tensor, like: Any) -> Any:
    """``local`` (this process's rows) as a DTensor laid out like the DTensor ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def shard_group(params: Sequence[Tensor]) -> Any:
    """The process group of the parameters' 1-D mesh; ValueError for other layouts (HSDP meshes,
    parameters sharded on other dimensions or replicated)."""
    from torch.distributed.tensor import Shard

    meshes: list[Any] = []
    for p in params:
        if hasattr(p, "device_mesh") and not any(p.device_mesh == m for m in meshes):
            meshes.append(p.device_mesh)
    if len(meshes) != 1:
        raise ValueError(f"sharded parameters on {len(meshes)} device meshes: torchsage takes one 1-D mesh")
    (mesh,) = meshes
    if mesh.ndim != 1:
        raise ValueError(
            f"a {mesh.ndim}-D device mesh (HSDP): torchsage takes FSDP2 on a 1-D mesh, or DDP across nodes"
        )
    for p in params:
        if hasattr(p, "placements") and tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"a parameter placed as {tuple(p.placements)}: torchsage takes Shard(0) (fully_shard)"
            )
    return mesh.get_group()


class ShardSums:
    """Sums of squares over every shard: the local float64 sum, all-reduced over ``group``."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        local = sum_of_squares(tensors) if len(tensors) else torch.zeros((), dtype=torch.float64)
        dist.all_reduce(local, group=self.group)
        return local


def sharded_statistics(stats: GradientStatistics, group: Any) -> GradientStatistics:
    """``stats`` (built on the local shards) made to sum its squared norms over every shard."""
    stats._sum_of_squares = ShardSums(group)  # type: ignore[method-assign]
    return stats
