"""The SAGE authors' domain-generalization recipe in the DomainBed harness (``--preset``).

Two presets, both SAGE with the optimizer of the authors' public DG code
(:func:`torchsage.preset` ``("authors-dg")``: SGD lr 2e-3, momentum 0.9, weight decay 5e-4,
rho 0.01 scaled by ``||W||_F``, cosine disagreement, gamma 1.0, 5 Muon Newton-Schulz steps in
float32, BatchNorm statistics updated on both passes):

* ``"authors"``: their training recipe around it: one batch of ``batch_size`` (32) drawn from the
  union of the training domains, each domain's mean gradient weighted by its share ``n_k / N``
  (``SAGE.step(closure, weights=...)``; the perturbed loss is then the cross-entropy of the
  merged batch), one forward pass of the merged batch, the learning rate times 0.1 from 80% of the
  steps on (``lr_schedule: "step"``), and the ResNet's BatchNorm in training mode
  (``freeze_bn: false``) so that its statistics are updated on both passes;
* ``"authors-domainbed"``: the same optimizer values on DomainBed's protocol (a batch of 32 per
  training domain, equal weights, frozen BatchNorm, constant learning rate).

Where the values come from: the default arguments of the authors' public code, not numbers the
paper reports (see :mod:`torchsage.presets`). Their code trains 20 epochs; the harness counts steps
(DomainBed's 5001 unless ``--steps``). Their loader shuffles the union once per epoch; here the
merged batch is drawn with replacement, as the harness draws every batch. With gamma 1.0 the
noise is far above the gradient of a network trained from scratch (:mod:`torchsage.presets`
measures it): the preset reproduces their code, it is not a recommendation.

A preset run records its algorithm as ``SAGE@authors`` or ``SAGE@authors-domainbed``, so both sit
next to plain SAGE in one report, and the preset's values in its ``hparams``. ``--hparams``
overrides any of them; a random hyperparameter sample (``--hparams-seed``) varies only what the
preset does not set.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import torchsage
from torchsage.dg.algorithms import SAGE, Algorithm, canonical_algorithm

__all__ = [
    "DG_PRESETS",
    "AuthorsSAGE",
    "algorithm_class",
    "check_preset",
    "preset_hparams",
    "preset_label",
    "preset_variants",
]

#: ``--preset`` of ``dg train``; ``dg sweep --preset authors`` runs both
DG_PRESETS = ("authors", "authors-domainbed")


def _optimizer_values() -> dict[str, Any]:
    """The authors' DG optimizer (:func:`torchsage.preset`) as harness hyperparameters."""
    kwargs = torchsage.preset("authors-dg")
    if kwargs["base_optimizer"] is not torch.optim.SGD or kwargs["momentum"] != 0.9:
        raise AssertionError("authors-dg is SGD with momentum 0.9, the harness's 'sgd'")  # pragma: no cover
    keys = ("lr", "weight_decay", "rho", "rho_scaling", "disagreement", "gamma", "ns_steps", "polar_method")
    return {"optimizer": "sgd", **{k: kwargs[k] for k in keys}}


def preset_hparams(preset: str, dataset: str) -> dict[str, Any]:
    """The hyperparameters a preset sets (applied over the sampled ones, under ``--hparams``).

    Example:
        >>> preset_hparams("authors", "PACS")["lr_schedule"], preset_hparams("authors", "PACS")["lr"]
        ('step', 0.002)
    """
    from torchsage.dg.hparams import SMALL_IMAGE_DATASETS

    if preset not in DG_PRESETS:
        raise ValueError(f"unknown --preset {preset!r}: use one of {', '.join(DG_PRESETS)}")
    values = _optimizer_values()
    if preset == "authors":
        values.update(merged_batch=True, lr_schedule="step", batch_size=32)
        if dataset not in SMALL_IMAGE_DATASETS:
            values["freeze_bn"] = False
    return values


def preset_label(algorithm: str, preset: str | None) -> str:
    """The algorithm name a run records: ``SAGE@authors`` for a preset run, else ``algorithm``."""
    return algorithm if preset is None else f"{canonical_algorithm(algorithm)}@{preset}"


def preset_variants(algorithm: str, preset: str | None) -> list[str | None]:
    """The presets a sweep runs for ``algorithm``: with ``--preset authors``, SAGE runs both
    presets (the recipe next to the DomainBed protocol); other algorithms run as usual."""
    if preset is None:
        return [None]
    if preset != "authors":
        raise ValueError(
            f"dg sweep --preset must be 'authors' (it runs {' and '.join(DG_PRESETS)}), got {preset!r}"
        )
    return list(DG_PRESETS) if algorithm == "SAGE" else [None]


def check_preset(algorithm: str, preset: str | None) -> None:
    """Raises ValueError unless ``preset`` is None or a preset of SAGE."""
    if preset is None:
        return
    if preset not in DG_PRESETS:
        raise ValueError(f"unknown --preset {preset!r}: use one of {', '.join(DG_PRESETS)}")
    if canonical_algorithm(algorithm) != "SAGE":
        raise ValueError(
            f"--preset {preset} is the SAGE authors' recipe: use it with --algorithm SAGE, not {algorithm}"
        )


class AuthorsSAGE(SAGE):
    """SAGE with the presets' two extras: BatchNorm statistics updated on the perturbed pass too
    (``update_bn_on_perturbed``), and, with ``merged_batch``, one forward pass of the merged batch
    split into the domains' losses, weighted by their sizes."""

    def make_optimizer(self) -> torch.optim.Optimizer:
        cls, options = self.base_optimizer()
        options.update({k: self.hparams[k] for k in self.optimizer_hparams})
        return torchsage.SAGE(
            self.network.parameters(), cls, model=self.network, update_bn_on_perturbed=True, **options
        )

    def update(self, minibatches: Sequence[tuple[Tensor, Tensor]], step: int) -> dict[str, float]:
        if not self.hparams.get("merged_batch"):
            return super().update(minibatches, step)
        present = [(x, y) for x, y in minibatches if len(y)]  # a domain may draw no example
        sizes = [len(y) for _, y in present]
        x, y = torch.cat([b[0] for b in present]), torch.cat([b[1] for b in present])
        cuts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]

        def closure() -> list[Tensor]:  # one forward of the merged batch, split by domain
            out = self.predict(x)
            return [F.cross_entropy(out[a:b], y[a:b]) for a, b in itertools.pairwise(cuts)]

        info = self.optimizer.step(closure, weights=sizes)
        values = {"loss": info.loss, "perturbed_loss": info.perturbed_loss}
        values.update(disagreement=info.disagreement, noise_std=info.noise_std)
        return {k: v for k, v in values.items() if v == v}  # NaN: not measured


def algorithm_class(algorithm: type[Algorithm], preset: str | None) -> type[Algorithm]:
    """The class a run builds: :class:`AuthorsSAGE` under a preset, else ``algorithm``."""
    return algorithm if preset is None else AuthorsSAGE
