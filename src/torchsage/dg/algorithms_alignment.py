"""The gradient-alignment baselines SAGE is positioned against: Fish, AND-mask, SAND-mask, IGA and
GGA, each one entry of :data:`torchsage.dg.algorithms.ALGORITHMS` (the registry, which imports
them from here).

Fish, AND-mask, SAND-mask and IGA follow the equations of DomainBed's ``algorithms.py``; GGA
follows its authors' public code (Ballas and Diou, CVPR 2025) on top of this harness's ERM.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsage.dg.algorithm_base import Algorithm, Minibatches

__all__ = ["GGA", "IGA", "ANDMask", "Fish", "SANDMask", "and_mask", "min_pairwise_cosine", "sand_mask"]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def environment_gradients(
    predict: Callable[[Tensor], Tensor],
    minibatches: Minibatches,
    params: Sequence[Tensor],
    create_graph: bool = False,
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Each environment's risk and its ``[param]`` gradients (zeros where a parameter does not
    reach it), one environment at a time so that without ``create_graph`` only one graph lives."""
    losses, grads = [], []
    for x, y in minibatches:
        loss = F.cross_entropy(predict(x), y)
        g = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        losses.append(loss if create_graph else loss.detach())
        grads.append([torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)])
    return losses, grads


def _rescaled(mask: Tensor, mean: Tensor) -> Tensor:
    # the masked mean gradient, divided by the kept fraction so the step size stays comparable
    return mask * mean / (1e-10 + mask.mean())


def and_mask(grads: Tensor, tau: float) -> Tensor:
    """AND-mask (Parascandolo et al., ICLR 2021) of one parameter's environment gradients
    ``grads`` (shape ``(E, *shape)``): the mean gradient where the environments' signs agree,
    ``|mean_e sign(g_e)| >= tau``, zero elsewhere, divided by the fraction kept.

    Example:
        >>> and_mask(torch.tensor([[1.0, 2.0], [3.0, -2.0]]), tau=1.0)
        tensor([4., 0.])
    """
    mask = (torch.sign(grads).mean(0).abs() >= tau).to(grads.dtype)
    return _rescaled(mask, grads.mean(0))


def sand_mask(grads: Tensor, tau: float, k: float) -> Tensor:
    """SAND-mask (Shahtalebi et al., arXiv 2106.02266): the soft version of :func:`and_mask`,
    ``max(0, tanh(k (|mean_e sign(g_e)| - tau) / var_e(g_e)))`` with the unbiased variance over
    environments; undefined values (a zero variance at ``|.| = tau``, one environment) count as
    1e-17, as in DomainBed.

    Example:
        >>> sand_mask(torch.tensor([[1.0, 2.0], [3.0, -2.0]]), tau=0.5, k=10.0)
        tensor([4., 0.])
    """
    if len(grads) > 1:
        variance = grads.var(0)
    else:  # one environment: no variance (DomainBed's NaN, replaced by 1e-17)
        variance = torch.full_like(grads[0], 1e-17)
    agreement = torch.sign(grads).mean(0).abs()
    mask = torch.tanh(k * (agreement - tau) / variance).clamp_min(0.0)  # 0 / 0 stays NaN here
    return _rescaled(torch.nan_to_num(mask, nan=1e-17), grads.mean(0))


class _MaskedGradient(Algorithm):
    """The mean of the environment risks, stepped along a per-parameter mask of the environment
    gradients (the mask's fraction renormalised per parameter tensor)."""

    def combine(self, grads: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        params = _trainable(self.network)
        losses, grads = environment_gradients(self.predict, minibatches, params)
        self.optimizer.zero_grad()
        kept = []
        for i, p in enumerate(params):
            p.grad = self.combine(torch.stack([g[i] for g in grads]))
            kept.append((p.grad != 0).float().mean())
        self.optimizer.step()
        return {"loss": torch.stack(losses).mean().item(), "kept": torch.stack(kept).mean().item()}


class ANDMask(_MaskedGradient):
    """AND-mask (Parascandolo et al., ICLR 2021): :func:`and_mask` with threshold ``tau``."""

    def combine(self, grads: Tensor) -> Tensor:
        return and_mask(grads, self.hparams["tau"])


class SANDMask(_MaskedGradient):
    """SAND-mask (Shahtalebi et al., 2021): :func:`sand_mask` with ``tau`` and steepness ``k``.

    With ``tau >= 1`` (DomainBed's default is 1) the mask is zero wherever the environment
    gradients vary at all, so training does not progress; DomainBed's search draws ``tau`` from
    U(0, 1). A warning says so.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.hparams["tau"] >= 1:
            warnings.warn(
                f"SANDMask with tau={self.hparams['tau']} masks every coordinate whose environment "
                "gradients differ: training will not progress (choose tau < 1)",
                stacklevel=2,
            )

    def combine(self, grads: Tensor) -> Tensor:
        return sand_mask(grads, self.hparams["tau"], self.hparams["k"])


class IGA(Algorithm):
    """Inter-environmental Gradient Alignment (Koyama and Yamaguchi, arXiv 2008.01883): the mean
    risk plus ``penalty`` times ``sum_e ||g_e - g||^2``, the spread of the environment gradients
    ``g_e`` around their mean ``g`` (held constant), differentiated through ``g_e``."""

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        params = _trainable(self.network)
        losses, grads = environment_gradients(self.predict, minibatches, params, create_graph=True)
        mean = [torch.stack([g[i].detach() for g in grads]).mean(0) for i in range(len(params))]
        penalty = torch.stack([(gi - mi).square().sum() for g in grads for gi, mi in zip(g, mean)]).sum()
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad()
        (loss + self.hparams["penalty"] * penalty).backward()
        self.optimizer.step()
        return {"loss": loss.item(), "penalty": penalty.item()}


class Fish(Algorithm):
    """Fish (Shi et al., ICLR 2022): a copy of the network takes one step of the base optimizer on
    each environment in turn, then the network moves ``meta_lr`` of the way to the copy,
    ``w <- w + meta_lr (w_inner - w)`` (floating-point buffers alike).

    The base optimizer (``self.optimizer``) drives the copy and keeps its state across steps, as
    DomainBed's Fish reloads it; the network itself is only moved by the meta-update.
    """

    def make_optimizer(self) -> torch.optim.Optimizer:
        if "inner" not in self._modules:
            self.inner = copy.deepcopy(self.network)
        cls, options = self.base_optimizer()
        return cls(self.inner.parameters(), **options)

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        with torch.no_grad():
            for target, source in zip(self.inner.state_dict().values(), self.network.state_dict().values()):
                target.copy_(source)
        losses = []
        for x, y in minibatches:
            loss = F.cross_entropy(self.inner(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            for outer, inner in zip(self.network.state_dict().values(), self.inner.state_dict().values()):
                if outer.is_floating_point():
                    outer.add_(inner - outer, alpha=self.hparams["meta_lr"])
                else:
                    outer.copy_(inner)
        return {"loss": sum(losses) / len(losses)}


def min_pairwise_cosine(vectors: Sequence[Tensor]) -> Tensor:
    """The smallest cosine similarity between two of ``vectors`` (at least two).

    Example:
        >>> east, north = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
        >>> min_pairwise_cosine([east, east + north, north])
        tensor(0.)
    """
    if len(vectors) < 2:
        raise ValueError(f"min_pairwise_cosine needs at least two vectors, got {len(vectors)}")
    return torch.stack(
        [F.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(vectors, 2)]
    ).min()


class GGA(Algorithm):
    """Gradient-Guided Annealing (Ballas and Diou, CVPR 2025, arXiv 2502.20162) on ERM.

    At every step from ``gga_start_step`` to ``gga_end_step`` (inclusive), before the ERM step,
    ``gga_search_steps`` random moves search around the current weights ``w0``: each adds
    uniform noise in ``[-gga_neighborhood, gga_neighborhood]`` to every trainable weight, and the
    point is accepted when the minimum pairwise cosine of the environment gradients beats the best
    so far while the mean risk stays below the best accepted one plus ``gga_loss_tolerance``. A
    rejected point is the start of the next move; after an acceptance the walk restarts from
    ``w0``. The ERM step is then taken from the best point (``w0`` when none was accepted).
    Elsewhere the step is ERM's.

    As the authors' code: the noise and the criteria are theirs, their defaults (steps 100-150,
    250 moves, neighborhood 1e-6, tolerance 0.1). Unlike it: every trainable weight is perturbed
    (theirs: the 10th to 155th parameter tensors of their ResNet-50) and buffers (BatchNorm
    statistics) are restored after the search. The noise comes from torch's global generator
    (``torch.rand_like`` per parameter, in order). One process only: the search's decisions
    would differ between the slices of a data-parallel run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.num_domains < 2:
            raise ValueError(f"GGA aligns the gradients of 2+ training environments, got {self.num_domains}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ValueError("GGA's weight search runs in one process only: launch it without torchrun")

    def measure(self, minibatches: Minibatches) -> tuple[float, float]:
        """(minimum pairwise cosine of the environment gradients, mean risk) at the current weights."""
        losses, grads = environment_gradients(self.predict, minibatches, _trainable(self.network))
        flat = [torch.cat([g.flatten() for g in env]) for env in grads]
        return min_pairwise_cosine(flat).item(), torch.stack(losses).mean().item()

    @torch.no_grad()
    def _set(self, params: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        for p, v in zip(params, values):
            p.copy_(v)

    def anneal(self, minibatches: Minibatches) -> dict[str, float]:
        params = _trainable(self.network)
        start = [p.detach().clone() for p in params]
        buffers = [b.detach().clone() for b in self.network.buffers()]
        best, accepted = start, 0
        radius = self.hparams["gga_neighborhood"]
        try:
            best_cosine, best_loss = self.measure(minibatches)
            for _ in range(self.hparams["gga_search_steps"]):
                with torch.no_grad():
                    for p in params:
                        p.add_((torch.rand_like(p) * 2 - 1) * radius)
                cosine, loss = self.measure(minibatches)
                if loss - best_loss < self.hparams["gga_loss_tolerance"] and cosine > best_cosine:
                    best_cosine, best_loss, accepted = cosine, loss, accepted + 1
                    best = [p.detach().clone() for p in params]
                    self._set(params, start)
        finally:  # the best point found, or the start if the search failed midway
            self._set(params, best)
            self._set(list(self.network.buffers()), buffers)
        return {"gga_alignment": best_cosine, "gga_accepted": float(accepted)}

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        logged = {}
        if self.hparams["gga_start_step"] <= step <= self.hparams["gga_end_step"]:
            logged = self.anneal(minibatches)
        loss = torch.stack([F.cross_entropy(self.predict(x), y) for x, y in minibatches]).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), **logged}
