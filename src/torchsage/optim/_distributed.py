"""Data-parallel sharpness-aware steps over a ``torch.distributed`` process group.

Every process runs the same optimizer on an identical replica of the model; the optimizer
averages every gradient it uses across the group, so the replicas take identical steps. Two
layouts say what each process holds (``N`` processes, rank ``r``):

* ``"shards"``: a shard of every distribution's minibatch (all ``K`` distributions on every
  process, equal shard sizes). Each distribution's gradient is averaged over the processes
  *before* it enters the statistics, so the disagreement, the ascent and the descent are those of
  the single-process run on the union of the shards. Several distributions' gradients are stacked
  into one collective (up to :data:`BUCKET_BYTES`); the traffic per clean pass is ``K`` gradients.
* ``"domains"``: whole distributions, ``K_r >= 1`` on process ``r``. Each process streams its
  own distributions' gradients into :class:`~torchsage.disagreement.GradientStatistics`; the
  statistics are then merged exactly (the parallel form of Welford's update):

  .. math::

      n = \\sum_r n_r,\\quad \\bar g = \\frac{1}{n}\\sum_r n_r \\bar g_r,\\quad
      M_2 = \\sum_r \\big(M_{2,r} + n_r \\lVert \\bar g_r - \\bar g \\rVert^2\\big),

  so the disagreement covers all ``K = sum_r K_r`` distributions and the traffic (two
  gradient-sized collectives) does not grow with ``K``.

Multi-task solvers (``solver=``) use the shards layout: the task Jacobian, the heads' gradients
and the task losses are averaged before the solver sees them.

What makes the replicas stay bit-identical: all-reduce leaves the same sum on every process, and
everything after it is deterministic local arithmetic on identical inputs; SAGE's noise comes from
one seed agreed at construction (rank 0's); the parameters (and, with ``model=``, the buffers)
start from rank 0's. Non-finite values agree too: a sum with a NaN or an infinity stays
non-finite, and a count of non-finite local losses travels with the losses, so every process
raises (or skips) together and none waits forever in a collective.

This module holds the communication only; :class:`torchsage.optim.SharpnessAware` calls it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchsage.disagreement import GradientStatistics

__all__ = [
    "BUCKET_BYTES",
    "LAYOUTS",
    "Communicator",
    "Control",
    "DataParallel",
    "FlatBuffers",
    "average_gradients",
    "check_counts",
    "control",
    "join_torchrun",
    "make_data_parallel",
    "merge_statistics",
    "reduce_task_pass",
]

LAYOUTS: tuple[str, ...] = ("shards", "domains")

#: Most bytes of per-distribution gradients stacked into one collective (shards layout).
BUCKET_BYTES: int = 32 * 2**20


class Communicator:
    """A process group with a record of what was all-reduced.

    Attributes:
        group: the process group (``None``: the default group).
        rank, world_size: this process's rank in the group and the group's size.
        calls: number of all-reduce calls so far.
        bytes_reduced: payload of those calls in bytes (what each process contributes; a ring
            all-reduce moves about ``2 (N - 1) / N`` times this over each link).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.calls = 0
        self.bytes_reduced = 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sums ``tensor`` in place over the group."""
        self.calls += 1
        self.bytes_reduced += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Overwrites ``tensor`` in place with rank 0's (rank 0 of the group)."""
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(tensor, src=source, group=self.group)
        return tensor


class FlatBuffers:
    """Packs a list of tensors into one contiguous ``(rows, n)`` buffer per (device, dtype).

    Row ``r`` holds one copy of the whole list, so ``rows`` copies (one per distribution) travel in
    one collective per buffer. :meth:`views` gives the tensors of a row back, in the original order.
    """

    def __init__(self, like: Sequence[Tensor], rows: int = 1) -> None:
        self.shapes = [t.shape for t in like]
        self.keys: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(like):
            self.keys.setdefault((t.device, t.dtype), []).append(i)
        self.buffers = {
            key: torch.zeros(rows, sum(like[i].numel() for i in idx), device=key[0], dtype=key[1])
            for key, idx in self.keys.items()
        }
        self.rows = rows

    @property
    def bytes_per_row(self) -> int:
        return sum(b.shape[1] * b.element_size() for b in self.buffers.values())

    def views(self, row: int = 0) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(self.shapes)
        for key, idx in self.keys.items():
            pieces = self.buffers[key][row].split([math.prod(self.shapes[i]) for i in idx])
            for i, piece in zip(idx, pieces):
                out[i] = piece.view(self.shapes[i])
        return out  # type: ignore[return-value]

    def write(self, tensors: Sequence[Tensor | None], row: int = 0) -> None:
        """Copies ``tensors`` into ``row``; ``None`` writes zeros."""
        targets = self.views(row)
        present = [(t, s) for t, s in zip(targets, tensors) if s is not None]
        missing = [t for t, s in zip(targets, tensors) if s is None]
        if present:
            torch._foreach_copy_([t for t, _ in present], [s for _, s in present])
        if missing:
            torch._foreach_zero_(missing)

    def all_reduce(self, comm: Communicator, rows: int | None = None) -> None:
        """Sums the first ``rows`` rows (all by default) over the group, one call per buffer."""
        for buffer in self.buffers.values():
            comm.all_reduce(buffer if rows is None or rows == self.rows else buffer[:rows])

    def scale(self, factor: float, rows: int | None = None) -> None:
        if factor != 1.0:
            for buffer in self.buffers.values():
                (buffer if rows is None else buffer[:rows]).mul_(factor)

    def divide(self, divisor: float, rows: int | None = None) -> None:
        if divisor != 1.0:
            for buffer in self.buffers.values():
                (buffer if rows is None else buffer[:rows]).div_(divisor)


@dataclass
class Control:
    """The small per-pass reduction: losses, counts, which parameters have a gradient, problems.

    Attributes:
        losses: shards: the losses averaged over processes (the union's); domains: the local ones.
        present: per parameter, whether any process has a gradient for it.
        count: total number of distributions (domains) or distributions per process (shards).
        equal_counts: every process holds the same number of distributions.
        remote_problem: some process found a non-finite local loss.
    """

    losses: Tensor
    present: list[bool]
    count: int
    equal_counts: bool
    remote_problem: bool


def _count_error(n: int, total: float, k: int) -> ValueError:
    return ValueError(
        "layout='shards' needs the same number of losses on every process (a shard of every "
        f"distribution); the {n} processes returned {total:.0f} in all, this one {k}: "
        "use layout='domains' when processes hold different distributions"
    )


def check_counts(comm: Communicator, k: int, device: torch.device) -> None:
    """Shards layout, before the first gradient collective: the same ``K`` on every process, or
    the same :class:`ValueError` on all of them (``N sum K_r^2 = (sum K_r)^2`` only when all
    ``K_r`` are equal); without it, collectives of different sizes would meet."""
    vec = comm.all_reduce(torch.tensor([k, k * k], dtype=torch.float64, device=device))
    total, squares = float(vec[0]), float(vec[1])
    if comm.world_size * squares != total * total:
        raise _count_error(comm.world_size, total, k)


def control(
    comm: Communicator, layout: str, losses: Tensor, present: Sequence[bool], reduce_losses: bool = True
) -> Control:
    """A float64 all-reduce of ``[K_r, K_r^2, non-finite count, present flags]`` (fixed size), then
    in the shards layout one of the losses (unless ``reduce_losses`` is False: the caller sends them
    with the gradients), after checking that every process has the same ``K`` (every process sees
    the same sums, so all raise the same :class:`ValueError` otherwise)."""
    k = int(losses.numel())
    bad = float((~torch.isfinite(losses)).sum())
    n = comm.world_size
    head = [k, k * k, bad, *(1.0 if x else 0.0 for x in present)]
    vec = comm.all_reduce(torch.tensor(head, dtype=torch.float64, device=losses.device))
    total, squares, bad_total = (float(v) for v in vec[:3])
    equal = n * squares == total * total
    flags = [f > 0 for f in vec[3:].tolist()]
    if layout == "domains":
        return Control(losses, flags, int(total), equal, bad_total > bad)
    if not equal:
        raise _count_error(n, total, k)
    if not reduce_losses:
        return Control(losses, flags, k, equal, bad_total > bad)
    summed = comm.all_reduce(losses.detach().to(torch.float64).clone())
    return Control((summed / n).to(losses.dtype), flags, k, equal, bad_total > bad)


def average_gradients(
    comm: Communicator,
    params: Sequence[Tensor],
    present: Sequence[bool],
    weight: float,
    total: float,
    extra: Sequence[Tensor] = (),
) -> list[Tensor]:
    """Replaces each ``p.grad`` by ``sum_r weight_r p.grad_r / total`` (one call per dtype).

    A parameter with a gradient on some process only (``present``) counts as zero elsewhere and
    gets a gradient everywhere; one with none anywhere keeps ``None``. The ``extra`` tensors (the
    losses) travel in the same collectives and come back reduced the same way.
    """
    used = [p for p, here in zip(params, present) if here]
    extra = [t.detach() for t in extra]
    if not used and not extra:
        return []
    flat = FlatBuffers([*(p.grad if p.grad is not None else p for p in used), *extra])
    flat.write([*(p.grad for p in used), *extra])
    flat.scale(weight)
    flat.all_reduce(comm)
    flat.divide(total)
    views = flat.views()
    for p, g in zip(used, views):
        p.grad = g
    return views[len(used) :]


class LocalStream:
    """Folds each distribution's gradients into the statistics as they come (one process, or the
    domains layout before :func:`merge_statistics`)."""

    def __init__(self, stats: GradientStatistics) -> None:
        self.stats = stats
        self.norms: list[Tensor] = []

    def add(self, grads: Sequence[Tensor | None], weight: float = 1.0) -> None:
        self.norms.append(self.stats.update(grads, inplace=True, weight=weight))

    def finish(self) -> list[Tensor]:
        return self.norms


class ShardStream(LocalStream):
    """Shards layout: averages each distribution's gradients over the processes before folding
    them into the statistics, stacking up to :data:`BUCKET_BYTES` of them per collective."""

    def __init__(
        self,
        comm: Communicator,
        stats: GradientStatistics,
        count: int | None,
        bucket_bytes: int | None = None,
    ) -> None:
        super().__init__(stats)
        self.comm = comm
        like = stats.mean
        row_bytes = max(1, sum(t.numel() * t.element_size() for t in like))
        rows = max(1, (BUCKET_BYTES if bucket_bytes is None else bucket_bytes) // row_bytes)
        # An iterator's length is unknown: a modest stack then, not a bucket sized for thousands.
        self.flat = FlatBuffers(like, min(rows, count if count else 16))
        if count and like:
            check_counts(comm, count, like[0].device)
        self.filled = 0
        self.weights: list[float] = []

    def add(self, grads: Sequence[Tensor | None], weight: float = 1.0) -> None:
        self.flat.write(grads, self.filled)
        self.weights.append(weight)
        self.filled += 1
        if self.filled == self.flat.rows:
            self._flush()

    def _flush(self) -> None:
        if not self.filled:
            return
        self.flat.all_reduce(self.comm, self.filled)
        self.flat.divide(float(self.comm.world_size), self.filled)
        for row in range(self.filled):
            self.norms.append(self.stats.update(self.flat.views(row), inplace=True, weight=self.weights[row]))
        self.filled = 0
        self.weights = []

    def finish(self) -> list[Tensor]:
        self._flush()
        return self.norms


def merge_statistics(comm: Communicator, stats: GradientStatistics, total: int) -> None:
    """Domains layout: merges every process's statistics in place into those of all ``total``
    distributions (see the module docstring); two or three collectives whatever ``K``."""

    def sum_over_processes(tensors: list[Tensor]) -> list[Tensor]:
        flat = FlatBuffers(tensors)  # one collective per (device, dtype)
        flat.write(tensors)
        flat.all_reduce(comm)
        return flat.views()

    stats.merge(sum_over_processes, total)


def reduce_task_pass(comm: Communicator, tp: Any) -> None:
    """Shards layout with a solver: averages the task Jacobian, the heads' gradients and the task
    losses over the processes in place (one call per dtype), before any solver sees them."""
    tensors = [*tp.jacobian, *(g for _, _, g in tp.owned), tp.losses]
    flat = FlatBuffers(tensors)
    flat.write(tensors)
    flat.all_reduce(comm)
    flat.divide(float(comm.world_size))
    views = flat.views()
    tp.jacobian = views[: len(tp.jacobian)]
    tp.owned = [(p, k, g) for (p, k, _), g in zip(tp.owned, views[len(tp.jacobian) : -1])]
    tp.losses = views[-1]


def _is_ddp(model: Any) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class DataParallel:
    """The optimizer's view of the process group: which layout, which model, and the passes.

    Built by :func:`make_data_parallel`; the optimizer calls :meth:`stream`, :meth:`finish_stream`,
    :meth:`mean_gradient` and :meth:`reduce_task_pass` in its passes, and runs the clean pass inside
    :meth:`clean_pass` and the perturbed one inside :meth:`perturbed_pass`.
    """

    def __init__(self, comm: Communicator, layout: str, model: nn.Module | None, solver: Any) -> None:
        self.comm = comm
        self.layout = layout
        self.model = model
        self.ddp = _is_ddp(model)
        self.solver = solver
        #: the current pass's gradients were already averaged by DistributedDataParallel
        self.synced = False
        #: every process held the same number of distributions at the last clean pass
        self.equal_counts = True
        #: some process found a non-finite loss in the last pass (this one may not have)
        self.remote_problem = False
        #: the current step's closure is a MicroBatches (several backward passes per pass)
        self.micro = False
        #: every parameter had a gradient on some process at the last clean pass
        self.all_present = True
        self._clean = False

    # -- construction ------------------------------------------------------------------------

    @torch.no_grad()
    def broadcast_state(self, params: Sequence[Tensor]) -> None:
        """Starts every replica from rank 0's parameters (and model buffers)."""
        tensors = list(params)
        if self.model is not None:
            tensors += [b for b in self.model.buffers() if b.is_floating_point() or b.dtype == torch.long]
        if not tensors:
            return
        flat = FlatBuffers(tensors)
        flat.write(tensors)
        for buffer in flat.buffers.values():
            self.comm.broadcast(buffer)
        torch._foreach_copy_(tensors, flat.views())

    def agree_seed(self, seed: int, device: torch.device) -> int:
        """Rank 0's seed, so SAGE's noise is drawn identically on every process (``device``: where
        the group's backend takes tensors, e.g. the parameters' device)."""
        value = torch.tensor([seed], dtype=torch.int64, device=device)
        return int(self.comm.broadcast(value).item())

    # -- passes ------------------------------------------------------------------------------

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return self.model.no_sync() if self.ddp else contextlib.nullcontext()  # type: ignore[union-attr]

    @contextlib.contextmanager
    def clean_pass(self) -> Iterator[None]:
        """The clean pass runs under ``no_sync`` (forward included): this module averages the
        per-distribution gradients itself. Afterwards the model's buffers (BatchNorm statistics,
        updated on this pass only) are set to rank 0's, as DistributedDataParallel does."""
        self.synced = False
        self._clean = True
        try:
            with self._no_sync():
                yield
        finally:
            self._clean = False
        if self.model is not None and not self.ddp:
            buffers = [b for b in self.model.buffers() if b.is_floating_point()]
            if buffers:
                with torch.no_grad():
                    flat = FlatBuffers(buffers)
                    flat.write(buffers)
                    for buffer in flat.buffers.values():
                        self.comm.broadcast(buffer)
                    torch._foreach_copy_(buffers, flat.views())

    @contextlib.contextmanager
    def perturbed_pass(self) -> Iterator[None]:
        """With DistributedDataParallel the perturbed pass is synced by it (its reduction overlaps
        the backward) when its plain average is the right one: no solver, and the same number of
        distributions on every process, whole batches (with micro-batches DDP would all-reduce after
        every micro-batch's backward), and every parameter reached (DDP without
        ``find_unused_parameters`` waits for a gradient of each). Otherwise it runs under
        ``no_sync`` and this module reduces."""
        self.synced = (
            self.ddp and self.solver is None and self.equal_counts and not self.micro and self.all_present
        )
        with contextlib.nullcontext() if self.synced else self._no_sync():
            yield
        self.synced = False

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """For extra local passes (locating a non-finite gradient, FAMO's forward)."""
        return self._no_sync()

    def stream(self, stats: GradientStatistics, count: int | None) -> LocalStream:
        if self.layout == "shards":
            return ShardStream(self.comm, stats, count)
        return LocalStream(stats)

    def finish_stream(
        self, stats: GradientStatistics, losses: Tensor, seen: list[bool]
    ) -> tuple[Tensor, list[bool]]:
        """After a streamed clean pass: agrees on losses, counts and gradients present; merges the
        statistics (domains). Returns the losses to report and which parameters have a gradient."""
        ctl = self._control(losses, seen)
        self.equal_counts = ctl.equal_counts
        self.all_present = all(ctl.present)
        if self.layout == "domains":
            merge_statistics(self.comm, stats, ctl.count)
        return ctl.losses, ctl.present

    def mean_gradient(self, params: Sequence[Tensor], losses: Tensor) -> Tensor:
        """After a pass that left the local mean gradient in ``p.grad``: averages it over the
        processes (weighted by each one's number of distributions in the domains layout) unless
        DistributedDataParallel already did. Returns the losses to report."""
        # shards: the losses ride with the gradients (one collective fewer)
        together = self.layout == "shards" and not self.synced
        ctl = self._control(losses, [p.grad is not None for p in params], reduce_losses=not together)
        if self._clean:
            self.equal_counts = ctl.equal_counts
            self.all_present = all(ctl.present)
        if together:
            world = float(self.comm.world_size)
            (reduced,) = average_gradients(self.comm, params, ctl.present, 1.0, world, extra=[losses])
            return reduced
        if not self.synced:
            average_gradients(self.comm, params, ctl.present, float(losses.numel()), float(ctl.count))
        return ctl.losses

    def reduce_task_pass(self, tp: Any) -> None:
        self.remote_problem = False
        reduce_task_pass(self.comm, tp)

    def reduce_losses(self, losses: Tensor) -> Tensor:
        """Averages extra losses (FAMO's after-step forward) over the processes (shards)."""
        reduced = self.comm.all_reduce(losses.detach().to(torch.float64).clone())
        return (reduced / self.comm.world_size).to(losses.dtype)

    def _control(self, losses: Tensor, present: Sequence[bool], reduce_losses: bool = True) -> Control:
        ctl = control(self.comm, self.layout, losses, present, reduce_losses)
        self.remote_problem = ctl.remote_problem
        return ctl


def join_torchrun() -> Communicator | None:
    """For training scripts: joins the gloo group of a ``torchrun`` launch (``WORLD_SIZE`` > 1 in
    the environment; gloo takes CPU and CUDA tensors) and returns its communicator, or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        import torch.distributed.nn  # noqa: F401  (before the group exists: see torchrun_session)

        dist.init_process_group("gloo")
    return Communicator()


@contextlib.contextmanager
def torchrun_session() -> Iterator[Communicator | None]:
    """For training scripts: the communicator of a ``torchrun`` launch (None in one process) for
    the body. A group this context started is torn down at the end, after a barrier when the body
    succeeded (a process that leaves while its peer still works can abort that peer), and is gone
    when the context exits: its gloo threads joined and its sockets closed.

    That last part needs care. ``destroy_process_group`` only drops torch's references to the
    group; the group's destructor, which joins its threads, runs when the last reference goes.
    ``torch.distributed.nn.functional`` binds ``group.WORLD`` into default arguments when first
    imported, and ``torch._dynamo`` imports it, which every torch optimizer imports when first
    built: imported after ``init_process_group``, those defaults held the group until interpreter
    shutdown. A gloo worker that drops a finished collective whose tensors Python has already let
    go of takes the GIL to free them; on a loaded machine a worker can be descheduled between
    completing the last collective and that drop (a barrier does not wait for it) while the main
    thread reaches interpreter finalization, and from then on Python 3.11 ends a thread that asks
    for the GIL with ``pthread_exit``, whose unwinding through the work's destructor calls
    ``std::terminate``: "terminate called without an active exception", now and then, at exit.
    :func:`join_torchrun` imports that module before the group exists (the defaults bind None),
    so destroying the group joins its workers while Python is fully alive.
    """
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        yield join_torchrun()
        if started:
            dist.barrier()
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
            # what the body left in reference cycles (DistributedDataParallel wrappers) may hold the
            # group: collected here, so the group's destructor runs now and not at shutdown
            gc.collect()


def make_data_parallel(
    process_group: Any, layout: str, model: nn.Module | None, solver: Any
) -> DataParallel | None:
    """Resolves the optimizer's ``process_group`` and ``layout`` arguments.

    ``"auto"`` takes the default group when ``torch.distributed`` is initialized with two or more
    processes; a group object takes that group; ``None`` turns communication off (each process
    steps on its own data). A group of one process needs no communication.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(
                f"process_group must be 'auto', a torch.distributed group or None, got {process_group!r}"
            )
        group = None
        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    elif process_group is None:
        active = False
    else:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialized")
        group = process_group
        active = dist.get_world_size(group) > 1
    if not active:
        if _is_ddp(model) and process_group is None:
            raise ValueError(
                "model is a DistributedDataParallel module but process_group=None: the optimizer "
                "must run its first pass under no_sync and reduce itself; leave process_group='auto'"
            )
        return None
    if solver is not None and layout == "domains":
        raise ValueError(
            "a solver needs every task on every process: use layout='shards' (each process holds a "
            "shard of every task's batch)"
        )
    return DataParallel(Communicator(group), layout, model, solver)
