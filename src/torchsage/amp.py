"""Mixed precision with the two-pass optimizers: bf16 autocast, and float16 loss scaling.

bfloat16 has float32's exponent range, so gradients do not underflow: run the closure's forward
passes under ``torch.autocast(device_type, dtype=torch.bfloat16)`` and call ``step`` as usual; no
scaler is needed.

float16 needs loss scaling, and :class:`torch.amp.GradScaler`'s usual recipe
(``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``) does not fit a
sharpness-aware step: the optimizer runs the backward passes itself, twice per update, and
``GradScaler.unscale_`` may run only once per optimizer between two ``update`` calls.
:func:`scaled_step` is the recipe that fits:

* both passes' losses are multiplied by the scaler's current scale before their backward;
* every gradient is divided by that scale as it reaches its parameter (a hook), so the
  optimizer only ever sees unscaled gradients: the ascent, the disagreement, clipping and the
  descent are computed exactly as without scaling, and no ``unscale_`` call is involved;
* an inf or NaN in either pass skips the whole update (parameters, moments and noise generator
  untouched, ``StepInfo.skipped`` set) and is recorded in the scaler, so the ``scaler.update()``
  that ends the iteration (once per step, as usual) multiplies the scale by its backoff factor;
  a finite step lets the scale grow after ``growth_interval`` finite steps.

Example:
    >>> import torch, torchsage
    >>> from torchsage.amp import scaled_step
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = torchsage.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    >>> batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> def closure():
    ...     return [torch.nn.functional.cross_entropy(model(x), y) for x, y in batches]
    >>> info = scaled_step(opt, closure, scaler)  # forward passes under torch.autocast in practice
    >>> scaler.update()
    >>> info.skipped, scaler.get_scale()
    (False, 1024.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from torchsage.optim import MicroBatches, SharpnessAware, StepInfo

__all__ = ["AMP_DTYPES", "LossScaledOptimizer", "autocast", "scaled_step"]

#: ``--amp`` names -> autocast dtypes.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, amp: str | None) -> Any:
    """``torch.autocast(device_type, dtype)`` for ``amp`` in :data:`AMP_DTYPES`; ``None`` gives a
    disabled context (full precision)."""
    if amp is None:
        return torch.autocast(device_type, enabled=False)
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp {amp!r}: use one of {', '.join(AMP_DTYPES)} (or none)")
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp])


def _scaled(losses: Any, scale: float) -> Any:
    """The closure's return value with every loss multiplied by ``scale`` (same container)."""
    if isinstance(losses, Tensor):
        return losses * scale
    if isinstance(losses, Mapping):
        return {k: v * scale for k, v in losses.items()}
    if isinstance(losses, (list, tuple)):
        return [x * scale for x in losses]
    if isinstance(losses, Iterable):
        return (x * scale for x in losses)  # stays lazy: one distribution's graph at a time
    return losses  # let the optimizer name the problem


def _unscaled(info: StepInfo, scale: float) -> StepInfo:
    return dataclasses.replace(
        info,
        loss=info.loss / scale,
        losses=tuple(x / scale for x in info.losses),
        perturbed_loss=info.perturbed_loss / scale,
    )


def _optimizer_state(scaler: torch.amp.GradScaler, optimizer: SharpnessAware) -> dict[str, Any]:
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:  # pragma: no cover - a GradScaler without the per-optimizer record
        raise RuntimeError(
            f"this torch {torch.__version__} GradScaler keeps no per-optimizer state; "
            "torchsage.amp.scaled_step cannot record its inf checks"
        )
    return states[id(optimizer)]


def scaled_step(
    optimizer: SharpnessAware,
    closure: Callable[[], Any] | MicroBatches,
    scaler: torch.amp.GradScaler,
    *,
    weights: Any = None,
    scaler_steps: bool = False,
) -> StepInfo:
    """One step of a torchsage two-pass optimizer with float16 loss scaling.

    Use it in place of ``optimizer.step(closure)`` and call ``scaler.update()`` once after it (and
    after any other optimizer's ``scaler.step``), as in every GradScaler loop. Do not call
    ``scaler.scale``, ``scaler.unscale_`` or ``scaler.step`` on this optimizer.

    Args:
        optimizer: a :class:`torchsage.optim.SharpnessAware` (SAM, ASAM, GSAM, SAGM, SAGE, ...).
        closure: as for ``optimizer.step``: returns the per-distribution losses, unscaled.
        scaler: a :class:`torch.amp.GradScaler`; a disabled one gives a plain ``step``.
        weights: the per-distribution weights of ``optimizer.step``.
        scaler_steps: for a framework that calls ``scaler.step(optimizer)`` and
            ``scaler.update()`` itself after the training step (the Hugging Face Trainer, through
            accelerate): the step's inf check is recorded as an ``unscale_``, so that
            ``scaler.step`` takes it instead of checking again, and calls ``optimizer.step()``,
            which the framework must make a no-op; ``scaler.update()`` then reads the inf check.

    Returns:
        The :class:`~torchsage.optim.StepInfo` with unscaled losses; ``skipped`` is True when an
        inf or NaN made the update a no-op (the scale is then reduced by ``scaler.update()``).

    Raises:
        ValueError: ``optimizer`` is not a torchsage two-pass optimizer, or the scaler already
            unscaled or stepped this optimizer since its last ``update()``.
    """
    if not isinstance(optimizer, SharpnessAware):
        raise ValueError(
            f"scaled_step drives torchsage's two-pass optimizers, got {type(optimizer).__name__}; "
            "use scaler.step(optimizer) for a one-pass optimizer"
        )
    if not isinstance(scaler, torch.amp.GradScaler):
        raise ValueError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return optimizer.step(closure, weights=weights)
    state = _optimizer_state(scaler, optimizer)
    stage = getattr(state.get("stage"), "name", None)
    if stage == "UNSCALED":
        raise ValueError(
            "scaler.unscale_(optimizer) was called before scaled_step: the optimizer unscales its "
            "gradients itself, once per pass; remove that call"
        )
    if stage == "STEPPED":
        raise ValueError(
            "this optimizer already stepped since the last scaler.update(): "
            "call scaler.update() once per step"
        )

    scale = scaler.get_scale()
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the scaler's scale must be a positive finite number, got {scale}")
    inverse = 1.0 / scale  # a power of two for the default factors: unscaling is exact
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    # Each gradient is unscaled as it reaches its parameter, before it is accumulated, so every
    # pass (and every per-distribution backward of the streamed statistics) sees true gradients.
    handles = [p.register_hook(lambda g: g * inverse) for p in params]
    saved_policy = optimizer.on_nonfinite
    optimizer.on_nonfinite = "skip"  # an overflow is the scaler's business: skip, never raise
    if isinstance(closure, MicroBatches):  # every micro-batch's losses scaled, still one at a time
        scaled: Any = closure.map(lambda losses: _scaled(losses, scale))
    else:
        scaled = lambda: _scaled(closure(), scale)  # noqa: E731
    try:
        info = optimizer.step(scaled, weights=weights)
    finally:
        optimizer.on_nonfinite = saved_policy
        for handle in handles:
            handle.remove()

    device = params[0].device if params else torch.device("cpu")
    found_inf = torch.full((), float(info.skipped), dtype=torch.float32, device=device)
    if scaler._scale is None:  # scale() initialises the scale and growth tracker on first use
        scaler.scale(torch.zeros((), device=device))
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    stages = type(state["stage"])
    state["stage"] = stages.UNSCALED if scaler_steps else stages.STEPPED
    return _unscaled(info, scale)


class LossScaledOptimizer:
    """A two-pass optimizer whose ``step(closure)`` is :func:`scaled_step` followed by
    ``scaler.update()``: hands float16 loss scaling to code that only calls ``optimizer.step``.

    Every other attribute (``param_groups``, ``state_dict``, ...) is the wrapped optimizer's; the
    scaler's own state is ``self.scaler.state_dict()``.
    """

    def __init__(self, optimizer: SharpnessAware, scaler: torch.amp.GradScaler) -> None:
        if not isinstance(optimizer, SharpnessAware):
            raise ValueError(
                f"LossScaledOptimizer wraps torchsage's two-pass optimizers, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.scaler = scaler

    def step(self, closure: Callable[[], Any]) -> StepInfo:
        info = scaled_step(self.optimizer, closure, self.scaler)
        self.scaler.update()
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["optimizer"], name)
