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

SAM, ASAM and SAGE differ only in their :class:`AscentRule` and in the descent hook.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from torchsage.disagreement import GradientStatistics, global_norm
from torchsage.optim import _checks
from torchsage.optim._closure import (
    Closure,
    Losses,
    _check_loss,
    _checked_losses,
    _named_losses,
    frozen_bn_stats,
)
from torchsage.optim._distributed import LocalStream, make_data_parallel
from torchsage.optim._solver import TaskPass, check_solver, solve, task_pass
from torchsage.optim._step_info import StepInfo
from torchsage.optim._weights import check_count, mean_loss, step_weights

__all__ = ["AscentRule", "SharpnessAware", "StepInfo", "frozen_bn_stats"]


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
        self._parallel = make_data_parallel(process_group, layout, model, self.solver)
        if self._parallel is not None:
            self._parallel.broadcast_state(self._all_params())

    # -- options -----------------------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        rho = group["rho"]
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0 <= rho < math.inf):
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")

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

    # GradScaler.step hands optimizers with this flag the scale instead of unscaling their stale
    # gradients itself; step() turns that call into a clear error (see torchsage.amp.scaled_step).
    _step_supports_amp_scaling: bool = True

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

    def _call(self, closure: Closure, params: list[Tensor]) -> Losses:
        """Calls the closure (gradients cleared before); refuses one that ran backward itself."""
        losses = closure()
        if _checks.gradients_left_by_closure(params):
            raise ValueError(_checks.closure_backward_message(type(self).__name__))
        return losses

    def _check_reached(self, params: list[Tensor], which: str) -> None:
        """A loss that reaches no parameter would make the step a silent no-op."""
        if not _checks.gradients_left_by_closure(params):
            raise _checks.unreached_error(which)

    def _mean_gradient(
        self, closure: Closure, params: list[Tensor], weights: list[float] | None = None
    ) -> tuple[list[str], Tensor]:
        """Evaluates the closure and leaves the gradient of the (weighted) mean loss in ``p.grad``."""
        for p in params:
            p.grad = None
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
                return names, self._share_mean(params, torch.stack([x.detach() for x in checked]))
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
        return [str(k) for k in range(len(values))], self._share_mean(params, torch.stack(values))

    def _share_mean(self, params: list[Tensor], losses: Tensor) -> Tensor:
        """Data-parallel: averages the mean gradient over the processes; the losses to report."""
        return losses if self._parallel is None else self._parallel.mean_gradient(params, losses)

    def _communication(self, clean: bool) -> contextlib.AbstractContextManager[Any]:
        """Data-parallel: the context of a clean or perturbed pass (DDP's no_sync and so on)."""
        if self._parallel is None:
            return contextlib.nullcontext()
        return self._parallel.clean_pass() if clean else self._parallel.perturbed_pass()

    def _streamed_gradients(
        self, closure: Closure, params: list[Tensor], weights: list[float] | None = None
    ) -> tuple[list[str], Tensor, GradientStatistics, Tensor]:
        """Differentiates each distribution's loss on its own and streams its gradient.

        Each gradient is folded into the running statistics and dropped, so memory does not grow
        with the number of distributions; the mean gradient ends up in ``p.grad``. Returns
        (names, losses, statistics, per-distribution gradient norms).
        """
        for p in params:
            p.grad = None
        stats = self._statistics(params)
        values, norms, seen = [], [], [False] * len(params)
        with torch.enable_grad():
            names, losses, lazy = _named_losses(self._call(closure, params))
            count = None if lazy else len(losses)  # type: ignore[arg-type]
            stream = LocalStream(stats) if self._parallel is None else self._parallel.stream(stats, count)
            for k, loss in enumerate(losses):
                name = names[k] if names else str(k)
                loss = _check_loss(loss, name)
                if weights is not None:
                    check_count(weights, count if count is not None else k + 1, partial=count is None)
                values.append(loss.detach())
                # A list may share one forward graph across distributions: keep it until the last.
                loss.backward(retain_graph=count is not None and k < count - 1)
                self._check_reached(params, f"the loss of distribution {name}")
                stream.add([p.grad for p in params], 1.0 if weights is None else weights[k])
                for i, p in enumerate(params):
                    seen[i] = seen[i] or p.grad is not None
                    p.grad = None
        if not values:
            raise ValueError("the closure returned no loss")
        if weights is not None:
            check_count(weights, len(values))
        norms = stream.finish()
        reported = torch.stack(values)
        if self._parallel is not None:
            reported, seen = self._parallel.finish_stream(stats, reported, seen)
        for p, m, used in zip(params, stats.mean, seen):
            p.grad = m if used else None  # parameters no loss reached keep no gradient
        names = names or [str(k) for k in range(len(values))]
        return names, reported, stats, torch.stack(norms)

    def _task_gradients(
        self, closure: Closure, params: list[Tensor], statistics: bool, mean: bool = True
    ) -> tuple[list[str], Tensor, GradientStatistics | None, Tensor | None, TaskPass]:
        """Multi-task pass: the task losses' Jacobian on the shared parameters, each head's own
        gradient, the statistics of the shared rows (when asked) and, with ``mean``, the mean
        gradient in ``p.grad``. Returns (names, losses, statistics, per-task norms, the pass)."""
        for p in params:
            p.grad = None
        with torch.enable_grad():
            names, checked = _checked_losses(self._call(closure, params))
            tp = task_pass(names, checked, params)
        if not tp.shared and not tp.owned:
            raise _checks.unreached_error("none of the closure's losses")
        if self._parallel is not None:
            self._parallel.reduce_task_pass(tp)
        stats, norms = None, None
        if statistics and self.disagreement_scope == "all" and (tp.shared or tp.owned):
            # every parameter: a task's row is zero on the other tasks' heads
            stats = self._statistics([*tp.shared, *(p for p, _, _ in tp.owned)])
            norms = torch.stack(
                [
                    stats.update([*tp.rows(k), *(g if j == k else None for _, j, g in tp.owned)])
                    for k in range(len(checked))
                ]
            )
        elif statistics and tp.shared:
            stats = self._statistics(tp.shared)
            norms = torch.stack([stats.update(tp.rows(k)) for k in range(len(checked))])
        if mean:
            T = len(checked)
            for p, j in zip(tp.shared, tp.jacobian):
                p.grad = j.mean(0)
            for p, _, g in tp.owned:
                p.grad = g / T
        return names, tp.losses, stats, norms, tp

    def _solve(self, tp: TaskPass, params: list[Tensor]) -> Tensor:
        """Replaces ``p.grad`` by the solver's direction; returns its global norm."""
        for p in params:
            p.grad = None
        solve(self.solver, tp, {id(p) for p in params})
        return global_norm([p.grad for p in params if p.grad is not None])

    def _update_solver(self, closure: Closure, before: Tensor) -> None:
        """Solvers that learn from the step's effect (FAMO) see the task losses before the step
        (``solver_update`` says which) and the losses on the same batch after it (one forward,
        BatchNorm left alone)."""
        update = getattr(self.solver, "update", None)
        if not callable(update):
            return
        with torch.no_grad(), frozen_bn_stats(self.model):
            self.solver(before)  # records the losses before the step
            _, after, _ = _named_losses(closure())
            after = torch.stack([x.detach().reshape(()) for x in after])
            if self._parallel is not None:
                after = self._parallel.reduce_losses(after)
        update(after)

    def _locate_nonfinite(self, closure: Closure, params: list[Tensor]) -> str | None:
        """Which distribution has a non-finite gradient at the current weights (failure path).

        This extra pass leaves BatchNorm running statistics alone when ``model`` is known."""
        local = contextlib.nullcontext() if self._parallel is None else self._parallel.no_sync()
        with torch.enable_grad(), frozen_bn_stats(self.model), local:
            names, items = _checked_losses(closure())
            for k, (name, loss) in enumerate(zip(names, items)):
                for p in params:
                    p.grad = None
                loss.backward(retain_graph=k < len(items) - 1)
                grads = [p.grad for p in params if p.grad is not None]
                if grads and not all(torch.isfinite(n) for n in torch._foreach_norm(grads)):
                    return name
        return None

    def _problem(
        self,
        closure: Closure,
        params: list[Tensor],
        names: list[str],
        losses: Tensor,
        norms: Tensor | None,
        grad_norm: Tensor,
        where: str,
    ) -> str | None:
        """Describes the first non-finite loss or gradient, or returns None."""
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
            name = self._locate_nonfinite(closure, params)
            if name is None and self._parallel is not None:
                return f"non-finite gradient on another process {where}"
            return f"non-finite gradient in distribution {name} {where}"
        if self._parallel is not None and self._parallel.remote_problem:
            return f"non-finite loss on another process {where}"
        return None

    def _skip(self, params: list[Tensor], names: list[str], losses: Tensor, message: str) -> StepInfo:
        for p in params:
            p.grad = None
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        return StepInfo(
            loss=float(losses.mean()), losses=tuple(losses.tolist()), skipped=True, names=tuple(names)
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
        weights = step_weights(weights, self.solver, self._parallel)
        params = self._all_params()
        stats, norms, tp = None, None, None
        with self._communication(clean=True), _checks.closure_errors(type(self).__name__):
            if self.solver is not None and (
                self._wants_statistics() or not any(g["rho"] > 0 for g in self.param_groups)
            ):
                names, losses, stats, norms, tp = self._task_gradients(
                    closure, params, self._wants_statistics()
                )
            elif self._wants_statistics():
                names, losses, stats, norms = self._streamed_gradients(closure, params, weights)
            else:
                names, losses = self._mean_gradient(closure, params, weights)
        grad_norm = global_norm([p.grad for p in params if p.grad is not None])
        problem = self._problem(closure, params, names, losses, norms, grad_norm, "at the clean weights")
        if problem is not None:
            return self._skip(params, names, losses, problem)
        measured = self._measure(stats)

        groups = self._active()
        perturbed_loss = math.nan
        perturbation_norm = 0.0
        clean = None
        before = losses  # what a self-updating solver sees as the losses before the step
        perturbed = any(g["rho"] > 0 for g, ps in groups if ps)
        if perturbed:
            perturbation = [e for es in self.ascent.perturbation(groups, stats) for e in es]
            stats = tp = None  # their buffers (the clean mean gradient among them) are not needed any more
            moved = [p for _, ps in groups for p in ps]
            # The perturbed pass replaces p.grad, so a reference keeps the clean gradient alive.
            clean = {p: p.grad for p in moved} if self.needs_clean_gradient else None
            saved = [p.detach().clone() for p in moved]  # restored bit for bit below
            perturbation_norm = float(global_norm(perturbation))
            if moved:
                torch._foreach_add_(moved, perturbation)
            del perturbation
            try:
                bn = contextlib.nullcontext() if self.update_bn_on_perturbed else frozen_bn_stats(self.model)
                with bn, self._communication(clean=False):
                    if self.solver is not None:
                        pnames, plosses, _, _, ptp = self._task_gradients(closure, params, False, mean=False)
                        grad_norm = self._solve(ptp, params)
                        del ptp
                    else:
                        pnames, plosses = self._mean_gradient(closure, params, weights)
                        grad_norm = global_norm([p.grad for p in params if p.grad is not None])
                _checks.check_same_losses(names, pnames)
                problem = self._problem(
                    closure, params, pnames, plosses, None, grad_norm, "at the perturbed weights"
                )
                perturbed_loss = mean_loss(plosses, weights)
                if self.solver_update == "perturbed":
                    before = plosses
            finally:
                if moved:
                    torch._foreach_copy_(moved, saved)
            del saved
            if problem is not None:
                return self._skip(params, names, losses, problem)
            groups = self._active()
        elif self.solver is not None:
            if tp is None:  # rho > 0 only in groups without gradients: no perturbed pass after all
                with self._communication(clean=True):
                    names, losses, _, _, tp = self._task_gradients(closure, params, False, mean=False)
            grad_norm = self._solve(tp, params)
            tp = None
            if not torch.isfinite(grad_norm):
                problem = f"non-finite descent direction from the solver {self.solver!r}"
                return self._skip(params, names, losses, problem)
            groups = self._active()

        if self.max_grad_norm is not None:
            grads = [p.grad for _, ps in groups for p in ps]
            if grads:
                factor = (self.max_grad_norm / (grad_norm + 1e-12)).clamp(max=1.0)
                torch._foreach_mul_(grads, factor.to(grads[0].dtype))
        extra = self._descent(groups, measured, clean)
        self.base_optimizer.step()
        if self.solver is not None:
            self._update_solver(closure, before)
        return StepInfo(
            loss=mean_loss(losses, weights),
            losses=tuple(losses.tolist()),
            perturbed_loss=perturbed_loss,
            perturbation_norm=perturbation_norm,
            grad_norm=float(grad_norm),
            names=tuple(names),
            **extra,
        )

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (moments included) plus this optimizer's noise state."""
        state = self.base_optimizer.state_dict()
        state["torchsage"] = dict(self._noise_generators_state(), **self._owner())
        return state

    def _owner(self) -> dict[str, str]:
        return {"optimizer": type(self).__name__, "base_optimizer": type(self.base_optimizer).__name__}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("torchsage", {}))
        owner = self._owner()
        _checks.check_state_owner(extra, owner["optimizer"], owner["base_optimizer"])
        for key in owner:
            extra.pop(key, None)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._load_noise_generators_state(extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ascent={type(self.ascent).__name__}, base={self.base_optimizer!r})"
