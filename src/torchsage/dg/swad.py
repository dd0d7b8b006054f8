"""SWAD: dense weight averaging over a loss valley (Cha et al., NeurIPS 2021, "SWAD: Domain
Generalization by Seeking Flat Minima"), a harness option of ``torchsage dg train`` for every
algorithm (hyperparameter ``swad``, default false).

Between two evaluations (DomainBed's checkpoints) the running mean of the network's trainable
parameters after each training step forms one *segment*; each evaluation closes the open segment
with that checkpoint's training-domain validation loss (for each training environment the mean
cross-entropy on its ``out`` split, then the mean over those environments, the authors'
``tr_outloss``). :class:`LossValley` is the authors' rule (their ``domainbed/swad.py``) for which
segments enter the final average, followed step by step, quirks included:

* converged when, of the last ``swad_n_converge`` segments, the oldest has the lowest loss (the
  first of equal minima); the threshold is ``(1 + swad_tolerance_ratio)`` x their mean loss;
* the final average is created from that oldest segment as a *placeholder* (the authors'
  ``AveragedModel(segment)`` has ``n_averaged = 0``, so the first segment added replaces it; it
  stays the result only if nothing is ever added);
* at convergence, when ``n_tolerance < n_converge`` the ``n_converge - n_tolerance`` segments after
  the oldest are added; when ``n_tolerance > n_converge`` the first ``n_tolerance - n_converge + 1``
  segments of the smoothing queue (up to the converging one when the queue is full; right after an
  early convergence it is not, and younger ones come in) are scanned from the young end for the
  youngest loss above the threshold, at position ``i`` (``-1`` when none), and those from position
  ``i + 2`` on are added (usually the converging segment among them, added again later when it is
  the window's oldest); with ``n_tolerance = n_converge`` the converging segment is never added;
* afterwards, at each evaluation the oldest segment of the smoothing queue (the last
  ``n_tolerance`` segments) is added, unless it is older than the converging segment (then nothing
  happens), while the minimum loss over the queue stays <= the threshold; once it exceeds it the
  valley is dead and nothing more is added. Until the queue is full its oldest entry does not
  change, so it is added again at every evaluation: the authors' rule counts segments more than
  once (``segments`` in ``swad.json`` lists every addition);
* at the end (valley alive) the queue's oldest entry is dropped and the rest are added in order
  while the queue's minimum loss stays <= the threshold; never converged: the last segment alone.

The authors stop training when the valley dies; torchsage trains on to the planned steps so that
``results.jsonl`` and model selection are those of the run without SWAD, and records the step at
which the valley died. At the end the averaged network is evaluated on every environment's ``in``
and ``out`` parts and ``swad.json`` is written whole (temporary file, then rename) by rank 0.

BatchNorm: with ``freeze_bn`` the running statistics never change and the network's are used; with
BatchNorm layers that train (``freeze_bn`` false), their statistics are recomputed on the averaged
weights over :data:`BN_STEPS` training minibatches (all training environments' batches together,
cumulative averages), as the authors do after training; under ``torchrun`` that is refused (each
process sees only its slice of the batches).

Memory: the open segment's running mean is one copy of the trainable parameters on the training
device (a per-step copy to the CPU would stall every step); each closed segment, and the final
average, are CPU copies of the trainable parameters (frozen ones never change). At most
``max(n_converge, n_tolerance)`` closed segments are held at once.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsage.optim import Communicator

__all__ = [
    "BN_STEPS",
    "SWAD",
    "LossValley",
    "Segment",
    "SegmentMean",
    "check_swad_hparams",
    "recompute_batchnorm",
]

#: training minibatches over which BatchNorm statistics are recomputed for the averaged weights
#: (the SWAD authors' ``update_bn`` after training)
BN_STEPS = 500


def check_swad_hparams(hparams: dict[str, Any]) -> None:
    """Validates ``swad`` and its three settings (whenever present, also with ``swad`` false).

    Raises:
        ValueError: naming the hyperparameter and the value it got.
    """
    swad = hparams.get("swad", False)
    if not isinstance(swad, bool):
        raise ValueError(f"hparam swad must be true or false, got {swad!r}")
    for name in ("swad_n_converge", "swad_n_tolerance"):
        value = hparams.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"hparam {name} must be an integer >= 1, got {value!r}")
    ratio = hparams.get("swad_tolerance_ratio", 0.0)
    number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
    if not number or not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"hparam swad_tolerance_ratio must be a finite number >= 0, got {ratio!r}")


@dataclass
class Segment:
    """The mean of the weights over the steps ``start_step..end_step`` and the validation loss at
    the evaluation that closed it."""

    start_step: int
    end_step: int
    loss: float
    weights: list[Tensor]


@dataclass
class _Average:
    """An equal-weight running mean of segments; created from a placeholder segment that the first
    added segment replaces (the authors' ``AveragedModel`` with ``n_averaged = 0``)."""

    weights: list[Tensor]
    placeholder: Segment
    added: list[Segment] = field(default_factory=list)

    def add(self, segment: Segment) -> None:
        n = len(self.added)
        if n == 0:
            self.weights = [w.clone() for w in segment.weights]
        else:
            for mean, w in zip(self.weights, segment.weights):
                mean.lerp_(w, 1.0 / (n + 1))  # mean + (w - mean) / (n + 1)
        self.added.append(segment)

    @property
    def segments(self) -> list[Segment]:
        """The segments the average is the mean of, in the order added (repeats included)."""
        return self.added or [self.placeholder]


class LossValley:
    """The SWAD authors' LossValley rule over a sequence of closed segments (see the module text).

    Example:
        >>> v = LossValley(n_converge=2, n_tolerance=2, tolerance_ratio=0.5)
        >>> for k, loss in enumerate([3.0, 1.0, 2.0, 1.2, 9.0, 9.0]):
        ...     v.update(Segment(k, k, loss, [torch.tensor(float(k))]))
        >>> result = v.finish()
        >>> [(s.start_step, s.end_step) for s in result.segments], float(result.weights[0])
        ([(2, 2), (3, 3)], 2.5)
        >>> v.converge_step, v.dead_valley_step  # converged on segment 1, which was never added
        (1, 5)
    """

    def __init__(self, n_converge: int, n_tolerance: int, tolerance_ratio: float) -> None:
        check_swad_hparams(
            {
                "swad_n_converge": n_converge,
                "swad_n_tolerance": n_tolerance,
                "swad_tolerance_ratio": tolerance_ratio,
            }
        )
        self.n_converge, self.n_tolerance, self.ratio = n_converge, n_tolerance, float(tolerance_ratio)
        self.converge_queue: deque[Segment] = deque(maxlen=n_converge)
        self.smooth_queue: deque[Segment] = deque(maxlen=n_tolerance)
        self.final: _Average | None = None
        self.converge_step: int | None = None
        self.threshold: float | None = None
        self.dead_valley_step: int | None = None
        self._finished = False

    def _smooth_min(self) -> float:
        return min(s.loss for s in self.smooth_queue)

    def update(self, segment: Segment) -> None:
        """Takes the segment closed at an evaluation."""
        if self._finished:
            raise RuntimeError("LossValley.update after finish")
        if self.dead_valley_step is not None:
            return
        self.converge_queue.append(segment)
        self.smooth_queue.append(segment)
        if self.final is None:
            if len(self.converge_queue) < self.n_converge:
                return
            losses = [s.loss for s in self.converge_queue]
            if int(np.argmin(losses)) != 0:
                return
            oldest = self.converge_queue[0]
            self.converge_step = oldest.end_step
            self.final = _Average([w.clone() for w in oldest.weights], oldest)
            self.threshold = float(np.mean(losses)) * (1.0 + self.ratio)
            if self.n_tolerance < self.n_converge:
                for i in range(self.n_converge - self.n_tolerance):
                    self.final.add(self.converge_queue[1 + i])
            elif self.n_tolerance > self.n_converge:
                queue = list(self.smooth_queue)[: self.n_tolerance - self.n_converge + 1]
                start = 0
                for i in reversed(range(len(queue))):
                    if queue[i].loss > self.threshold:
                        start = i + 1
                        break
                for s in queue[start + 1 :]:
                    self.final.add(s)
            return
        assert self.threshold is not None and self.converge_step is not None
        if self.smooth_queue[0].end_step < self.converge_step:
            return
        if self._smooth_min() > self.threshold:
            self.dead_valley_step = segment.end_step  # where the authors stop training
            return
        self.final.add(self.smooth_queue[0])

    def finish(self) -> _Average:
        """The final average (call once, after the last evaluation)."""
        if self._finished:
            raise RuntimeError("LossValley.finish called twice")
        self._finished = True
        if not self.converge_queue:
            raise RuntimeError("LossValley.finish before any segment")
        if self.final is None:  # never converged: the last segment
            last = self.converge_queue[-1]
            return _Average([w.clone() for w in last.weights], last)
        if self.dead_valley_step is None:
            self.smooth_queue.popleft()
            while self.smooth_queue and self._smooth_min() <= self.threshold:  # type: ignore[operator]
                self.final.add(self.smooth_queue.popleft())
        return self.final

    @property
    def converged(self) -> bool:
        return self.final is not None


class SegmentMean:
    """The running mean of ``params`` over the steps of the open segment, on their device."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.mean: list[Tensor] = []
        self.count = 0
        self.start_step = -1

    @torch.no_grad()
    def add(self, step: int) -> None:
        """Adds the parameters' current values (call after each training step)."""
        if self.count == 0:
            self.mean = [p.detach().clone() for p in self.params]
            self.start_step = step
        else:
            torch._foreach_lerp_(self.mean, [p.detach() for p in self.params], 1.0 / (self.count + 1))
        self.count += 1

    def close(self, step: int, loss: float) -> Segment:
        """The segment ending at ``step`` as CPU copies; the next :meth:`add` opens a new one."""
        if self.count == 0:
            raise RuntimeError("SegmentMean.close without a step")
        segment = Segment(self.start_step, step, loss, [m.to("cpu", copy=True) for m in self.mean])
        self.mean, self.count = [], 0
        return segment


def _training_batchnorms(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose statistics training updates (in training mode under ``train()``)."""
    mode = network.training
    network.train()
    found = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    network.train(mode)
    return [m for m in found if m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(network: nn.Module, inputs: Iterator[Tensor], steps: int) -> int:
    """Resets the running statistics of the BatchNorm layers that train and recomputes them as the
    cumulative average over ``steps`` batches of ``inputs`` (the authors' ``update_bn``: momentum
    ``None``, network in training mode). Returns the number of layers recomputed (0: nothing to do).
    """
    layers = _training_batchnorms(network)
    if not layers:
        return 0
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    mode = network.training
    network.train()
    for _ in range(steps):
        network(next(inputs))
    for m, momentum in momenta.items():
        m.momentum = momentum
    network.train(mode)
    return len(layers)


class _Predictor:
    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)


def _write_whole(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


class SWAD:
    """The harness side of SWAD for one run: :meth:`after_step` after every training step,
    :meth:`checkpoint` at every evaluation (all processes, the network in evaluation mode),
    :meth:`finish` after the last step (all processes; rank 0 writes ``swad.json``).

    Args:
        algorithm: the trained algorithm; its ``network``'s trainable parameters are averaged.
        hparams: the run's hyperparameters (``swad_n_converge``, ...).
        train_envs: indices of the training environments.
        evaluation: the evaluation batches, ``[env0 in, env0 out, env1 in, ...]`` (this process's
            share under ``torchrun``).
        device: where the batches go.
        comm: the process group under ``torchrun``, else ``None``.
    """

    def __init__(
        self,
        algorithm: nn.Module,
        hparams: dict[str, Any],
        train_envs: Sequence[int],
        evaluation: Sequence[Any],
        device: torch.device,
        comm: Communicator | None = None,
    ) -> None:
        check_swad_hparams(hparams)
        network = algorithm.network
        assert isinstance(network, nn.Module)
        if comm is not None and _training_batchnorms(network):
            raise ValueError(
                "swad with BatchNorm layers that train (freeze_bn false) recomputes their statistics in "
                "one process: run it without torchrun, or with freeze_bn true"
            )
        self.network = network
        self.names = [n for n, p in network.named_parameters() if p.requires_grad]
        self.segment = SegmentMean([p for p in network.parameters() if p.requires_grad])
        self.valley = LossValley(
            hparams["swad_n_converge"], hparams["swad_n_tolerance"], hparams["swad_tolerance_ratio"]
        )
        self.train_envs = list(train_envs)
        self.evaluation = evaluation
        self.device = device
        self.comm = comm
        self.losses: list[tuple[int, float]] = []

    def after_step(self, step: int) -> None:
        self.segment.add(step)

    @torch.no_grad()
    def validation_loss(self, network: nn.Module) -> float:
        """Mean over the training environments of the mean cross-entropy on their ``out`` parts."""
        sums = torch.zeros(2 * len(self.train_envs), dtype=torch.float64, device=self.device)
        for k, env in enumerate(self.train_envs):
            for x, y in self.evaluation[2 * env + 1]:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                sums[2 * k] += F.cross_entropy(network(x).float(), y, reduction="sum").double()
                sums[2 * k + 1] += len(y)
        if self.comm is not None:
            sums = self.comm.all_reduce(sums.cpu()).to(self.device)
        values = sums.tolist()
        return sum(values[2 * k] / max(values[2 * k + 1], 1) for k in range(len(self.train_envs))) / len(
            self.train_envs
        )

    def checkpoint(self, step: int) -> None:
        """Closes the open segment with this checkpoint's validation loss (network in eval mode)."""
        loss = self.validation_loss(self.network)
        self.losses.append((step, loss))
        self.valley.update(self.segment.close(step, loss))

    def averaged_network(self, bn_inputs: Iterator[Tensor] | None = None) -> tuple[nn.Module, int]:
        """A copy of the network holding the final average (and, where BatchNorm trains,
        statistics recomputed over :data:`BN_STEPS` batches of ``bn_inputs``); the number of
        BatchNorm layers recomputed."""
        self.final = self.valley.finish()
        network = copy.deepcopy(self.network)
        params = dict(network.named_parameters())
        with torch.no_grad():
            for name, value in zip(self.names, self.final.weights):
                params[name].copy_(value)
        recomputed = 0
        if bn_inputs is not None and _training_batchnorms(network):
            recomputed = recompute_batchnorm(network, bn_inputs, BN_STEPS)
        network.eval()
        return network, recomputed

    def finish(self, out: Path, streams: Sequence[Iterator], merged: bool, rank: int) -> dict[str, Any]:
        """Builds the averaged network, evaluates it on every split and (rank 0) writes
        ``out/swad.json``; returns the record."""
        from torchsage.dg.batches import count_batches as _count
        from torchsage.dg.batches import to_device as _to

        def inputs() -> Iterator[Tensor]:
            while True:
                batches = next(streams[0]) if merged else [next(s) for s in streams]
                yield torch.cat([_to(b, self.device)[0] for b in batches])

        network, recomputed = self.averaged_network(inputs())
        counts = [_count(_Predictor(network), batches, self.device) for batches in self.evaluation]  # type: ignore[arg-type]
        if self.comm is not None:
            flat = torch.tensor([c for pair in counts for c in pair], dtype=torch.float64)
            flat = self.comm.all_reduce(flat)
            counts = [(int(flat[2 * j]), int(flat[2 * j + 1])) for j in range(len(counts))]
        final = self.final
        segments = final.segments
        record: dict[str, Any] = {}
        for j, (correct, total) in enumerate(counts):
            record[f"env{j // 2}_{'out' if j % 2 else 'in'}_acc"] = correct / max(total, 1)
        record.update(
            start_step=min(s.start_step for s in segments),
            end_step=max(s.end_step for s in segments),
            n_segments=len(segments),
            converged=self.valley.converged,
            dead_valley_step=self.valley.dead_valley_step,
            converge_step=self.valley.converge_step,
            threshold=self.valley.threshold,
            segments=[[s.start_step, s.end_step] for s in segments],
            validation_losses=[[step, loss] for step, loss in self.losses],
            batchnorm_recomputed=recomputed,
        )
        if rank == 0:
            _write_whole(out / "swad.json", record)
        return record
