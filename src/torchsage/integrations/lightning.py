"""SAGE in PyTorch Lightning: the manual-optimization recipe as a mixin.

Lightning's automatic optimization runs ``loss.backward()`` and then ``optimizer.step()``; a
two-pass optimizer needs the forward pass in a closure it can call twice instead. With
:class:`SAGEMixin` a ``LightningModule`` trains in manual optimization and its ``training_step``
hands the closure to :meth:`SAGEMixin.sage_step`, which steps the optimizer, steps the learning-rate
schedulers as ``configure_optimizers`` asked, and logs the step's :class:`~torchsage.StepInfo`.

Lightning itself is not imported here: the mixin only calls methods of the ``LightningModule`` it
is mixed into (``pip install "torchsage[lightning]"``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from torchsage.amp import scaled_step
from torchsage.integrations import data_parallel, step_info_metrics
from torchsage.optim import Closure, MicroBatches, SharpnessAware, StepInfo

__all__ = ["SAGEMixin", "step_info_metrics"]


class SAGEMixin:
    """Mixin for a ``LightningModule`` trained with SAGE, SAM or any torchsage optimizer.

    Put it before ``LightningModule`` in the bases; it switches the module to manual optimization.
    ``configure_optimizers`` returns the torchsage optimizer (and schedulers, as usual), and
    ``training_step`` calls :meth:`sage_step` with a closure that runs the forward pass and returns
    the per-distribution losses (:func:`torchsage.group_losses` builds them from a batch's group
    column).

    - **Schedulers** configured in ``configure_optimizers`` are stepped by :meth:`sage_step`
      (Lightning leaves that to the module in manual optimization): ``interval="step"`` ones every
      ``frequency`` optimizer steps, ``interval="epoch"`` ones (the default) after the last batch
      of every ``frequency``-th epoch. ``ReduceLROnPlateau`` is not stepped: step it in a hook.
    - **Logging**: the step's :class:`~torchsage.StepInfo` is logged per step under ``sage/``
      (see :func:`step_info_metrics`); a group seen before but absent from this step's batch is
      logged as ``nan``. Set ``sage_log = False`` to log yourself.
    - **Checkpoints**: Lightning saves and restores the optimizer's ``state_dict``, which holds
      SAGE's noise generator, so a run resumed from a checkpoint continues as the uninterrupted
      run would (with a ``seed`` and a deterministic data order).
    - **Precision**: 32-bit, ``"bf16-mixed"`` and ``"16-mixed"``: with the latter the step is
      :func:`torchsage.amp.scaled_step` on the precision plugin's gradient scaler (an overflow
      skips the whole step and lowers the scale; the step still counts in ``global_step``).
    - **DDP** (``Trainer(strategy="ddp", devices=N)``): nothing to change. The closures run the
      module itself, not Lightning's ``DistributedDataParallel`` wrapper, so DDP reduces nothing;
      the optimizer (``process_group="auto"``, the default) averages the per-distribution
      gradients of the clean pass and the perturbed gradient over the processes, and each process
      holds its share of every distribution's batch (Lightning's ``DistributedSampler``). Refused:
      an optimizer that does not reduce (``process_group=None``) or whose ``model=`` is the DDP
      wrapper.
      Gradient clipping by the Trainer is not available in manual optimization: use the
      optimizer's ``max_grad_norm`` (it clips the descent gradient, after unscaling).
    - **FSDP2** (``strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``):
      ``configure_model`` calls ``fully_shard(self.net, mesh=self.device_mesh["data_parallel"])``;
      ``configure_optimizers`` runs after it, so the optimizer steps the shards. Refused: an
      optimizer built before ``fully_shard``.
    - **Gradient accumulation**: ``Trainer(accumulate_grad_batches=N)``, which Lightning refuses
      in manual optimization, is taken over by the mixin when the trainer is attached (the
      trainer's own value is set to 1): :meth:`sage_step` keeps the closures of ``N`` batches and
      steps on the ``N``-th (or the epoch's last batch) over all of them as
      :class:`torchsage.MicroBatches`, so the step is that of one batch ``N`` times as large;
      :meth:`sage_step` returns None on the batches in between. Pass ``sizes=`` (e.g.
      ``torchsage.group_sizes(domain, groups)``) when the distributions' shares differ between
      batches. ``global_step`` counts optimizer steps, as with automatic accumulation.
    - Lightning's ``on_before_optimizer_step`` hook runs after each call of the closure (twice per
      step), before the optimizer's backward passes: gradients are not there yet (with
      ``"16-mixed"`` or accumulation it runs once, after the whole step).

    Example (``lightning`` installed)::

        class Classifier(SAGEMixin, lightning.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(8, 3)

            def training_step(self, batch, batch_idx):
                x, y, domain = batch

                def closure():
                    per_sample = F.cross_entropy(self.net(x), y, reduction="none")
                    return torchsage.group_losses(per_sample, domain)

                self.sage_step(closure)

            def configure_optimizers(self):
                return torchsage.SAGE(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, seed=0)
    """

    sage_log: bool = True
    sage_log_prefix: str = "sage/"
    #: batches per step, taken over from ``Trainer(accumulate_grad_batches=...)``
    sage_accumulate: int = 1

    @property
    def trainer(self) -> Any:
        return super().trainer  # type: ignore[misc]

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        factor = getattr(trainer, "accumulate_grad_batches", 1)
        if isinstance(factor, int) and factor > 1:
            # Lightning refuses accumulation in manual optimization before any hook runs; the
            # mixin accumulates itself (sage_step), so the trainer's own loop must not
            self.sage_accumulate = factor
            trainer.accumulate_grad_batches = 1
        parent = super(SAGEMixin, type(self)).trainer  # type: ignore[misc]
        parent.fset(self, trainer)

    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError(
                "SAGEMixin trains in manual optimization (the optimizer needs a closure it calls twice): "
                "remove automatic_optimization = True, or drop SAGEMixin"
            )

    def sage_step(
        self, closure: Closure, *, weights: Any = None, optimizer: Any = None, sizes: Any = None
    ) -> StepInfo | None:
        """One optimizer step on ``closure``'s losses, then the due scheduler steps and the logging.

        Args:
            closure: runs the forward pass and returns one loss per distribution (no backward).
            weights: passed to the optimizer's ``step`` (e.g. :func:`torchsage.group_counts`);
                with accumulation, the same on every batch of a window.
            optimizer: the optimizer to step when ``configure_optimizers`` returns several
                (``self.optimizers()[i]``); by default the only one.
            sizes: with accumulation, this batch's sample count per distribution (a dict name ->
                count or a list, see :class:`torchsage.MicroBatches`); ``None``: equal shares.

        Returns:
            The optimizer's :class:`~torchsage.StepInfo`, or None on a batch that only joins an
            accumulation window.
        """
        module: Any = self
        trainer = module.trainer
        if optimizer is None:
            optimizer = module.optimizers()
            if isinstance(optimizer, list):
                raise ValueError(
                    f"configure_optimizers returned {len(optimizer)} optimizers: pass the one to step, "
                    "sage_step(closure, optimizer=self.optimizers()[i])"
                )
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, SharpnessAware):
            raise ValueError(
                f"sage_step needs a torchsage optimizer (SAGE, SAM, ...), got {type(inner).__name__}"
            )
        data_parallel(inner, getattr(trainer, "world_size", 1), None, "SAGEMixin", module)
        target: Any = closure
        if self.sage_accumulate > 1:
            window = self.__dict__.setdefault("_sage_window", [])
            window.append((closure, sizes, weights))
            if len(window) < self.sage_accumulate and not trainer.is_last_batch:
                return None
            self.__dict__["_sage_window"] = []
            if any(w != window[0][2] for _, _, w in window):
                raise ValueError(
                    "sage_step got different weights= within one accumulation window: weights weigh "
                    "the distributions of the whole window (give each batch's counts as sizes=)"
                )
            given = [s for _, s, _ in window]
            if any(s is None for s in given) and any(s is not None for s in given):
                raise ValueError(
                    "sage_step got sizes= for some batches of a window only: give them for every batch"
                )
            target = MicroBatches([c for c, _, _ in window], None if given[0] is None else given)
        kwargs = {} if weights is None else {"weights": weights}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None and not isinstance(target, MicroBatches):
            info = optimizer.step(closure, **kwargs)
        else:
            info = self._sage_step_whole(optimizer, inner, target, kwargs, scaler)
        self._sage_schedulers(trainer)
        if self.sage_log:
            metrics = step_info_metrics(info, self.sage_log_prefix)
            # Lightning keeps a key's last value in the logs: an absent group must read nan, not stale.
            seen = self.__dict__.setdefault("_sage_names", {})
            seen.update(dict.fromkeys(info.names))
            for name in seen.keys() - set(info.names):
                metrics[f"{self.sage_log_prefix}loss/{name}"] = math.nan
            # Without a logger they still reach trainer.callback_metrics (and Lightning stays quiet).
            module.log_dict(
                metrics, on_step=True, on_epoch=False, prog_bar=False, logger=bool(trainer.loggers)
            )
        return info

    @staticmethod
    def _sage_step_whole(
        optimizer: Any, inner: SharpnessAware, target: Any, kwargs: dict[str, Any], scaler: Any
    ) -> StepInfo:
        """The step as one closure of the Lightning optimizer, which counts it in ``global_step``
        and runs the precision plugin: that closure takes the whole step (MicroBatches, or the
        loss-scaled step on the plugin's scaler) and the optimizer's own ``step`` that the plugin
        calls then only runs the closure it is given (the scaler's call has none)."""
        taken: list[StepInfo] = []

        with _closure_only_step(inner) as inside:

            def whole_step() -> None:
                with inside():
                    if scaler is None:
                        taken.append(inner.step(target, **kwargs))
                    else:  # the plugin's scaler.step and scaler.update read this step's inf check
                        taken.append(scaled_step(inner, target, scaler, scaler_steps=True, **kwargs))

            optimizer.step(closure=whole_step)
        return taken[0]

    def _sage_schedulers(self, trainer: Any) -> None:
        """Steps the schedulers of ``configure_optimizers`` whose interval ends with this step."""
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau:
                continue
            frequency = max(int(config.frequency), 1)
            if config.interval == "step":
                due = trainer.global_step % frequency == 0
            else:
                due = trainer.is_last_batch and (trainer.current_epoch + 1) % frequency == 0
            if due:
                config.scheduler.step()


@contextlib.contextmanager
def _closure_only_step(optimizer: SharpnessAware) -> Iterator[Any]:
    """For the body, ``optimizer.step`` only runs the closure it is given (the whole step is inside
    it), except inside the context the body gets, where it is the real ``step`` (with the wrapper
    an LR scheduler put on the instance, which counts the call)."""
    saved = optimizer.__dict__.get("step")
    original = optimizer.step
    depth = [0]

    @contextlib.contextmanager
    def inside() -> Iterator[None]:
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def step(closure: Any = None, **kwargs: Any) -> Any:
        if depth[0]:
            return original(closure, **kwargs)
        return None if closure is None else closure()

    optimizer.__dict__["step"] = step
    try:
        yield inside
    finally:
        if saved is None:
            del optimizer.__dict__["step"]
        else:
            optimizer.__dict__["step"] = saved
