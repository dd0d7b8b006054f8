"""The base class of the domain-generalization algorithms (:class:`Algorithm`) and the type of
one training step's input (:data:`Minibatches`), in a module of their own so that
:mod:`torchsage.dg.algorithms` (the registry) and :mod:`torchsage.dg.algorithms_alignment` both
build on them without importing each other in a circle. Both names are re-exported by
:mod:`torchsage.dg.algorithms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchsage.dg.networks import classifier, featurizer

__all__ = ["Algorithm", "Minibatches"]

#: one ``(x, y)`` minibatch per training environment
Minibatches = Sequence[tuple[Tensor, Tensor]]


class Algorithm(nn.Module):
    """Base class: a network ``featurizer -> classifier`` and its optimizer (``hparams["optimizer"]``)."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, num_domains: int, hparams: dict[str, Any]
    ) -> None:
        super().__init__()
        self.hparams = hparams
        self.num_domains = num_domains
        self.featurizer = featurizer(input_shape, hparams)
        self.classifier = classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = self.make_optimizer()

    def base_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The base optimizer class and its options: Adam (DomainBed), or SGD with momentum 0.9."""
        options = {"lr": self.hparams["lr"], "weight_decay": self.hparams["weight_decay"]}
        name = self.hparams.get("optimizer", "adam")
        if name == "adam":
            return torch.optim.Adam, options
        if name == "sgd":
            return torch.optim.SGD, {**options, "momentum": 0.9}
        raise ValueError(f"unknown optimizer {name!r}: use 'adam' or 'sgd'")

    def make_optimizer(self) -> torch.optim.Optimizer:
        cls, options = self.base_optimizer()
        return cls(self.network.parameters(), **options)

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        return self.network(x)
