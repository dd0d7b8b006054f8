"""SAGE in the Hugging Face Trainer: :class:`SAGETrainer`, a ``transformers.Trainer`` whose training
step is SAGE's two-pass step on the per-group losses of each batch.

The Trainer runs ``loss.backward()`` in ``training_step`` and ``optimizer.step()`` after it; a
two-pass optimizer needs the forward pass in a closure it can call twice instead. ``SAGETrainer``
takes a batch column naming each sample's group (domain, task, source), computes the per-sample
losses from the model's outputs, groups them with :func:`torchsage.group_losses` and runs the whole
step in ``training_step``; the Trainer's own ``optimizer.step()`` that follows does nothing.

``transformers`` (and ``accelerate``, which its Trainer needs) are imported only when
``SAGETrainer`` is first used (``pip install "torchsage[hf]"``).
"""

from __future__ import annotations

import math
import types
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchsage.amp import scaled_step
from torchsage.groups import check_options, group_counts, group_losses, group_sizes
from torchsage.integrations import data_parallel, step_info_metrics
from torchsage.optim import SAGE, MicroBatches, SharpnessAware

__all__ = ["SAGETrainer", "per_sample_loss"]  # noqa: F822 (SAGETrainer is built on first use)


def per_sample_loss(logits: Tensor, labels: Tensor, shift: bool = False) -> Tensor:
    """One loss per sample from a model's logits and labels, shape ``(N,)``.

    - ``logits (N, C)`` and integer ``labels (N,)``: cross-entropy (sequence classification);
    - ``logits (N, T, C)`` and ``labels (N, T)``: the mean cross-entropy of each sample's tokens,
      labels ``-100`` ignored (token classification; with ``shift``, position ``t`` predicts
      label ``t + 1``, as causal language models do);
    - float ``labels`` with one output per sample (``logits (N,)`` or ``(N, 1)``): squared error
      (regression).

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
        >>> per_sample_loss(logits, torch.tensor([0, 1])).round(decimals=4)
        tensor([0.1269, 0.6931])
    """
    if labels.dtype.is_floating_point:
        if logits.reshape(len(logits), -1).shape[1] != 1 or labels.numel() != len(logits):
            raise ValueError(
                f"float labels {tuple(labels.shape)} need one output per sample, "
                f"got logits {tuple(logits.shape)}"
            )
        return (logits.reshape(-1).float() - labels.reshape(-1).float()).square()
    if logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() == 3 and labels.dim() == 2:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
        valid = (labels != -100).to(tokens.dtype)
        return (tokens * valid).sum(1) / valid.sum(1).clamp(min=1)
    raise ValueError(
        f"no per-sample loss for logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: override "
        "SAGETrainer.per_sample_loss(model, inputs) to return one loss per sample"
    )


def _deferred_step(self: Any, closure: Any = None, **kwargs: Any) -> Any:
    """The optimizer's ``step`` as the Trainer sees it: a no-op right after SAGETrainer's
    training_step took the step, the real step when given a closure."""
    if closure is None and "_torchsage_stepped" in self.__dict__:
        info = self.__dict__.pop("_torchsage_stepped")
        outer = self.__dict__.pop("_torchsage_outer", None)
        if info.skipped and hasattr(outer, "_accelerate_step_called"):
            # accelerate marks the step as taken when its scaler calls this no-op: an overflow
            # skipped it, so the Trainer must not step the learning-rate scheduler either
            outer._accelerate_step_called = False
        return None
    return type(self).step(self, closure, **kwargs)


def _sharpness_aware(optimizer: Any) -> SharpnessAware:
    """The torchsage optimizer inside accelerate's (or another) wrapper."""
    inner = optimizer
    while not isinstance(inner, SharpnessAware) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, SharpnessAware):
        raise ValueError(
            f"SAGETrainer needs a torchsage optimizer (SAGE, SAM, ...), got {type(optimizer).__name__}"
        )
    return inner


def _build() -> type:
    try:
        from transformers import Trainer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as e:
        raise ImportError(
            f'SAGETrainer needs transformers and accelerate: pip install "torchsage[hf]" ({e})'
        ) from None

    class SAGETrainer(Trainer):
        """A ``transformers.Trainer`` that trains with SAGE (or any torchsage optimizer) on the
        per-group losses of each batch.

        Each batch carries a column (``group_column``) with every sample's group. The training
        step computes the model's outputs, one loss per sample (:meth:`per_sample_loss`), the
        per-group losses (:func:`torchsage.group_losses`, groups absent from the batch left out)
        and runs the optimizer's two-pass step on them. The optimizer is built like the Trainer's
        own (``args.optim``, learning rate, weight decay groups) and wrapped in ``optimizer_class``;
        ``args.max_grad_norm`` becomes the optimizer's ``max_grad_norm`` (the descent gradient is
        clipped). Pass ``optimizers=(torchsage_optimizer, scheduler)`` to build it yourself. The
        StepInfo values are averaged between two logs and logged under ``sage/``;
        ``trainer.last_step_info`` holds the last one.

        Args (besides the Trainer's):
            group_column: the batch key of the group ids (kept by ``remove_unused_columns``,
                never passed to the model).
            groups: the groups' ids in order, or a mapping id -> name (see
                :func:`torchsage.group_losses`); ``None``: the groups present in each batch.
            weighting: ``"uniform"`` (every group present counts equally) or ``"count"`` (groups
                weighted by their share of the batch, through the optimizer's ``weights=``).
            absent: ``"skip"`` or ``"error"`` for a group of ``groups`` missing from a batch.
            optimizer_class: the torchsage optimizer wrapped around the base optimizer.
            optimizer_kwargs: its own options (``rho``, ``gamma``, ``seed``, ...).

        Gradient accumulation (``gradient_accumulation_steps=G``): the ``G`` batches of an
        accumulation window are kept and the step is taken on the last one, over all ``G`` as
        :class:`torchsage.MicroBatches` (each group's loss and gradient are those of its samples in
        the whole window, one batch's graph alive at a time): the step of one batch ``G`` times as
        large. Mixed precision: ``bf16=True``, or ``fp16=True`` with the Trainer's gradient scaler
        driving :func:`torchsage.amp.scaled_step` (an overflow skips the step and lowers the
        scale; the learning-rate scheduler then does not step, as in the plain Trainer).

        DDP (launched by ``torchrun``; accelerate wraps the model in ``DistributedDataParallel``):
        nothing to change. The closures run the wrapper, which the step hands to the optimizer as
        its ``model=``: the clean pass runs under ``no_sync`` and the optimizer averages the
        per-distribution gradients, DDP averages the perturbed gradient (with accumulation the
        optimizer reduces both passes, once per window). The optimizer must average gradients
        (``process_group="auto"``, built after the process group exists): refused otherwise.
        FSDP2 (``fsdp_config={"fsdp_version": 2}``) is refused at the first step: the Trainer
        builds the optimizer before accelerate shards the model.
        """

        def __init__(
            self,
            *args: Any,
            group_column: str = "group",
            groups: Sequence[Hashable] | Mapping[Hashable, Any] | None = None,
            weighting: str = "uniform",
            absent: str = "skip",
            optimizer_class: type = SAGE,
            optimizer_kwargs: Mapping[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            check_options(weighting, absent)
            self.group_column = group_column
            self.groups = groups
            self.weighting = weighting
            self.absent = absent
            self.optimizer_class = optimizer_class
            self.optimizer_kwargs = dict(optimizer_kwargs or {})
            self.last_step_info = None
            self._sage_metrics: list[dict[str, float]] = []
            self._sage_window: list[tuple[dict[str, Any], Any]] = []
            super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if self.group_column not in self._signature_columns:
                self._signature_columns.append(self.group_column)

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                if self.optimizer_cls_and_kwargs is not None:
                    base, base_kwargs = self.optimizer_cls_and_kwargs
                else:
                    base, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                decay = set(self.get_decay_parameter_names(opt_model))
                named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
                param_groups = [
                    {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                    {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                ]
                options = dict(self.optimizer_kwargs)
                if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                    options.setdefault("max_grad_norm", self.args.max_grad_norm)
                self.optimizer = self.optimizer_class(
                    [g for g in param_groups if g["params"]], base, **options, **dict(base_kwargs)
                )
            inner = _sharpness_aware(self.optimizer)
            inner.step = types.MethodType(_deferred_step, inner)
            return self.optimizer

        def per_sample_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
            """One loss per sample, shape ``(N,)``: the model's logits against ``inputs["labels"]``
            (see :func:`torchsage.integrations.hf.per_sample_loss`). Override for other models."""
            inputs = dict(inputs)
            labels = inputs.pop("labels", None)
            if labels is None:
                raise ValueError(
                    "the batch has no 'labels': SAGETrainer needs them for the per-sample losses "
                    "(or override SAGETrainer.per_sample_loss)"
                )
            outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
            name = self.accelerator.unwrap_model(model)._get_name()
            return per_sample_loss(logits, labels, shift=name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())

        def training_step(
            self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
        ) -> Tensor:
            model.train()
            inputs = self._prepare_inputs(inputs)
            inputs = dict(inputs)
            if self.group_column not in inputs:
                raise ValueError(
                    f"the batch has no {self.group_column!r} column (keys: {sorted(inputs)}): give "
                    "SAGETrainer(group_column=...) the column naming each sample's group"
                )
            self._sage_window.append((inputs, inputs.pop(self.group_column)))
            if not self.accelerator.sync_gradients:  # not the last batch of the accumulation window
                return torch.zeros((), device=self.args.device)
            window, self._sage_window = self._sage_window, []
            closure, weights = self._sage_closure(model, window)
            optimizer = _sharpness_aware(self.optimizer)
            data_parallel(optimizer, self.accelerator.num_processes, model, "SAGETrainer")
            kwargs = {} if weights is None else {"weights": weights}
            optimizer.__dict__["_torchsage_outer"] = self.optimizer
            if self.args.fp16 and self.accelerator.scaler is not None:
                # the Trainer's optimizer.step() then runs scaler.step and scaler.update on this
                # step's inf check (see _deferred_step)
                info = scaled_step(optimizer, closure, self.accelerator.scaler, scaler_steps=True, **kwargs)
            else:
                info = type(optimizer).step(optimizer, closure, **kwargs)
            optimizer.__dict__["_torchsage_stepped"] = info  # the Trainer's optimizer.step() is a no-op
            self.last_step_info = info
            self._sage_metrics.append(step_info_metrics(info))
            return torch.tensor(info.loss, device=self.args.device)

        def _sage_closure(self, model: torch.nn.Module, window: list[tuple[dict[str, Any], Any]]) -> Any:
            """The step's closure (one batch) or MicroBatches (an accumulation window), and the
            per-group weights (``weighting="count"``) or None."""

            def closure_of(inputs: dict[str, Any], ids: Any, absent: str) -> Any:
                def closure() -> dict[str, Tensor]:
                    with self.compute_loss_context_manager():
                        losses = self.per_sample_loss(model, inputs)
                    return group_losses(losses, ids, self.groups, absent=absent)

                return closure

            if len(window) == 1:
                inputs, ids = window[0]
                weights = group_counts(ids, self.groups) if self.weighting == "count" else None
                return closure_of(inputs, ids, self.absent), weights
            parts = [ids for _, ids in window]
            if all(isinstance(ids, Tensor) for ids in parts):
                everything: Any = torch.cat([ids.reshape(-1) for ids in parts])
            else:
                everything = [i for ids in parts for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
            group_sizes(everything, self.groups, absent=self.absent)  # a group absent from the window
            batches = MicroBatches(
                [closure_of(inputs, ids, "skip") for inputs, ids in window],
                sizes=[group_sizes(ids, self.groups) for _, ids in window],
            )
            totals = batches.totals()
            weights = [totals[n] for n in batches.names] if self.weighting == "count" else None  # type: ignore[index, union-attr]
            return batches, weights

        def _clip_grad_norm(self, model: Any) -> Any:
            # the optimizer clipped the descent gradient (max_grad_norm); the norm is the step's
            return self._sage_grad_norm()

        def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
            return self._sage_grad_norm() if grad_norm is None else grad_norm

        def _sage_grad_norm(self) -> float | None:
            info = self.last_step_info
            return None if info is None or info.skipped else info.grad_norm

        def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            inputs = {k: v for k, v in inputs.items() if k != self.group_column}
            return super().prediction_step(model, inputs, *args, **kwargs)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if self._sage_metrics and "loss" in logs:
                keys = dict.fromkeys(k for m in self._sage_metrics for k in m)
                for key in keys:  # the mean over the steps since the last log, nan where not measured
                    values = [m[key] for m in self._sage_metrics if key in m and not math.isnan(m[key])]
                    logs[key] = sum(values) / len(values) if values else math.nan
                self._sage_metrics = []
            super().log(logs, *args, **kwargs)

    SAGETrainer.__module__ = __name__
    return SAGETrainer


def __getattr__(name: str) -> Any:
    if name == "SAGETrainer":
        cls = _build()
        globals()["SAGETrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
