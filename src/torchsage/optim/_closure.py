"""The closure protocols of a step: each calls the closure once and returns one :class:`Pass`.

* :meth:`Passes.mean`: the gradient of the (weighted) mean loss, left in ``p.grad``;
* :meth:`Passes.streamed`: each distribution's loss differentiated on its own and its gradient
  folded into :class:`~torchsage.disagreement.GradientStatistics`, so memory does not grow with
  the number of distributions; the mean gradient is left in ``p.grad``;
* :meth:`Passes.tasks`: multi-task learning: the Jacobian of the task losses on the shared
  parameters and each head's own gradient (a :class:`~torchsage.optim._solver.TaskPass`);
* any of them on :class:`~torchsage.optim._micro.MicroBatches`: the closures of a batch's
  micro-batches, called one at a time, their gradients accumulated into the whole batch's;
* :meth:`Passes.problem`: the non-finite search: the first non-finite loss or gradient of a pass,
  named by its distribution (one more pass when only the mean gradient shows it).

Under data parallelism each pass also reduces what it computed over the processes (see
:mod:`torchsage.optim._distributed`). Below them: the closure's losses named and checked, and
BatchNorm frozen around extra calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torchsage.disagreement import GradientStatistics, global_norm
from torchsage.optim import _checks
from torchsage.optim._distributed import DataParallel, LocalStream
from torchsage.optim._micro import MicroBatches, accumulate_mean, accumulate_per_distribution
from torchsage.optim._shards import ShardSums, as_sharded, local_shards, sharded_statistics
from torchsage.optim._solver import TaskPass, task_pass
from torchsage.optim._weights import check_count

__all__ = ["Closure", "Losses", "Pass", "Passes", "frozen_bn_stats"]

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


@dataclass
class Pass:
    """What one evaluation of the closure gave the step.

    Attributes:
        names: the distributions' names, in the closure's order.
        losses: their detached losses, shape ``(K,)`` (averaged over the processes when shared).
        stats: the per-distribution gradient statistics (streamed and task passes that kept them).
        norms: each distribution's gradient norm, shape ``(K,)``, when ``stats`` were kept.
        tasks: the task Jacobian and heads' gradients (task passes).
    """

    names: list[str]
    losses: Tensor
    stats: GradientStatistics | None = None
    norms: Tensor | None = None
    tasks: TaskPass | None = None


class Passes:
    """Runs the closure for an optimizer: the passes of a step and the non-finite search.

    Args:
        owner: the optimizer's class name, for messages.
        parallel: the data-parallel communication, or None.
        model: the model whose BatchNorm statistics extra passes leave alone, or None.
        statistics: builds the statistics a streamed or task pass fills, from the tensors that
            give their layout.
        scope: with tasks, the parameters the statistics cover: ``"shared"`` or ``"all"``.
    """

    def __init__(
        self,
        owner: str,
        parallel: DataParallel | None,
        model: nn.Module | None,
        statistics: Callable[[list[Tensor]], GradientStatistics],
        scope: str,
    ) -> None:
        self.owner = owner
        self.parallel = parallel
        self.model = model
        self.statistics = statistics
        self.scope = scope
        #: FSDP2: the process group of the parameters' mesh (None: parameters are whole tensors)
        self.shard_group: Any = None

    @property
    def sharded(self) -> bool:
        """The parameters are FSDP2 shards: a search pass would run collectives on some processes
        only, and sums over coordinates are summed over the shards."""
        return self.shard_group is not None

    def shard(self, group: Any) -> None:
        """Works on FSDP2 shards of the parameters, over the mesh's process ``group``."""
        self.shard_group = group

    def inner(self, x: list[Tensor], y: list[Tensor]) -> Tensor:
        """The inner product of two gradients given as lists of tensors (over every shard when
        sharded, in float64 there)."""
        if not self.sharded:
            return sum(torch.sum(a * b) for a, b in zip(x, y))  # type: ignore[return-value]
        local = [torch.sum(a * b, dtype=torch.float64) for a, b in zip(local_shards(x), local_shards(y))]
        total = torch.stack(local).sum() if local else torch.zeros((), dtype=torch.float64)
        torch.distributed.all_reduce(total, group=self.shard_group)
        return total

    def norm(self, tensors: list[Tensor]) -> Tensor:
        """The L2 norm of the concatenation of ``tensors`` (over every shard when sharded)."""
        if not self.sharded:
            return global_norm(tensors)
        return ShardSums(self.shard_group)(local_shards(tensors)).sqrt()

    def communication(self, clean: bool) -> contextlib.AbstractContextManager[Any]:
        """Data-parallel: the context of a clean or perturbed pass (DDP's no_sync and so on)."""
        if self.parallel is None:
            return contextlib.nullcontext()
        return self.parallel.clean_pass() if clean else self.parallel.perturbed_pass()

    def _call(self, closure: Closure, params: list[Tensor]) -> Losses:
        """Calls the closure (gradients cleared before); refuses one that ran backward itself."""
        losses = closure()
        if _checks.gradients_left_by_closure(params):
            raise ValueError(_checks.closure_backward_message(self.owner))
        return losses

    @staticmethod
    def _check_reached(params: list[Tensor], which: str) -> None:
        """A loss that reaches no parameter would make the step a silent no-op."""
        if not _checks.gradients_left_by_closure(params):
            raise _checks.unreached_error(which)

    def _share_mean(self, params: list[Tensor], losses: Tensor) -> Tensor:
        """Data-parallel: averages the mean gradient over the processes; the losses to report."""
        if self.sharded:
            return self._mean_over_shards(losses)
        return losses if self.parallel is None else self.parallel.mean_gradient(params, losses)

    def _mean_over_shards(self, losses: Tensor) -> Tensor:
        """FSDP2 (each process holds a shard of every batch): the losses of the whole batches."""
        total = losses.detach().to(torch.float64).clone()
        torch.distributed.all_reduce(total, group=self.shard_group)
        return (total / torch.distributed.get_world_size(self.shard_group)).to(losses.dtype)

    def mean(self, closure: Closure, params: list[Tensor], weights: list[float] | None = None) -> Pass:
        """Evaluates the closure and leaves the gradient of the (weighted) mean loss in ``p.grad``."""
        for p in params:
            p.grad = None
        self._note_micro(closure)
        if isinstance(closure, MicroBatches):
            with torch.enable_grad():
                names, values = accumulate_mean(
                    closure, params, weights, lambda c: self._call(c, params), _check_loss
                )
            self._check_reached(params, "none of the closure's losses")
            return Pass(names, self._share_mean(params, values))
        with torch.enable_grad():
            names, losses, lazy = _named_losses(self._call(closure, params))
            if not lazy:
                checked = [_check_loss(x, n) for x, n in zip(losses, names)]
                if not checked:
                    raise ValueError("the closure returned no loss")
                stacked = torch.stack(checked)
                if weights is None:
                    stacked.mean().backward()
                else:
                    check_count(weights, len(checked))
                    (stacked * stacked.new_tensor(weights)).sum().backward()
                self._check_reached(params, "none of the closure's losses")
                return Pass(names, self._share_mean(params, torch.stack([x.detach() for x in checked])))
            values = []
            for k, loss in enumerate(losses):  # one graph alive at a time; divide by K below
                loss = _check_loss(loss, str(k))
                if weights is None:
                    loss.backward()
                else:
                    check_count(weights, k + 1, partial=True)
                    (loss * weights[k]).backward()
                values.append(loss.detach())
        if not values:
            raise ValueError("the closure returned no loss")
        self._check_reached(params, "none of the closure's losses")
        present = [p.grad for p in params if p.grad is not None]
        if weights is not None:
            check_count(weights, len(values))
        elif present:
            torch._foreach_div_(present, float(len(values)))
        return Pass([str(k) for k in range(len(values))], self._share_mean(params, torch.stack(values)))

    def streamed(self, closure: Closure, params: list[Tensor], weights: list[float] | None = None) -> Pass:
        """Differentiates each distribution's loss on its own and streams its gradient.

        Each gradient is folded into the running statistics and dropped, so memory does not grow
        with the number of distributions; the mean gradient ends up in ``p.grad``. The pass keeps
        the statistics and the per-distribution gradient norms.
        """
        for p in params:
            p.grad = None
        if self.sharded:  # the statistics of this process's rows, their sums over every shard
            stats = sharded_statistics(self.statistics(local_shards(params)), self.shard_group)
            stats.params = params  # the ascent finds a parameter's statistics by the parameter
        else:
            stats = self.statistics(params)
        values, seen = [], [False] * len(params)
        self._note_micro(closure)
        with torch.enable_grad():
            if isinstance(closure, MicroBatches):
                names, count, items = self._micro_items(closure, params)
            else:
                names, losses, lazy = _named_losses(self._call(closure, params))
                count = None if lazy else len(losses)  # type: ignore[arg-type]
                items = self._loss_items(names, losses, count, params)
            stream = LocalStream(stats) if self.parallel is None else self.parallel.stream(stats, count)
            for k, (name, value, grads) in enumerate(items):
                if weights is not None:
                    check_count(weights, count if count is not None else k + 1, partial=count is None)
                values.append(value)
                if not any(g is not None for g in grads):
                    raise _checks.unreached_error(f"the loss of distribution {name}")
                stream.add(local_shards(grads), 1.0 if weights is None else weights[k])
                for i, (p, g) in enumerate(zip(params, grads)):
                    seen[i] = seen[i] or g is not None
                    p.grad = None
        if not values:
            raise ValueError("the closure returned no loss")
        if weights is not None:
            check_count(weights, len(values))
        norms = stream.finish()
        reported = torch.stack(values)
        if self.sharded:
            reported = self._mean_over_shards(reported)
        if self.parallel is not None:
            reported, seen = self.parallel.finish_stream(stats, reported, seen)
        for p, m, used in zip(params, stats.mean, seen):
            if self.sharded and used:
                m = as_sharded(m, p)
            p.grad = m if used else None  # parameters no loss reached keep no gradient
        names = names or [str(k) for k in range(len(values))]
        return Pass(names, reported, stats, torch.stack(norms))

    def _note_micro(self, closure: Any) -> None:
        """Data-parallel: a micro-batched step reduces its passes itself (see ``perturbed_pass``)."""
        if self.parallel is not None:
            self.parallel.micro = isinstance(closure, MicroBatches)

    @staticmethod
    def _loss_items(
        names: list[str] | None, losses: Iterable[Tensor], count: int | None, params: list[Tensor]
    ) -> Iterator[tuple[str, Tensor, list[Tensor | None]]]:
        """(name, loss, gradient) of each distribution, one backward per loss as it is asked for."""
        for k, loss in enumerate(losses):
            name = names[k] if names else str(k)
            loss = _check_loss(loss, name)
            # A list may share one forward graph across distributions: keep it until the last.
            loss.backward(retain_graph=count is not None and k < count - 1)
            yield name, loss.detach(), [p.grad for p in params]

    def _micro_items(
        self, batches: MicroBatches, params: list[Tensor]
    ) -> tuple[list[str], int, Iterator[tuple[str, Tensor, list[Tensor | None]]]]:
        """Every distribution's whole-batch gradient, accumulated over the micro-batches first."""
        names, values, grads = accumulate_per_distribution(
            batches, params, lambda c: self._call(c, params), _check_loss
        )

        def items() -> Iterator[tuple[str, Tensor, list[Tensor | None]]]:
            for name in names:
                yield name, values[name], grads.pop(name)  # each buffer freed once streamed

        return names, len(names), items()

    def tasks(self, closure: Closure, params: list[Tensor], statistics: bool, mean: bool = True) -> Pass:
        """Multi-task pass: the task losses' Jacobian on the shared parameters, each head's own
        gradient, the statistics of the tasks' gradients (when asked; on the parameters
        ``scope`` says) and, with ``mean``, the mean gradient in ``p.grad``."""
        if isinstance(closure, MicroBatches):
            raise ValueError(
                f"{self.owner} with a solver takes whole batches, not MicroBatches (the solver needs "
                "the task Jacobian of the whole batch): use a smaller batch, or solver=None"
            )
        for p in params:
            p.grad = None
        with torch.enable_grad():
            names, checked = _checked_losses(self._call(closure, params))
            tp = task_pass(names, checked, params)
        if not tp.shared and not tp.owned:
            raise _checks.unreached_error("none of the closure's losses")
        if self.parallel is not None:
            self.parallel.reduce_task_pass(tp)
        stats, norms = None, None
        if statistics and self.scope == "all" and (tp.shared or tp.owned):
            # every parameter: a task's row is zero on the other tasks' heads
            stats = self.statistics([*tp.shared, *(p for p, _, _ in tp.owned)])
            norms = torch.stack(
                [
                    stats.update([*tp.rows(k), *(g if j == k else None for _, j, g in tp.owned)])
                    for k in range(len(checked))
                ]
            )
        elif statistics and tp.shared:
            stats = self.statistics(tp.shared)
            norms = torch.stack([stats.update(tp.rows(k)) for k in range(len(checked))])
        if mean:
            T = len(checked)
            for p, j in zip(tp.shared, tp.jacobian):
                p.grad = j.mean(0)
            for p, _, g in tp.owned:
                p.grad = g / T
        return Pass(names, tp.losses, stats, norms, tp)

    # -- the non-finite search ---------------------------------------------------------------

    def locate_nonfinite(self, closure: Closure, params: list[Tensor]) -> str | None:
        """Which distribution has a non-finite gradient at the current weights (failure path).

        This extra pass leaves BatchNorm running statistics alone when ``model`` is known."""
        local = contextlib.nullcontext() if self.parallel is None else self.parallel.no_sync()
        with torch.enable_grad(), frozen_bn_stats(self.model), local:
            if isinstance(closure, MicroBatches):
                names, _, grads = accumulate_per_distribution(closure, params, lambda c: c(), _check_loss)
                for name in names:
                    present = [g for g in grads[name] if g is not None]
                    if present and not all(torch.isfinite(n) for n in torch._foreach_norm(present)):
                        return name
                return None
            names, items = _checked_losses(closure())
            for k, (name, loss) in enumerate(zip(names, items)):
                for p in params:
                    p.grad = None
                loss.backward(retain_graph=k < len(items) - 1)
                grads = [p.grad for p in params if p.grad is not None]
                if grads and not all(torch.isfinite(n) for n in torch._foreach_norm(grads)):
                    return name
        return None

    def problem(
        self, closure: Closure, params: list[Tensor], record: Pass, grad_norm: Tensor, where: str
    ) -> str | None:
        """Describes the first non-finite loss or gradient of ``record``, or returns None."""
        names, losses, norms = record.names, record.losses, record.norms
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            k = int(bad[0, 0])
            if norms is not None and torch.isnan(losses[k]) and norms[k] == 0:  # the mean of no sample
                return (
                    f"the loss of distribution {names[k]} is nan with a zero gradient {where}: it probably "
                    "had no sample in this batch; torchsage.group_losses leaves absent groups out"
                )
            return f"non-finite loss ({losses[k].item()}) in distribution {names[k]} {where}"
        if norms is not None:
            bad = (~torch.isfinite(norms)).nonzero()
            if len(bad):
                return f"non-finite gradient in distribution {names[int(bad[0, 0])]} {where}"
        if not torch.isfinite(grad_norm):
            if self.sharded:
                return f"non-finite gradient {where} (FSDP2: the distribution is not searched)"
            name = self.locate_nonfinite(closure, params)
            if name is None and self.parallel is not None:
                return f"non-finite gradient on another process {where}"
            return f"non-finite gradient in distribution {name} {where}"
        if self.parallel is not None and self.parallel.remote_problem:
            return f"non-finite loss on another process {where}"
        return None
