"""Gradient accumulation: one step's batch given in micro-batches (:class:`MicroBatches`).

A step's closure usually returns the losses of whole batches. When a batch does not fit in
memory, ``optimizer.step(MicroBatches([closure_1, ..., closure_M], sizes))`` gives it in ``M``
micro-batches instead: closure ``m`` returns the per-distribution losses of micro-batch ``m``. The
passes call the closures one after the other and differentiate each micro-batch's losses before
calling the next, so only one micro-batch's graph is alive at a time, and they accumulate the
gradients so that every quantity of the step is the whole batch's: with ``s_km`` the number of
samples of distribution ``k`` in micro-batch ``m`` and ``S_k = sum_m s_km``, distribution ``k``'s
loss is ``L_k = sum_m (s_km / S_k) L_km`` (the mean over its whole batch when each ``L_km`` is a
mean over its micro-batch), and its gradient ``g_k`` is the gradient of that. The disagreement, the
ascent and the descent are then those of the whole batches, never of one micro-batch.

The clean pass of an optimizer that needs per-distribution statistics (SAGE) keeps one
accumulated gradient per distribution until the last micro-batch (``K`` gradient-sized buffers);
the mean passes (SAM's clean pass, every perturbed pass) accumulate in ``p.grad`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MicroBatches", "accumulate_mean", "accumulate_per_distribution"]


def _as_sizes(entry: Any, m: int) -> dict[str, float]:
    if isinstance(entry, Mapping):
        items = [(str(k), v) for k, v in entry.items()]
    elif isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
        items = [(str(k), v) for k, v in enumerate(entry)]
    else:
        raise ValueError(
            f"sizes[{m}] must be a dict name -> sample count or a list of counts, got {type(entry).__name__}"
        )
    out = {}
    for name, value in items:
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"sizes[{m}][{name!r}] must be a finite count >= 0, got {value}")
        if value > 0:  # a distribution with no sample in this micro-batch has no loss in it
            out[name] = value
    return out


class MicroBatches:
    """A step's batch in micro-batches: pass it to ``optimizer.step`` in place of a closure.

    Args:
        closures: one closure per micro-batch; closure ``m`` runs the forward pass of micro-batch
            ``m`` and returns its per-distribution losses, as a step's closure does (a list, a dict
            name -> loss, or one scalar). A list's losses are named ``"0"``, ``"1"``, ...
        sizes: how many samples each micro-batch holds of each distribution, one entry per
            micro-batch: a dict name -> count, or a list of counts in the closure's order. A
            distribution with count 0 (or left out of a dict) must be left out of that
            micro-batch's losses (``torchsage.group_losses`` does so for groups absent from a
            batch). ``None``: every micro-batch holds an equal share of every distribution, and
            every closure returns every distribution.

    A distribution's loss for the step is the ``sizes``-weighted mean of its micro-batch losses,
    so with per-micro-batch mean losses the step equals the step on the whole batch (see
    :mod:`torchsage.optim._micro`). Not with a multi-task ``solver`` (its Jacobian is taken on
    whole batches).

    Example:
        >>> import torch, torchsage
        >>> import torch.nn.functional as F
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(4, 2)
        >>> domains = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
        >>> def micro(m):  # the m-th half of every domain's batch
        ...     rows = slice(4 * m, 4 * m + 4)
        ...     return lambda: [F.cross_entropy(model(x[rows]), y[rows]) for x, y in domains]
        >>> opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, seed=0)
        >>> info = opt.step(torchsage.MicroBatches([micro(0), micro(1)]))
        >>> info.names, len(info.losses)
        (('0', '1'), 2)
    """

    def __init__(
        self,
        closures: Iterable[Callable[[], Any]],
        sizes: Sequence[Mapping[Any, float] | Sequence[float]] | None = None,
    ) -> None:
        self.closures = list(closures)
        if not self.closures:
            raise ValueError("MicroBatches needs at least one closure (one per micro-batch)")
        for m, c in enumerate(self.closures):
            if not callable(c):
                raise ValueError(f"MicroBatches closure {m} is not callable: got {type(c).__name__}")
        if sizes is not None:
            sizes = list(sizes)
            if len(sizes) != len(self.closures):
                raise ValueError(
                    f"got {len(self.closures)} closures but {len(sizes)} sizes: give one entry of "
                    "sample counts per micro-batch"
                )
            self.sizes: list[dict[str, float]] | None = [_as_sizes(s, m) for m, s in enumerate(sizes)]
            if not any(self.sizes):
                raise ValueError("MicroBatches sizes are all zero: no micro-batch holds a sample")
        else:
            self.sizes = None

    def __len__(self) -> int:
        return len(self.closures)

    def __call__(self) -> Any:
        raise ValueError(
            "MicroBatches is not a closure to call: pass it to optimizer.step(...) (or "
            "torchsage.amp.scaled_step), which calls its micro-batches' closures one at a time"
        )

    @property
    def names(self) -> list[str] | None:
        """The distributions in the step's order (first appearance in ``sizes``); None without sizes."""
        if self.sizes is None:
            return None
        return list(dict.fromkeys(name for s in self.sizes for name in s))

    def totals(self) -> dict[str, float] | None:
        """Each distribution's sample count over all micro-batches (``S_k``); None without sizes."""
        if self.sizes is None:
            return None
        out: dict[str, float] = {}
        for s in self.sizes:
            for name, value in s.items():
                out[name] = out.get(name, 0.0) + value
        return out

    def map(self, fn: Callable[[Any], Any]) -> MicroBatches:
        """The same micro-batches with ``fn`` applied to each closure's return value (loss scaling)."""
        mapped = MicroBatches([lambda c=c: fn(c()) for c in self.closures])
        mapped.sizes = self.sizes
        return mapped


def _named(losses: Any, m: int, check: Callable[[Any, str], Tensor]) -> dict[str, Tensor]:
    """Closure ``m``'s losses as a dict name -> checked scalar loss."""
    if isinstance(losses, Tensor):
        return {"0": check(losses, "0")}
    if isinstance(losses, Mapping):
        return {str(k): check(v, str(k)) for k, v in losses.items()}
    if isinstance(losses, Iterable):
        return {str(k): check(v, str(k)) for k, v in enumerate(losses)}
    raise ValueError(
        f"micro-batch {m}'s closure must return a scalar loss or a list or dict of them, "
        f"got {type(losses).__name__}"
    )


class _Plan:
    """The distributions and the coefficients ``s_km / S_k`` of one pass over the micro-batches."""

    def __init__(self, batches: MicroBatches) -> None:
        self.batches = batches
        self.names = batches.names
        self.totals = batches.totals()

    def check(self, m: int, losses: dict[str, Tensor]) -> None:
        if self.batches.sizes is None:
            if self.names is None:  # the first micro-batch fixes the distributions
                self.names = list(losses)
                self.totals = dict.fromkeys(self.names, float(len(self.batches)))
            elif list(losses) != self.names:
                raise ValueError(
                    f"micro-batch {m} returned losses {list(losses)} but micro-batch 0 returned "
                    f"{self.names}: without sizes= every micro-batch must return every distribution; "
                    "pass MicroBatches(closures, sizes=...) with each micro-batch's sample counts"
                )
            return
        expected = list(self.batches.sizes[m])
        if sorted(losses) != sorted(expected):
            raise ValueError(
                f"micro-batch {m} returned losses {list(losses)} but sizes[{m}] counts samples of "
                f"{expected}: a micro-batch returns exactly the distributions it has samples of"
            )

    def share(self, m: int, name: str) -> float:
        """``s_km / S_k``: micro-batch ``m``'s share of distribution ``name``'s whole batch."""
        sizes = self.batches.sizes
        count = 1.0 if sizes is None else sizes[m][name]
        return count / self.totals[name]  # type: ignore[index]


def _call(call: Callable[[Callable[[], Any]], Any], closure: Callable[[], Any], params: list[Tensor]) -> Any:
    """Calls one micro-batch's closure with the gradients set aside, so ``call`` can check that the
    closure did not run backward itself."""
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        return call(closure)
    finally:
        for p, g in zip(params, held):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g


def accumulate_mean(
    batches: MicroBatches,
    params: list[Tensor],
    weights: list[float] | None,
    call: Callable[[Callable[[], Any]], Any],
    check: Callable[[Any, str], Tensor],
) -> tuple[list[str], Tensor]:
    """Leaves the gradient of ``sum_k w_k L_k`` (``w_k = 1 / K`` without weights) in ``p.grad``,
    one backward per micro-batch; returns the distributions' names and whole-batch losses."""
    plan = _Plan(batches)
    values: dict[str, Tensor] = {}
    for m, closure in enumerate(batches.closures):
        losses = _named(_call(call, closure, params), m, check)
        plan.check(m, losses)
        names = plan.names
        if weights is not None and len(weights) != len(names):  # type: ignore[arg-type]
            raise ValueError(
                f"got {len(weights)} weights but the micro-batches hold {len(names)} distributions "  # type: ignore[arg-type]
                "(their sizes name them): pass one weight per distribution"
            )
        position = {name: i for i, name in enumerate(names)}  # type: ignore[arg-type]
        total = None
        for name, loss in losses.items():
            share = plan.share(m, name)
            w = 1.0 / len(position) if weights is None else weights[position[name]]
            term = loss * (w * share)
            total = term if total is None else total + term
            values[name] = values.get(name, 0.0) + loss.detach() * share
        total.backward()  # type: ignore[union-attr]  # this micro-batch's graph is freed here
        del losses, total, term, loss
    names = plan.names
    return names, torch.stack([values[n] for n in names])  # type: ignore[union-attr]


def accumulate_per_distribution(
    batches: MicroBatches,
    params: list[Tensor],
    call: Callable[[Callable[[], Any]], Any],
    check: Callable[[Any, str], Tensor],
) -> tuple[list[str], dict[str, Tensor], dict[str, list[Tensor | None]]]:
    """Each distribution's whole-batch gradient ``g_k``, accumulated over the micro-batches (one
    buffer per distribution); returns the names, the whole-batch losses and the gradients."""
    plan = _Plan(batches)
    values: dict[str, Tensor] = {}
    grads: dict[str, list[Tensor | None]] = {}
    for m, closure in enumerate(batches.closures):
        for p in params:
            p.grad = None
        losses = _named(_call(call, closure, params), m, check)
        plan.check(m, losses)
        items = list(losses.items())
        for j, (name, loss) in enumerate(items):
            share = plan.share(m, name)
            # the losses of a micro-batch may share its forward graph: kept until the last one
            (loss * share).backward(retain_graph=j < len(items) - 1)
            values[name] = values.get(name, 0.0) + loss.detach() * share
            held = grads.setdefault(name, [None] * len(params))
            for i, p in enumerate(params):
                if p.grad is not None:
                    held[i] = p.grad if held[i] is None else held[i].add_(p.grad)
                    p.grad = None
        # a graph kept for a later loss lives as long as its loss: dropped before the next forward
        del losses, items, loss
    return plan.names, values, grads  # type: ignore[return-value]
