"""When to take the ascent: every step (the paper), every k-th step, or when a statistic is high.

A schedule is asked twice per step. Before the clean pass, :meth:`AscentSchedule.planned` says
whether this step may take the ascent (when it may not, a multi-task solver takes its Jacobian at
the clean weights at once). After the clean pass, :meth:`AscentSchedule.decide` sees what that
pass measured and says whether the ascent and the perturbed pass run. A step without them is one
pass: the clean per-distribution gradients still set SAGE's disagreement and noise, and the base
optimizer steps on the clean mean gradient (plus the noise). Such a step reports
``perturbed_loss = nan`` in its :class:`~torchsage.optim.StepInfo`.

Every schedule but :class:`EveryStep` goes beyond the paper, which perturbs at every step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["AscentSchedule", "EveryK", "EveryStep", "Triggered"]


class AscentSchedule:
    """Base class: decides, step by step, whether the ascent (and the second pass) runs.

    A subclass overrides :meth:`decide` (and :meth:`planned` when it knows before the clean pass),
    and saves what it counts in :meth:`state_dict`. A schedule counts steps: give each optimizer
    its own.

    Example:
        >>> class OddSteps(AscentSchedule):  # the ascent at steps 1, 3, 5, ...
        ...     count = 0
        ...     def decide(self, measured):
        ...         self.count += 1
        ...         return self.count % 2 == 0
        >>> schedule = OddSteps()
        >>> [schedule.decide({"squared_grad_norm": 1.0}) for _ in range(4)]
        [False, True, False, True]
    """

    def check(self, optimizer: Any) -> None:
        """Raises ValueError when ``optimizer`` cannot follow this schedule."""

    def planned(self) -> bool:
        """Before the clean pass: whether this step may take the ascent."""
        return True

    def decide(self, measured: Mapping[str, float]) -> bool:
        """After the clean pass (once per step that was not skipped): whether the ascent runs.

        ``measured`` holds ``squared_grad_norm`` (of the clean mean gradient) and what the
        optimizer measured besides (SAGE: ``disagreement``).
        """
        return True

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, saved by the optimizer's ``state_dict``."""
        return {"schedule": type(self).__name__}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("schedule")
        if saved != type(self).__name__:
            raise ValueError(
                f"this state_dict was saved with the ascent schedule {saved}, not {type(self).__name__}: "
                f"build the optimizer with the same ascent_schedule to resume it"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EveryStep(AscentSchedule):
    """The ascent at every step, as in the paper (the default).

    Example:
        >>> import torch, torchsage
        >>> opt = torchsage.SAGE(torch.nn.Linear(3, 2).parameters(), torch.optim.SGD, lr=0.1)
        >>> opt.schedule
        EveryStep()
    """


class EveryK(AscentSchedule):
    """The ascent at steps 0, k, 2k, ...; one pass at the others (Composer's SAM ``interval``).

    Args:
        k: the interval; ``k = 1`` is every step.

    Example:
        >>> import torch, torchsage
        >>> model = torch.nn.Linear(3, 2)
        >>> calls = []
        >>> def closure():
        ...     calls.append(1)
        ...     return [model(torch.ones(4, 3)).square().mean(), model(-torch.ones(4, 3)).sum()]
        >>> opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1,
        ...                      ascent_schedule=torchsage.optim.EveryK(4))
        >>> for _ in range(8):
        ...     _ = opt.step(closure)
        >>> len(calls)  # two passes at steps 0 and 4, one at the other six
        10
    """

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = k
        self.count = 0

    def planned(self) -> bool:
        return self.count % self.k == 0

    def decide(self, measured: Mapping[str, float]) -> bool:
        ascend = self.planned()
        self.count += 1
        return ascend

    def state_dict(self) -> dict[str, Any]:
        return dict(super().state_dict(), k=self.k, count=self.count)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state["k"] != self.k:
            raise ValueError(f"this state_dict was saved with EveryK({state['k']}), not EveryK({self.k})")
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"EveryK({self.k})"


#: the statistics :class:`Triggered` can follow
TRIGGER_STATISTICS: tuple[str, ...] = ("squared_grad_norm", "disagreement")


class Triggered(AscentSchedule):
    r"""The ascent when a statistic of the clean pass is high against its running mean and spread.

    After each clean pass the statistic :math:`x_t` updates exponential moving averages
    :math:`\mu_t = \delta \mu_{t-1} + (1 - \delta) x_t` and
    :math:`\sigma^2_t = \delta \sigma^2_{t-1} + (1 - \delta)(x_t - \mu_t)^2` (started at
    :math:`\mu = x_1`, :math:`\sigma = 0`), and the ascent runs when
    :math:`x_t \ge \mu_t + c_t\,\sigma_t`. With ``statistic="squared_grad_norm"`` this is AE-SAM's
    rule (Jiang et al., 2023), whose :math:`c_t` moves linearly between two endpoints
    :math:`\lambda_1, \lambda_2` (hyperparameters) over the training's :math:`T` iterations:
    ``threshold=(lambda_1, lambda_2), ramp=T``; a number keeps :math:`c` constant.
    ``"disagreement"`` follows SAGE's own measure of how much the distributions' gradients
    disagree (only for optimizers that measure it).

    Args:
        statistic: ``"squared_grad_norm"`` (of the clean mean gradient) or ``"disagreement"``.
        threshold: :math:`c`, a number, or ``(start, end)``: :math:`c_t` = ``start + (end - start)
            * min(t / ramp, 1)`` at the ``t``-th decision (``t = 0, 1, ...``). For a statistic
            spread symmetrically about its mean, ``0`` takes the ascent at about half of the steps
            and ``1`` at about a sixth.
        decay: :math:`\delta`, in ``[0, 1)``.
        warmup: the first ``warmup`` steps all take the ascent (their statistics are recorded).
        ramp: the steps over which a ``(start, end)`` threshold moves (required with one, a
            positive integer; not allowed with a number).

    Example:
        >>> import torch, torchsage
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2)
        >>> schedule = torchsage.optim.Triggered("disagreement", threshold=0.5, warmup=2)
        >>> opt = torchsage.SAGE(model.parameters(), torch.optim.SGD, lr=0.1, ascent_schedule=schedule)
        >>> infos = []
        >>> for _ in range(20):  # two distributions, a fresh batch of each at every step
        ...     batches = [torch.randn(4, 3) + shift for shift in (0.0, 1.0)]
        ...     infos.append(opt.step(lambda: [model(x).square().mean() for x in batches]))
        >>> taken = sum(info.perturbed_loss == info.perturbed_loss for info in infos)  # not nan
        >>> 2 <= taken < 20, taken == schedule.ascents
        (True, True)
    """

    def __init__(
        self,
        statistic: str = "squared_grad_norm",
        threshold: float | tuple[float, float] = 0.0,
        decay: float = 0.9,
        warmup: int = 0,
        ramp: int | None = None,
    ) -> None:
        if statistic not in TRIGGER_STATISTICS:
            raise ValueError(
                f"unknown statistic {statistic!r}: use one of {', '.join(map(repr, TRIGGER_STATISTICS))}"
            )
        ends = tuple(threshold) if isinstance(threshold, (tuple, list)) else (threshold,)
        if len(ends) not in (1, 2) or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in ends
        ):
            raise ValueError(
                f"threshold must be a finite number or a pair (start, end) of them, got {threshold!r}"
            )
        if len(ends) == 2 and (isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 1):
            raise ValueError(
                f"a threshold (start, end) needs ramp, the number of steps it moves over (a positive "
                f"integer), got ramp={ramp!r}"
            )
        if len(ends) == 1 and ramp is not None:
            raise ValueError("ramp moves a threshold (start, end): give threshold=(start, end) or drop ramp")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
        self.statistic = statistic
        self.threshold = float(ends[0])
        self.threshold_end = float(ends[-1])
        self.ramp = ramp
        self.decay = float(decay)
        self.warmup = warmup
        self.count = 0
        self.ascents = 0
        self.mean = math.nan
        self.var = 0.0

    def check(self, optimizer: Any) -> None:
        if self.statistic == "disagreement" and "disagreement" not in optimizer.measures:
            raise ValueError(
                f"{type(optimizer).__name__} does not measure the disagreement: use "
                "Triggered('squared_grad_norm') or SAGE"
            )
        if optimizer.solver is not None and not optimizer._wants_statistics():
            raise ValueError(
                f"a Triggered schedule with a solver needs the task gradients at the clean weights, "
                f"which {type(optimizer).__name__} does not take before deciding: a skipped step would "
                "cost a second pass. Use EveryK, or SAGE"
            )

    def current_threshold(self) -> float:
        """:math:`c_t` of the next decision."""
        if self.ramp is None:
            return self.threshold
        return self.threshold + (self.threshold_end - self.threshold) * min(self.count / self.ramp, 1.0)

    def decide(self, measured: Mapping[str, float]) -> bool:
        x = float(measured[self.statistic])
        if not math.isfinite(x):
            raise ValueError(f"the {self.statistic} of this step is {x}: the trigger cannot follow it")
        if self.count == 0:
            self.mean = x
        else:
            self.mean = self.decay * self.mean + (1.0 - self.decay) * x
            self.var = self.decay * self.var + (1.0 - self.decay) * (x - self.mean) ** 2
        ascend = self.count < self.warmup or x >= self.mean + self.current_threshold() * math.sqrt(self.var)
        self.count += 1
        self.ascents += ascend
        return ascend

    def state_dict(self) -> dict[str, Any]:
        return dict(
            super().state_dict(),
            statistic=self.statistic,
            count=self.count,
            ascents=self.ascents,
            mean=self.mean,
            var=self.var,
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if state["statistic"] != self.statistic:
            raise ValueError(
                f"this state_dict was saved with a trigger on {state['statistic']}, not on {self.statistic}"
            )
        self.count, self.ascents = int(state["count"]), int(state["ascents"])
        self.mean, self.var = float(state["mean"]), float(state["var"])

    def __repr__(self) -> str:
        c = self.threshold if self.ramp is None else (self.threshold, self.threshold_end)
        ramp = "" if self.ramp is None else f", ramp={self.ramp}"
        options = f"threshold={c}, decay={self.decay}, warmup={self.warmup}{ramp}"
        return f"Triggered({self.statistic!r}, {options})"


def check_schedule(schedule: Any) -> AscentSchedule:
    """``schedule`` (``None``: :class:`EveryStep`) if it is an :class:`AscentSchedule`, else a ValueError."""
    if schedule is None:
        return EveryStep()
    if not isinstance(schedule, AscentSchedule):
        raise ValueError(
            f"ascent_schedule must be None or a torchsage.optim schedule (EveryK(k), Triggered(...)), "
            f"got {schedule!r}"
        )
    return schedule
