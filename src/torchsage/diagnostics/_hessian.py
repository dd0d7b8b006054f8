"""Hessian-vector products by double backward, for one loss and for the mean over distributions."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["hessian_vector_product"]

Batch = tuple[Any, Any]


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenates ``tensors`` (``None`` as zeros shaped like the matching ``like``) into one vector."""
    return torch.cat(
        [(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like, strict=True)]
    )


def unflatten(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Splits a flat vector (or a batch of them, along the last axis) into tensors shaped like ``like``."""
    parts = torch.split(v, [p.numel() for p in like], dim=-1)
    return [part.reshape(*v.shape[:-1], *p.shape) for part, p in zip(parts, like, strict=True)]


def check_params(params: Iterable[Tensor]) -> list[Tensor]:
    """The parameters as a list, checked: non-empty, requiring grad, one dtype and one device."""
    params = list(params)
    if not params:
        raise ValueError("no parameters to differentiate: params is empty")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError(f"parameter {i} is not a tensor that requires grad")
    if len({p.dtype for p in params}) > 1 or len({p.device for p in params}) > 1:
        raise ValueError("all parameters must share one dtype and one device (flat vectors are built)")
    return params


def _differentiable(grads: Sequence[Tensor | None]) -> list[int]:
    return [i for i, g in enumerate(grads) if g is not None and g.requires_grad]


def hvp_from_grads(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], v: Tensor, retain_graph: bool = False
) -> Tensor:
    """:math:`H v` from first-order gradients built with ``create_graph=True`` (flat ``v``, flat result).

    A gradient without a graph (the loss is at most linear in that parameter) contributes nothing.
    """
    keep = _differentiable(grads)
    if not keep:
        return torch.zeros_like(v)
    parts = unflatten(v.to(params[0].dtype), params)
    dot = sum((grads[i] * parts[i]).sum() for i in keep)
    hv = torch.autograd.grad(dot, params, retain_graph=retain_graph, allow_unused=True)
    return flatten(hv, params)


def hessian_rows(grads: Sequence[Tensor | None], params: Sequence[Tensor], V: Tensor) -> Tensor:
    """:math:`V H` for a batch of flat row vectors ``V`` (shape ``(m, n)``); the graph is retained.

    Uses ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the double backward);
    when an operation has no batching rule it falls back to one product per row.
    """
    keep = _differentiable(grads)
    if not keep:
        return torch.zeros_like(V)
    parts = unflatten(V.to(params[0].dtype), params)
    outputs = [grads[i] for i in keep]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            rows = torch.autograd.grad(
                outputs,
                params,
                grad_outputs=[parts[i] for i in keep],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        out = torch.cat(
            [
                (torch.zeros(V.shape[0], p.numel(), dtype=V.dtype, device=V.device) if r is None else r)
                .reshape(V.shape[0], -1)
                .to(V.dtype)
                for r, p in zip(rows, params)
            ],
            dim=1,
        )
    except (RuntimeError, NotImplementedError):
        out = torch.stack([hvp_from_grads(grads, params, row, retain_graph=True) for row in V])
    return out


def hessian_vector_product(loss_closure: Callable[[], Tensor], params: Iterable[Tensor], v: Tensor) -> Tensor:
    """Hessian-vector product :math:`H v = \\nabla_\\theta \\big(\\nabla_\\theta L(\\theta)^\\top v\\big)`.

    Double backward: the closure's scalar loss is differentiated once with ``create_graph=True``,
    the gradient is dotted with :math:`v`, and that scalar is differentiated again; the cost is
    about two to three gradient evaluations and no Hessian is formed. ``p.grad`` is not touched.

    An alternative with forward-mode AD is ``torch.func.jvp(torch.func.grad(f), (theta,), (v,))``
    on a functional loss ``f`` (e.g. built with ``torch.func.functional_call``); it avoids the
    retained first-order graph but needs every operation to support forward mode.

    Args:
        loss_closure: computes the scalar loss from the current parameter values (called once).
        params: the tensors :math:`\\theta` (all requiring grad, one dtype and device).
        v: flat vector with as many entries as ``params`` together, laid out in their order.

    Returns:
        :math:`H v` as a flat vector (parameters the loss does not depend on get zeros).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_vector_product(lambda: (w**3).sum(), [w], torch.tensor([1.0, 1.0]))  # diag(6 w)
        tensor([ 6., 12.])
    """
    params = check_params(params)
    n = sum(p.numel() for p in params)
    if v.shape != (n,):
        raise ValueError(f"v must be a flat vector of {n} entries, got shape {tuple(v.shape)}")
    with torch.enable_grad():
        loss = loss_closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_closure must return a scalar tensor")
        grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True, allow_unused=True)
        return hvp_from_grads(grads, params, v).to(v.dtype)


def to_device(obj: Any, device: torch.device) -> Any:
    """Moves the tensors in (nested tuples, lists and dicts of) ``obj`` to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)({k: to_device(v, device) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _is_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2


def as_batches(source: Any, k: int) -> list[Batch]:
    """One distribution's data as a list of ``(inputs, targets)`` batches.

    A 2-sequence holding a tensor, or one whose two entries are not both 2-sequences, is one
    batch; anything else is iterated once (a loader) and its batches kept.
    """
    if _is_pair(source) and (
        any(isinstance(x, Tensor) for x in source) or not all(_is_pair(x) for x in source)
    ):
        return [(source[0], source[1])]
    try:
        batches = list(source)
    except TypeError:
        raise ValueError(
            f"batches[{k}] must be an (inputs, targets) pair or an iterable of such pairs"
        ) from None
    if not batches:
        raise ValueError(f"batches[{k}] holds no batch")
    for b, batch in enumerate(batches):
        if not _is_pair(batch):
            raise ValueError(f"batch {b} of distribution {k} is not an (inputs, targets) pair")
    return [(x, y) for x, y in batches]


class MeanHessian:
    """The per-distribution losses :math:`L_k` (batch means) of a model and products with
    :math:`\\bar H = \\frac1K \\sum_k \\nabla^2 L_k`.

    Every product recomputes the forward pass of every batch (the graphs are not kept between
    products), so memory stays at one batch's double-backward graph.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor] | Sequence[Callable[[Any, Any], Tensor]],
        batches: Sequence[Sequence[Batch]],
        params: Sequence[Tensor],
    ) -> None:
        self.model = model
        # one loss function per distribution (a multi-task model's tasks read different outputs)
        self.loss_fns = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn] * len(batches)
        self.batches = batches
        self.params = list(params)
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.dim = sum(p.numel() for p in self.params)
        self.K = len(batches)
        self.products = 0

    def _loss(self, k: int, b: int) -> Tensor:
        inputs, targets = self.batches[k][b]
        loss_fn = self.loss_fns[k]
        loss = loss_fn(self.model(to_device(inputs, self.device)), to_device(targets, self.device))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        if not bool(torch.isfinite(loss).all()):
            raise ValueError(f"the loss of distribution {k}, batch {b} is not finite")
        return loss.reshape(())

    def _graphs(self) -> Iterable[tuple[float, list[Tensor | None]]]:
        """``(weight, first-order gradients with graph)`` per batch; the weights sum to 1."""
        for k, batches in enumerate(self.batches):
            for b in range(len(batches)):
                loss = self._loss(k, b)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                yield 1.0 / (self.K * len(batches)), list(grads)

    def gradients(self) -> tuple[list[float], list[Tensor]]:
        """Per-distribution mean losses and flat gradients :math:`g_k` (no graph)."""
        losses, grads = [], []
        with torch.enable_grad():
            for k, batches in enumerate(self.batches):
                loss_sum = 0.0
                g = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
                for b in range(len(batches)):
                    loss = self._loss(k, b)
                    gb = torch.autograd.grad(loss, self.params, allow_unused=True)
                    g.add_(flatten(gb, self.params), alpha=1.0 / len(batches))
                    loss_sum += float(loss.detach())
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(f"the gradient of distribution {k} is not finite")
                losses.append(loss_sum / len(batches))
                grads.append(g)
        return losses, grads

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`\\bar H v` for a flat ``v``."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for weight, grads in self._graphs():
                out.add_(hvp_from_grads(grads, self.params, v), alpha=weight)
        self.products += 1
        return out.to(v.dtype)

    def matrix(self, chunk: int = 32, progress: Callable[[int], None] | None = None) -> Tensor:
        """The full :math:`\\bar H` (``dim x dim``, symmetrised), built ``chunk`` rows at a time."""
        H = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for weight, grads in self._graphs():
                for start in range(0, self.dim, chunk):
                    rows = hessian_rows(grads, self.params, eye[start : start + chunk])
                    H[start : start + chunk].add_(rows, alpha=weight)
                    if progress is not None:
                        progress(rows.shape[0])
        self.products += self.dim
        return (H + H.T) / 2
