"""The two-pass sharpness-aware step shared by SAM, ASAM, SAGE and their variants.

One step is:

1. **clean pass** at the weights ``w``: the closure's per-distribution losses are differentiated;
   the mean gradient (and, when the ascent rule or the descent needs them, streaming statistics
   of the per-distribution gradients) is formed;
2. **ascent**: the ascent rule turns them into a perturbation ``e``; the weights move to ``w + e``;
3. **perturbed pass** at ``w + e``: the gradient of the mean loss is taken, then ``w`` is restored
   bit for bit from a saved copy;
4. **descent**: an optional hook edits the descent gradient (SAGE adds noise), after optional
   clipping, and the base optimizer steps.

SAM, ASAM and SAGE differ only in their :class:`AscentRule` and in the descent hook. Each pass
is one of the closure protocols of :mod:`torchsage.optim._closure` and returns one record
(:class:`~torchsage.optim._closure.Pass`); where the descent direction comes from (the mean loss or
a multi-task solver) is a strategy of :mod:`torchsage.optim._descent`, chosen at construction. The
options every optimizer shares are declared once, on :class:`SharpnessAware`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchsage.disagreement import GradientStatistics, global_norm
from torchsage.optim import _checks
from torchsage.optim._closure import Closure, Pass, Passes, frozen_bn_stats
from torchsage.optim._descent import make_descent
from torchsage.optim._distributed import make_data_parallel
from torchsage.optim._schedule import check_schedule
from torchsage.optim._shards import check_sharded, local_shards, shard_group
from torchsage.optim._solver import check_solver
from torchsage.optim._step_info import StepInfo
from torchsage.optim._weights import mean_loss, step_weights

__all__ = ["AscentRule", "SharpnessAware", "StepInfo", "frozen_bn_stats", "shares_options"]


class AscentRule:
    """Maps the clean mean gradient to a perturbation of the weights.

    A rule reads each parameter's mean gradient from ``p.grad`` and the radius from
    ``group["rho"]``. Subclasses set the class attributes below to ask the optimizer for
    per-distribution statistics, and implement :meth:`perturbation`.
    """

    #: per-distribution gradients must be streamed into :class:`GradientStatistics`
    needs_statistics: bool = False
    #: the statistics must include normalised gradients (cosine measure)
    cosine: bool = False
    #: the statistics must include the per-coordinate variance
    elementwise: bool = False

    def perturbation(
        self, groups: Sequence[tuple[dict[str, Any], list[Tensor]]], stats: GradientStatistics | None
    ) -> list[list[Tensor]]:
        """One perturbation tensor per parameter of each ``(group, params)`` pair.

        ``params`` holds only parameters that have a gradient; ``stats`` is given when
        :attr:`needs_statistics` is set and is laid out like the concatenation of all ``params``.
        """
        raise NotImplementedError


class SharpnessAware(Optimizer):
    """Two-pass sharpness-aware optimizer around a base optimizer, with a pluggable ascent rule.

    Not used directly: :class:`torchsage.SAM` and :class:`torchsage.SAGE` build on it.

    Args:
        params: parameters or parameter groups; groups may set their own ``rho`` (and the
            options of subclasses) besides the base optimizer's options.
        base_optimizer: a :class:`torch.optim.Optimizer` class (or a callable returning an
            optimizer) built on this optimizer's parameter groups with ``**base_kwargs``.
        ascent: the ascent rule.
        defaults: this optimizer's own per-group options; must include ``rho``.
        model: when given, BatchNorm running statistics of ``model`` are not updated on the
            perturbed pass (unless ``update_bn_on_perturbed``).
        max_grad_norm: clips the descent gradient to this global L2 norm (clipping before the
            ascent would be undone by its normalisation).
        on_nonfinite: ``"raise"`` a :class:`FloatingPointError` naming the distribution, or
            ``"skip"`` the step; either way parameters and optimizer state are left unchanged.
        solver: multi-task learning: a torchjd aggregator (``torchjd.aggregation.UPGrad()``, ...),
            a torchjd scalarizer (``torchjd.scalarization.UW(T)``, ...) or ``"mean"``. The
            distributions are then tasks: the parameters two or more task losses reach are the
            shared ones (found from the autograd graph), the disagreement is measured on them, and
            the descent direction at the perturbed weights is the solver's (see docs/mtl.md).
            ``None`` (default) descends on the mean loss.
        solver_update: for solvers that learn from each step's effect (FAMO's ``update``): the
            task losses "before" the step are the ``"clean"`` ones (default, at ``w``) or the
            ``"perturbed"`` ones (at ``w + e``, as the SAGE authors' multi-task code does); the
            losses "after" are always recomputed on the same batch at the new weights.
        process_group: data-parallel training (see docs/distributed.md): ``"auto"`` (default)
            averages every gradient over the default ``torch.distributed`` group when one is
            initialized with two or more processes; a group object uses that group; ``None``
            turns communication off. Parameters start from rank 0's.
        layout: what each process holds: ``"shards"`` (a shard of every distribution's batch)
            or ``"domains"`` (whole distributions, the statistics are merged across processes).
        ascent_schedule: when the ascent runs: ``None`` (every step, as in the paper),
            :class:`torchsage.optim.EveryK` or :class:`torchsage.optim.Triggered`; the other steps
            are one pass (see :mod:`torchsage.optim._schedule`). Its state is part of
            :meth:`state_dict`.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., Optimizer],
        ascent: AscentRule,
        defaults: dict[str, Any],
        *,
        model: nn.Module | None = None,
        update_bn_on_perturbed: bool = False,
        max_grad_norm: float | None = None,
        on_nonfinite: str = "raise",
        solver: Any = None,
        solver_update: str = "clean",
        process_group: Any = "auto",
        layout: str = "shards",
        ascent_schedule: Any = None,
        **base_kwargs: Any,
    ) -> None:
        if solver_update not in ("clean", "perturbed"):
            raise ValueError(f"solver_update must be 'clean' or 'perturbed', got {solver_update!r}")
        self.solver_update = solver_update
        if solver is not None and ascent.needs_statistics and self.disagreement_scope != "all":
            raise ValueError(
                f"{type(self).__name__} with a solver needs disagreement_scope='all': its ascent "
                "needs the statistics of every parameter, not only the shared ones"
            )
        _checks.check_base_optimizer(base_optimizer, type(self).__name__)
        _checks.check_options(type(self), base_optimizer, base_kwargs)
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.ascent = ascent
        self.model = model
        self.update_bn_on_perturbed = update_bn_on_perturbed
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        self.solver = check_solver(solver)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, Optimizer):
            raise ValueError("base_optimizer(...) must return a torch.optim.Optimizer")
        # One list of groups and one state shared with the base optimizer, so LR schedulers
        # attached to this wrapper drive the base optimizer, and its moments are saved.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._check_group(group)
        # FSDP2 shards reduce their gradients themselves (reduce-scatter after each backward)
        sharded = check_sharded(self._all_params(), type(self).__name__, self._unsharded_reason())
        self._parallel = None if sharded else make_data_parallel(process_group, layout, model, self.solver)
        if self._parallel is not None:
            self._parallel.broadcast_state(self._all_params())
        self.passes = Passes(
            type(self).__name__, self._parallel, model, self._statistics, self.disagreement_scope
        )
        if sharded:
            self.passes.shard(shard_group(self._all_params()))
            self.ascent = self._sharded_ascent(self.passes.shard_group)
        self.descent = make_descent(self.passes, self.solver, solver_update)
        self.schedule = check_schedule(ascent_schedule)
        self.schedule.check(self)

    # -- options -----------------------------------------------------------------------------

    #: the per-group options this optimizer adds to the base optimizer's (finite numbers >= 0)
    group_options: tuple[str, ...] = ("rho",)

    #: what the clean pass measures that an ascent schedule may follow
    measures: tuple[str, ...] = ("squared_grad_norm",)

    def _check_group(self, group: dict[str, Any]) -> None:
        for name in self.group_options:
            _checks.check_nonnegative(name, group[name])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "base_optimizer"):
            for name, default in self.base_optimizer.defaults.items():
                param_group.setdefault(name, default)
            self._check_group(param_group)

    # -- hooks for subclasses ----------------------------------------------------------------

    def _wants_statistics(self) -> bool:
        """Whether per-distribution statistics are needed (ascent rule or descent)."""
        return self.ascent.needs_statistics

    def _statistics(self, params: list[Tensor]) -> GradientStatistics:
        return GradientStatistics(params, cosine=self.ascent.cosine, elementwise=self.ascent.elementwise)

    def _measure(self, stats: GradientStatistics | None) -> dict[str, float]:
        """Reads what the descent needs from the clean-pass statistics, before anything edits
        the gradients (the mean gradient and ``p.grad`` may be the same tensor)."""
        return {}

    #: with a solver, the parameters the disagreement statistics cover: ``"shared"`` (those two or
    #: more tasks reach) or ``"all"`` (every parameter a task reaches; other tasks' heads count as
    #: zero gradient)
    disagreement_scope: str = "shared"

    #: keep the clean mean gradient for :meth:`_descent` (GSAM and SAGM combine it with the
    #: perturbed one); costs one gradient copy during the perturbed pass.
    needs_clean_gradient: bool = False

    #: steps FSDP2 (``fully_shard``, DTensor) parameters: the ascent and descent need only global
    #: norms and elementwise operations, which DTensors take as they are
    supports_sharded_parameters: bool = False

    # GradScaler.step hands optimizers with this flag the scale instead of unscaling their stale
    # gradients itself; step() turns that call into a clear error (see torchsage.amp.scaled_step).
    _step_supports_amp_scaling: bool = True

    def _unsharded_reason(self) -> str | None:
        """Why this optimizer cannot step FSDP2 shards (None: it can)."""
        if self.solver is not None:
            return (
                "a multi-task solver's task Jacobian would be taken on each process's shard alone: "
                "drop solver= on the sharded model"
            )
        if not self.supports_sharded_parameters:
            return (
                f"{type(self).__name__} does not declare supports_sharded_parameters (its ascent or "
                "descent may sum over one process's shard only): use SAM, SAGE or their variants"
            )
        return None

    def _sharded_ascent(self, group: Any) -> AscentRule:
        """The ascent rule for FSDP2 shards (``group``: the mesh's process group); the rules of SAM,
        ASAM and SAGM take DTensors as they are."""
        return self.ascent

    def _descent(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor]]],
        measured: dict[str, float],
        clean: dict[Tensor, Tensor] | None,
    ) -> dict[str, float]:
        """Edits the descent gradients in place; returns extra fields for :class:`StepInfo`.

        ``clean`` maps each perturbed parameter to its clean mean gradient when
        :attr:`needs_clean_gradient` is set and a perturbed pass took place, else it is None.
        """
        return {}

    def _noise_generators_state(self) -> dict[str, Any]:
        return {}

    def _load_noise_generators_state(self, state: dict[str, Any]) -> None:
        pass

    # -- the step ----------------------------------------------------------------------------

    def _active(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _skip(self, params: list[Tensor], record: Pass, message: str) -> StepInfo:
        for p in params:
            p.grad = None
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        losses = record.losses
        return StepInfo(
            loss=float(losses.mean()), losses=tuple(losses.tolist()), skipped=True, names=tuple(record.names)
        )

    def _check_call(self, closure: Closure | None) -> None:
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure: optimizer.step(closure), where closure() "
                "runs the forward pass and returns one loss per distribution (a list or a dict; "
                "torchsage.group_losses builds it from a mixed batch) without calling backward. A "
                "trainer that calls optimizer.step() by itself cannot drive the two passes: see "
                "docs/integrations.md for PyTorch Lightning and the Hugging Face Trainer"
            )
        if "found_inf" in self.__dict__ or "grad_scale" in self.__dict__:  # set by GradScaler.step
            self.__dict__.pop("found_inf", None)
            self.__dict__.pop("grad_scale", None)
            raise ValueError(
                "GradScaler.step cannot drive a two-pass step (it would scale neither pass): use "
                "torchsage.amp.scaled_step(optimizer, closure, scaler), then scaler.update()"
            )

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, weights: Any = None) -> StepInfo:  # type: ignore[override]
        """One sharpness-aware step.

        Args:
            closure: called with no arguments at the clean and at the perturbed weights; returns
                the loss of each distribution (a list, a dict name -> loss, an iterator, or one
                scalar). It computes the forward pass only: the optimizer runs the backward
                passes. Losses from separate forward passes are fastest; losses sharing one
                forward graph work, but each per-distribution backward then traverses the whole
                graph. An iterator (a generator) keeps one distribution's graph alive at a time.
            weights: one positive weight per distribution, in the closure's order (normalised to
                sum 1: the batch sizes ``n_k`` give the shares ``n_k / N``); ``None`` weighs them
                equally. Both passes descend on ``sum_k w_k L_k`` (so with ``n_k / N`` the
                perturbed loss is the loss of the merged batch), and the disagreement statistics
                use the same weights (see :mod:`torchsage.disagreement`). Not with a solver.

        Returns:
            A :class:`StepInfo`.
        """
        self._check_call(closure)
        weights = step_weights(weights, self.solver, self._parallel)
        params = self._all_params()
        ascent = any(g["rho"] > 0 for g in self.param_groups) and self.schedule.planned()
        with self.passes.communication(clean=True), _checks.closure_errors(type(self).__name__):
            clean = self.descent.clean(closure, params, weights, self._wants_statistics(), ascent)
        grad_norm = global_norm([p.grad for p in params if p.grad is not None])
        problem = self.passes.problem(closure, params, clean, grad_norm, "at the clean weights")
        if problem is not None:
            return self._skip(params, clean, problem)
        measured = self._measure(clean.stats)
        ascent = self.schedule.decide(dict(measured, squared_grad_norm=float(grad_norm) ** 2)) and ascent
        before = clean.losses  # what a self-updating solver sees as the losses before the step

        groups = self._active()
        perturbed_loss, perturbation_norm, clean_grads, after = math.nan, 0.0, None, None
        if ascent and any(g["rho"] > 0 for g, ps in groups if ps):
            perturbation = [e for es in self.ascent.perturbation(groups, clean.stats) for e in es]
            clean.stats = clean.tasks = None  # their buffers (the clean mean gradient among them) can go
            moved = [p for _, ps in groups for p in ps]
            # The perturbed pass replaces p.grad, so a reference keeps the clean gradient alive.
            clean_grads = {p: p.grad for p in moved} if self.needs_clean_gradient else None
            saved = [p.detach().clone() for p in moved]  # restored bit for bit below
            perturbation_norm = float(self.passes.norm(perturbation))
            if moved:
                torch._foreach_add_(local_shards(moved), local_shards(perturbation))
            del perturbation
            try:
                bn = contextlib.nullcontext() if self.update_bn_on_perturbed else frozen_bn_stats(self.model)
                with bn, self.passes.communication(clean=False):
                    after, grad_norm = self.descent.perturbed(closure, params, weights)
                _checks.check_same_losses(clean.names, after.names)
                problem = self.passes.problem(closure, params, after, grad_norm, "at the perturbed weights")
                perturbed_loss = mean_loss(after.losses, weights)
            finally:
                if moved:
                    torch._foreach_copy_(local_shards(moved), local_shards(saved))
            del saved
            if problem is not None:
                return self._skip(params, clean, problem)
        else:
            clean, grad_norm = self.descent.without_ascent(closure, params, clean, grad_norm)
            if not torch.isfinite(grad_norm):
                problem = f"non-finite descent direction from the solver {self.solver!r}"
                return self._skip(params, clean, problem)
        groups = self._active()

        if self.max_grad_norm is not None:
            grads = [p.grad for _, ps in groups for p in ps]
            if grads:
                factor = (self.max_grad_norm / (grad_norm + 1e-12)).clamp(max=1.0)
                torch._foreach_mul_(local_shards(grads), factor.to(grads[0].dtype))
        extra = self._descent(groups, measured, clean_grads)
        self.base_optimizer.step()
        self.descent.after_step(closure, before, None if after is None else after.losses)
        return StepInfo(
            loss=mean_loss(clean.losses, weights),
            losses=tuple(clean.losses.tolist()),
            perturbed_loss=perturbed_loss,
            perturbation_norm=perturbation_norm,
            grad_norm=float(grad_norm),
            names=tuple(clean.names),
            **extra,
        )

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (moments included) plus this optimizer's noise state."""
        state = self.base_optimizer.state_dict()
        state["torchsage"] = dict(self._noise_generators_state(), **self._owner())
        state["torchsage"]["schedule"] = self.schedule.state_dict()
        return state

    def _owner(self) -> dict[str, str]:
        return {"optimizer": type(self).__name__, "base_optimizer": type(self.base_optimizer).__name__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`; one that does not fit (another optimizer's, another model's,
        not a state dict) raises ``ValueError`` and leaves this optimizer as it was."""
        _checks.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("torchsage", {}))
        owner = self._owner()
        _checks.check_state_owner(extra, owner["optimizer"], owner["base_optimizer"])
        for key in owner:
            extra.pop(key, None)
        schedule = extra.pop("schedule", None)
        if schedule is not None:  # refused before anything is loaded, if it is another schedule's
            copy.deepcopy(self.schedule).load_state_dict(schedule)
        previous = self._noise_generators_state()
        self._load_noise_generators_state(extra)  # checks it whole before the base state changes
        try:
            self.base_optimizer.load_state_dict(state_dict)
        except BaseException:
            self._load_noise_generators_state(previous)
            raise
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        if schedule is not None:
            self.schedule.load_state_dict(schedule)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ascent={type(self.ascent).__name__}, base={self.base_optimizer!r})"


def shares_options(cls: type[SharpnessAware]) -> type[SharpnessAware]:
    """Class decorator: the options every optimizer shares are declared once, on
    :class:`SharpnessAware`; a subclass takes them as ``**kwargs`` and passes them on. This shows
    them in the subclass's signature (``help``, ``inspect.signature``) after its own options."""
    init = cls.__dict__["__init__"]
    own = inspect.signature(init)
    shared = inspect.signature(SharpnessAware.__init__).parameters.values()
    mine = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in mine}
    common = [p for p in shared if p.kind == p.KEYWORD_ONLY and p.name not in names]
    rest = [p for p in shared if p.kind == p.VAR_KEYWORD]
    init.__signature__ = own.replace(parameters=[*mine, *common, *rest])
    return cls
