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

import math
from typing import Any

from torchsage.integrations import step_info_metrics
from torchsage.optim import Closure, StepInfo

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
    - **Precision**: 32-bit and ``"bf16-mixed"`` work; ``"16-mixed"``'s gradient scaler cannot
      drive a two-pass step and is refused. Gradient clipping by the Trainer is not available in
      manual optimization: use the optimizer's ``max_grad_norm``.
    - Lightning's ``on_before_optimizer_step`` hook runs after each call of the closure (twice per
      step), before the optimizer's backward passes: gradients are not there yet.

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

    def sage_step(self, closure: Closure, *, weights: Any = None, optimizer: Any = None) -> StepInfo:
        """One optimizer step on ``closure``'s losses, then the due scheduler steps and the logging.

        Args:
            closure: runs the forward pass and returns one loss per distribution (no backward).
            weights: passed to the optimizer's ``step`` (e.g. :func:`torchsage.group_counts`).
            optimizer: the optimizer to step when ``configure_optimizers`` returns several
                (``self.optimizers()[i]``); by default the only one.

        Returns:
            The optimizer's :class:`~torchsage.StepInfo`.
        """
        module: Any = self
        trainer = module.trainer
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"precision={trainer.precision!r} steps through a GradScaler, which cannot drive a "
                "two-pass step: use precision='bf16-mixed' or 32"
            )
        if optimizer is None:
            optimizer = module.optimizers()
            if isinstance(optimizer, list):
                raise ValueError(
                    f"configure_optimizers returned {len(optimizer)} optimizers: pass the one to step, "
                    "sage_step(closure, optimizer=self.optimizers()[i])"
                )
        info = optimizer.step(closure, **({} if weights is None else {"weights": weights}))
        if not isinstance(info, StepInfo):
            raise ValueError(
                f"sage_step needs a torchsage optimizer (SAGE, SAM, ...), got {type(optimizer).__name__}"
            )
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
