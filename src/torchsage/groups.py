"""Per-distribution losses from one mixed batch whose samples carry a group (domain or task) id.

SAGE's closure returns one loss per distribution. Data often comes as one loader whose batches mix
the distributions, with a column saying where each sample comes from (a domain id, WILDS-style
metadata, a task column). :func:`group_losses` turns the per-sample losses of such a batch into
the per-distribution losses, named by group, ready to be returned by the closure.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["group_counts", "group_losses", "group_sizes"]

WEIGHTINGS = ("uniform", "count")
ABSENT = ("skip", "error")


def check_options(weighting: str, absent: str) -> None:
    """ValueError unless ``weighting`` and ``absent`` are known values."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if absent not in ABSENT:
        raise ValueError(f"absent must be one of {', '.join(ABSENT)}, got {absent!r}")


def _present_groups(group_ids: Any, n: int, device: torch.device) -> tuple[list[Hashable], Tensor, list[int]]:
    """(the labels present, each sample's index into them, each label's sample count)."""
    if hasattr(group_ids, "__array__") and not isinstance(group_ids, Tensor):
        group_ids = torch.as_tensor(group_ids)
    if isinstance(group_ids, Tensor):
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
            raise ValueError(f"group_ids must hold integer ids, got a tensor of dtype {group_ids.dtype}")
        if group_ids.dim() != 1 or group_ids.numel() != n:
            raise ValueError(
                f"group_ids must hold one id per sample, shape ({n},), got {tuple(group_ids.shape)}"
            )
        labels, inverse, counts = torch.unique(
            group_ids, sorted=True, return_inverse=True, return_counts=True
        )
        return labels.tolist(), inverse.to(device), counts.tolist()
    if isinstance(group_ids, (str, bytes)) or not isinstance(group_ids, Sequence):
        raise ValueError(
            "group_ids must be a tensor of integer ids or a sequence of labels, "
            f"got {type(group_ids).__name__}"
        )
    if len(group_ids) != n:
        raise ValueError(f"group_ids must hold one id per sample ({n}), got {len(group_ids)}")
    position: dict[Hashable, int] = {}
    for label in group_ids:
        position.setdefault(label, len(position))
    index = [position[label] for label in group_ids]
    counts = [0] * len(position)
    for i in index:
        counts[i] += 1
    return list(position), torch.tensor(index, dtype=torch.long, device=device), counts


def _requested(groups: Sequence[Hashable] | Mapping[Hashable, Any], integer: bool) -> dict[Hashable, str]:
    """The requested groups, in order, with their names."""
    if isinstance(groups, Mapping):
        named = {g: str(name) for g, name in groups.items()}
    elif isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise ValueError(
            f"groups must be a sequence of ids or a mapping id -> name, got {type(groups).__name__}"
        )
    else:
        named = {g: str(g) for g in groups}
        if len(named) != len(groups):
            raise ValueError(f"groups lists an id twice: {list(groups)}")
    if integer:
        try:
            named = {operator.index(g): name for g, name in named.items()}
        except TypeError:
            raise ValueError(
                f"group_ids is an integer tensor, so groups must be integers, got {list(named)}"
            ) from None
    if not named:
        raise ValueError("groups is empty")
    return named


def _grouping(
    group_ids: Any, groups: Any, n: int, device: torch.device, absent: str
) -> tuple[dict[Hashable, str], list[Hashable], Tensor, list[int]]:
    """(requested groups -> names, the labels present, each sample's index into them, counts)."""
    if absent not in ABSENT:
        raise ValueError(f"absent must be one of {', '.join(ABSENT)}, got {absent!r}")
    if n == 0:
        raise ValueError("the batch is empty: grouping needs at least one sample")
    labels, inverse, counts = _present_groups(group_ids, n, device)
    if groups is None:
        named = {g: str(g) for g in labels}
    else:
        named = _requested(groups, integer=isinstance(group_ids, Tensor) or hasattr(group_ids, "__array__"))
        unknown = [g for g in labels if g not in named]
        if unknown:
            raise ValueError(
                f"the batch has samples of groups {unknown} that are not in groups={list(named)}: "
                "add them to groups, or filter those samples out"
            )
    if len(set(named.values())) != len(named):
        raise ValueError(f"two groups have the same name: {list(named.values())}")
    missing = [g for g in named if g not in labels]
    if missing and absent == "error":
        raise ValueError(
            f"groups {missing} have no sample in this batch; use absent='skip' to leave them out of "
            "the step, or sample batches that hold every group"
        )
    return named, labels, inverse, counts


def group_losses(
    per_sample_loss: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    groups: Sequence[Hashable] | Mapping[Hashable, Any] | None = None,
    *,
    weighting: str = "uniform",
    absent: str = "skip",
) -> dict[str, Tensor]:
    r"""The loss of each group (distribution) in a mixed batch, named by group.

    With the batch's per-sample losses :math:`\ell_i`, the groups present :math:`k = 1..K`, their
    sample counts :math:`n_k` and :math:`N = \sum_k n_k`, the loss of group :math:`k` is

    * ``weighting="uniform"``: its mean :math:`L_k = \frac{1}{n_k} \sum_{i \in k} \ell_i`. The
      optimizer's mean of the returned losses, :math:`\frac{1}{K} \sum_k L_k`, weighs every group
      present equally, whatever its share of the batch.
    * ``weighting="count"``: :math:`\frac{K n_k}{N} L_k`, so that the optimizer's mean of the
      returned losses is the per-sample mean :math:`\frac{1}{N} \sum_i \ell_i` of the whole batch,
      as plain training on the mixed batch would use. Each group's gradient is then scaled by
      :math:`K n_k / N`: the cosine disagreement does not change (it compares directions), the
      variance measures do (a group with few samples counts less in them too). For any code that
      averages the losses itself. With torchsage's optimizers the same objective comes from
      ``"uniform"`` losses and ``optimizer.step(closure, weights=group_counts(group_ids, groups))``,
      which leaves each group's gradient unscaled and weighs the disagreement statistics by
      :math:`n_k / N` instead.

    A group with no sample in the batch has no loss (the mean of nothing is ``nan``): it is left
    out of the result (``absent="skip"``), so the optimizer measures the disagreement of the groups
    present and :math:`K` counts only those; ``absent="error"`` raises a :class:`ValueError`
    naming the missing groups instead. The closure is called twice per step on the same batch, so
    both passes see the same groups.

    Args:
        per_sample_loss: shape ``(N,)``, one loss per sample (e.g. ``F.cross_entropy(...,
            reduction="none")``).
        group_ids: each sample's group, shape ``(N,)``: an integer tensor, or a sequence of
            labels (ints, strings, any hashable).
        groups: the groups to report, in order: a sequence of ids (named ``str(id)``) or a mapping
            id -> name. ``None`` (default) reports the groups present in the batch, in sorted
            order for an integer tensor, in order of first appearance for a sequence of labels.
            A sample whose id is not among ``groups`` is an error.
        weighting: ``"uniform"`` (default) or ``"count"``, see above.
        absent: ``"skip"`` (default) or ``"error"``: what to do with a group of ``groups`` that has
            no sample in the batch.

    Returns:
        A dict group name -> scalar loss, in the order of ``groups``, which the closure can
        return as is.

    Example:
        >>> import torch, torchsage
        >>> loss = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
        >>> domain = torch.tensor([0, 0, 2, 2])
        >>> {k: round(v.item(), 3) for k, v in torchsage.group_losses(loss, domain, [0, 1, 2]).items()}
        {'0': 1.5, '2': 4.5}
        >>> losses = torchsage.group_losses(loss, domain, {0: "photo", 2: "sketch"}, weighting="count")
        >>> round(torch.stack(list(losses.values())).mean().item(), 3)  # the per-sample mean, 12 / 4
        3.0
    """
    check_options(weighting, absent)
    if not isinstance(per_sample_loss, Tensor):
        raise ValueError(f"per_sample_loss must be a tensor, got {type(per_sample_loss).__name__}")
    if per_sample_loss.dim() != 1:
        raise ValueError(
            f"per_sample_loss must hold one loss per sample, shape (N,), got {tuple(per_sample_loss.shape)}: "
            "compute it with reduction='none' (and average any other dimension per sample)"
        )
    if not per_sample_loss.dtype.is_floating_point:
        raise ValueError(f"per_sample_loss must be a floating-point tensor, got {per_sample_loss.dtype}")
    n = per_sample_loss.numel()
    named, labels, inverse, counts = _grouping(group_ids, groups, n, per_sample_loss.device, absent)
    sums = per_sample_loss.new_zeros(len(labels)).index_add(0, inverse, per_sample_loss)
    count = torch.tensor(counts, dtype=per_sample_loss.dtype, device=per_sample_loss.device)
    means = sums / count
    if weighting == "count":
        means = means * (count * (len(labels) / n))  # K n_k / N: the mean over groups is the sample mean
    position = {g: i for i, g in enumerate(labels)}
    return {name: means[position[g]] for g, name in named.items() if g in position}


def group_counts(
    group_ids: Tensor | Sequence[Hashable],
    groups: Sequence[Hashable] | Mapping[Hashable, Any] | None = None,
    *,
    absent: str = "skip",
) -> list[int]:
    """The number of samples of each group present in the batch, in :func:`group_losses`' order.

    With ``weighting="uniform"`` losses, ``optimizer.step(closure, weights=group_counts(ids,
    groups))`` descends on the batch's per-sample mean (weights ``n_k / N``) and weighs the
    disagreement statistics by the same shares, the authors' treatment of one merged batch. Same
    arguments and errors as :func:`group_losses`.

    Example:
        >>> import torch, torchsage
        >>> torchsage.group_counts(torch.tensor([2, 0, 2, 2]), [0, 1, 2])
        [1, 3]
    """
    return list(group_sizes(group_ids, groups, absent=absent).values())


def group_sizes(
    group_ids: Tensor | Sequence[Hashable],
    groups: Sequence[Hashable] | Mapping[Hashable, Any] | None = None,
    *,
    absent: str = "skip",
) -> dict[str, int]:
    """Each group present in the batch -> its number of samples, named and ordered as
    :func:`group_losses` names its losses: the ``sizes`` of one micro-batch for
    :class:`torchsage.MicroBatches`. Same arguments and errors as :func:`group_losses`.

    Example:
        >>> import torch, torchsage
        >>> torchsage.group_sizes(torch.tensor([2, 0, 2, 2]), {0: "photo", 2: "sketch"})
        {'photo': 1, 'sketch': 3}
    """
    n = group_ids.numel() if isinstance(group_ids, Tensor) else len(group_ids)
    named, labels, _, counts = _grouping(group_ids, groups, n, torch.device("cpu"), absent)
    position = {g: i for i, g in enumerate(labels)}
    return {name: counts[position[g]] for g, name in named.items() if g in position}
