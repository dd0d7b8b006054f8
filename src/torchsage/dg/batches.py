"""Minibatch streams of the domain-generalization runs: random batches with replacement, forever.

:func:`infinite_batches` draws from one environment (the algorithms' one batch per training
environment); :func:`merged_batches` draws from the union of the training environments and splits
each batch by environment (a merged batch, as the SAGE authors' DG code draws it). Under
``torchrun`` every process draws the same batches and keeps its slice of each.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    Subset,
    TensorDataset,
)

from torchsage.harness.session import shard_batch

__all__ = ["count_batches", "infinite_batches", "merged_batches", "to_device"]


class _Slices:
    """The one-process index batches (``BatchSampler`` over ``sampler``), each cut to process
    ``rank``'s slice by :func:`~torchsage.harness.session.shard_batch` (the rule of both
    harnesses): the processes' slices make up the one-process batch."""

    def __init__(self, sampler: RandomSampler, batch_size: int, rank: int, world: int) -> None:
        self.batches = BatchSampler(sampler, batch_size, drop_last=True)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield shard_batch(torch.tensor(batch), self.rank, self.world).tolist()


def infinite_batches(
    data: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> Iterator[tuple]:
    """Random minibatches with replacement, forever (tensor data sets are indexed directly);
    with ``world`` processes (a divisor of ``batch_size``), this process's slice of each.

    Example:
        >>> data = Subset(TensorDataset(torch.arange(10.0), torch.arange(10)), range(10))
        >>> x, y = next(infinite_batches(data, 4, seed=0, num_workers=0))
        >>> x.shape, bool((x == y).all())
        (torch.Size([4]), True)
    """
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {world} processes")
    gen = torch.Generator().manual_seed(seed)
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset):
        indices = torch.as_tensor(data.indices)
        tensors = data.dataset.tensors
        while True:
            pick = indices[torch.randint(0, len(indices), (batch_size,), generator=gen)]
            pick = shard_batch(pick, rank, world)
            yield tuple(t[pick] for t in tensors)
    sampler = RandomSampler(data, replacement=True, num_samples=10**9, generator=gen)
    options = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": num_workers > 0}
    if world > 1:
        sliced = _Slices(sampler, batch_size, rank, world)
        yield from DataLoader(data, batch_sampler=sliced, **options)  # type: ignore[arg-type]
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True, **options)
    yield from loader


class _Tagged(Dataset):
    """The union of ``sets``, every example followed by the index of its set."""

    def __init__(self, sets: list[Dataset]) -> None:
        self.union = ConcatDataset(sets)

    def __len__(self) -> int:
        return len(self.union)

    def __getitem__(self, i: int) -> tuple:
        return (*self.union[i], bisect.bisect_right(self.union.cumulative_sizes, i))


def merged_batches(
    sets: list[Dataset], batch_size: int, seed: int, num_workers: int, pin_memory: bool = False
) -> Iterator[list[tuple]]:
    """Batches of ``batch_size`` drawn uniformly (with replacement) from the union of ``sets``, each
    split into one ``(x, y)`` per set (possibly empty), in the order drawn.

    Example:
        >>> sets = [Subset(TensorDataset(torch.full((n,), float(k)), torch.arange(n)), range(n)) for k, n in
        ...         enumerate((2, 6))]
        >>> parts = next(merged_batches(sets, 8, seed=0, num_workers=0))
        >>> [bool((x == k).all()) for k, (x, _) in enumerate(parts)], sum(len(y) for _, y in parts)
        ([True, True], 8)
    """
    gen = torch.Generator().manual_seed(seed)
    if all(isinstance(d, Subset) and isinstance(d.dataset, TensorDataset) for d in sets):
        x_all, y_all = (
            torch.cat([d.dataset.tensors[j][torch.as_tensor(d.indices)] for d in sets]) for j in (0, 1)
        )
        d_all = torch.cat([torch.full((len(d),), k) for k, d in enumerate(sets)])
        while True:
            pick = torch.randint(0, len(d_all), (batch_size,), generator=gen)
            x, y, tag = x_all[pick], y_all[pick], d_all[pick]
            yield [(x[tag == k], y[tag == k]) for k in range(len(sets))]
    tagged = _Tagged(sets)
    sampler = RandomSampler(tagged, replacement=True, num_samples=10**9, generator=gen)
    options = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": num_workers > 0}
    for x, y, tag in DataLoader(tagged, batch_size=batch_size, sampler=sampler, drop_last=True, **options):
        yield [(x[tag == k], y[tag == k]) for k in range(len(sets))]


def to_device(batch: tuple, device: torch.device) -> tuple:
    """The tensors of a batch on ``device`` (asynchronous copies from pinned memory)."""
    return tuple(t.to(device, non_blocking=True) for t in batch)


def count_batches(algorithm: Any, batches: Iterable[tuple], device: torch.device) -> tuple[int, int]:
    """(correct, total) of the predictions on ``batches``, counted on ``device``."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for x, y in batches:
        x, y = to_device((x, y), device)
        correct += (algorithm.predict(x).argmax(1) == y).sum()
        total += len(y)
    return int(correct.item()), total  # one synchronisation per split
