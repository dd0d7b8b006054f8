"""The closure's side of a step: its losses named and checked; BatchNorm frozen around extra calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["Closure", "Losses", "frozen_bn_stats"]

Losses = Tensor | Sequence[Tensor] | Mapping[str, Tensor] | Iterable[Tensor]
Closure = Callable[[], Losses]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module | None) -> Iterator[None]:
    """Runs the body with the running statistics of every BatchNorm layer of ``model`` frozen.

    Normalisation still uses the batch statistics in training mode; only the running mean,
    running variance and batch counter are left unchanged. ``None`` does nothing.
    """
    layers = []
    if model is not None:
        layers = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def _is_scalar_loss(x: Any) -> bool:
    return isinstance(x, Tensor) and x.numel() == 1


def _named_losses(losses: Losses) -> tuple[list[str] | None, Iterable[Tensor], bool]:
    """(names or None, losses, lazy). Lazy iterables are consumed one loss at a time."""
    if isinstance(losses, Tensor):
        if losses.numel() != 1:
            raise ValueError(
                "the closure returned a tensor of shape "
                f"{tuple(losses.shape)}: return one scalar loss per distribution as a list"
            )
        return ["0"], [losses], False
    if isinstance(losses, Mapping):
        return [str(k) for k in losses], list(losses.values()), False
    if isinstance(losses, (list, tuple)):
        return [str(k) for k in range(len(losses))], list(losses), False
    if isinstance(losses, Iterable):
        return None, losses, True
    raise ValueError(
        f"the closure must return a scalar loss, a list or dict of scalar losses, or an iterator "
        f"of them; got {type(losses).__name__}"
    )


def _check_loss(loss: Any, name: str) -> Tensor:
    if not _is_scalar_loss(loss):
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss of distribution {name} must be a scalar tensor, got {shape}")
    if not loss.requires_grad:
        raise ValueError(
            f"the loss of distribution {name} does not require grad: compute it inside the closure"
        )
    return loss.reshape(())


def _checked_losses(losses: Losses) -> tuple[list[str], list[Tensor]]:
    """All the closure's losses at once (an iterator is drained), named and checked."""
    names, values, _ = _named_losses(losses)
    items = list(values)
    names = names or [str(k) for k in range(len(items))]
    checked = [_check_loss(x, n) for x, n in zip(items, names)]
    if not checked:
        raise ValueError("the closure returned no loss")
    return names, checked
