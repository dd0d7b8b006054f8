"""Named sets of :class:`torchsage.SAGE` arguments: the configurations of the authors' public code.

:func:`preset` returns a new dict of keyword arguments, the base optimizer and its options included,
so one line builds the optimizer and any value can be overridden::

    torchsage.SAGE(model.parameters(), **torchsage.preset("authors-dg"))
    torchsage.SAGE(model.parameters(), **{**torchsage.preset("authors-dg"), "lr": 1e-3})

Where the values come from: the default arguments of the training scripts the SAGE authors
(Ballas and Diou, arXiv 2605.07914) published with the paper, read from their code. They are
defaults of that code, not numbers the paper reports as tuned or as used for each table.

``"authors-dg"`` (their domain-generalization optimizer):
    SGD with lr 2e-3, momentum 0.9 and weight decay 5e-4; ``rho = 0.01`` scaled per weight
    matrix by its Frobenius norm (``rho * ||W||_F * polar(G)``; ``rho * g / ||g||`` per vector);
    the polar factor by 5 Newton-Schulz steps of Muon's quintic in float32; the cosine
    disagreement ``1 - mean pairwise cosine``; noise std ``gamma * D`` with ``gamma = 1.0``, added
    after the perturbed pass and before the SGD step (weight decay and momentum see it);
    BatchNorm running statistics updated on both passes (``update_bn_on_perturbed=True``, which
    also holds if you pass ``model=``). Their training loop draws one batch from all training
    domains together and weighs each domain's mean gradient by its share ``n_k / N``: pass the
    per-domain batch sizes as ``opt.step(closure, weights=[n_1, ..., n_K])``.

    **It does not train a network from scratch.** With ``gamma = 1.0`` and the cosine
    disagreement (about 0.9 for a small CNN) the noise has a standard deviation near 0.9 per
    coordinate, far above the gradient. Measured with ``python benchmarks/authors_gamma.py
    --gammas 1.0 0.001`` (a width-16 CNN from scratch on RotatedDigits, 400 steps, one seed):
    training accuracy 0.105 and held-out 0.087 with this preset (chance is 0.10), against 0.457
    and 0.368 with only ``gamma`` lowered to 1e-3 (docs/usage.md). **Nor does it fine-tune a
    pretrained one here**: EfficientNet-Lite0 from ImageNet, top blocks, EmojiStyles with Symbola
    held out, 400 steps, 10 trials: the training loss rose from 2.5 to 25-35 and accuracy fell to
    chance in every trial (docs/study.md, "The pretrained regime"). The preset reproduces their
    code; whether their published numbers came from it unchanged is not known.

``"authors-mtl"`` (their NYUv2 multi-task trainer):
    Adam with lr 1e-4; ``rho = 5e-4`` scaled by ``||W||_F``; the ``normalized_std``
    disagreement over all parameters (``disagreement_scope="all"``: a task's gradient counts as
    zero on the other tasks' heads), unclipped; ``gamma = 1e-4``; Newton-Schulz (5 Muon steps) in
    bfloat16. Pass the base multi-task method as ``solver=`` (the scope needs one; ``"mean"``
    for linear scalarization). They also compile the Newton-Schulz iteration
    (``ns_compile=True`` here, left off because it changes speed, not the step). Their trainer
    halves the learning rate every 100 epochs (``StepLR(opt, 100, 0.5)``), batch 2, 200 epochs:
    schedules and epochs are the harness's business, not the optimizer's.

``"authors-mtl-cityscapes"``:
    as ``"authors-mtl"`` with ``rho = 3e-3`` (their Cityscapes trainer; batch 8 there).

How these differ from :class:`torchsage.SAGE`'s own defaults (global rho scaling, the
``normalized_std`` measure on the shared parameters, ``gamma = 1e-3``, the base optimizer of your
choice) is set out in the SAGE docstring.

Example:
    >>> import torch, torchsage
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> opt = torchsage.SAGE(model.parameters(), **{**torchsage.preset("authors-dg"), "gamma": 0.0})
    >>> type(opt.base_optimizer).__name__, opt.param_groups[0]["rho"], opt.param_groups[0]["lr"]
    ('SGD', 0.01, 0.002)
    >>> domains = [(torch.randn(n, 4), torch.randint(0, 2, (n,))) for n in (12, 20)]
    >>> def closure():
    ...     return [torch.nn.functional.cross_entropy(model(x), y) for x, y in domains]
    >>> info = opt.step(closure, weights=[12, 20])  # the domains' shares of the batch
    >>> sorted(torchsage.PRESETS)
    ['authors-dg', 'authors-mtl', 'authors-mtl-cityscapes']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["PRESETS", "preset"]


def _authors_dg() -> dict[str, Any]:
    return dict(
        base_optimizer=torch.optim.SGD,
        lr=2e-3,
        momentum=0.9,
        weight_decay=5e-4,
        rho=0.01,
        rho_scaling="weight",
        disagreement="cosine",
        gamma=1.0,
        ns_steps=5,
        ns_coefficients="muon",
        ns_dtype=torch.float32,
        polar_method="newton_schulz",
        update_bn_on_perturbed=True,
    )


def _authors_mtl(rho: float) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        return dict(
            base_optimizer=torch.optim.Adam,
            lr=1e-4,
            rho=rho,
            rho_scaling="weight",
            disagreement="normalized_std",
            disagreement_scope="all",
            max_disagreement=None,
            gamma=1e-4,
            ns_steps=5,
            ns_coefficients="muon",
            ns_dtype=torch.bfloat16,
            polar_method="newton_schulz",
        )

    return build


_BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "authors-dg": _authors_dg,
    "authors-mtl": _authors_mtl(5e-4),
    "authors-mtl-cityscapes": _authors_mtl(3e-3),
}

#: every preset by name, each a function returning a new dict of SAGE keyword arguments
PRESETS: Mapping[str, Callable[[], dict[str, Any]]] = MappingProxyType(_BUILDERS)


def preset(name: str) -> dict[str, Any]:
    """A new dict of keyword arguments for :class:`torchsage.SAGE`, base optimizer included.

    Args:
        name: ``"authors-dg"``, ``"authors-mtl"`` or ``"authors-mtl-cityscapes"`` (see
            :mod:`torchsage.presets` for every value and where it comes from).

    Returns:
        A fresh dict (changing it changes no later call's result).

    Raises:
        ValueError: an unknown name; the message lists the known ones.

    Example:
        >>> import torchsage
        >>> kwargs = {**torchsage.preset("authors-mtl"), "lr": 3e-4}
        >>> kwargs["rho"], kwargs["rho_scaling"], kwargs["disagreement_scope"], kwargs["lr"]
        (0.0005, 'weight', 'all', 0.0003)
    """
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(_BUILDERS)}")
    return _BUILDERS[name]()
