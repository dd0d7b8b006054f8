"""Domain-generalization algorithms: a registry of small classes with one interface.

Every algorithm owns a featurizer, a classifier and its optimizer, and implements
``update(minibatches, step) -> dict`` (one training step on one minibatch per training
environment, returning values to log) and ``predict(x) -> logits``. Each environment's minibatch
goes through its own forward pass, so the per-environment losses are what the sharpness-aware
optimizers need; their mean is the loss ERM minimises.

The sharpness-aware algorithms (SAM, ASAM, GSAM, SAGM, SAGE and its variants) are ERM with a
torchsage optimizer around the same base optimizer (Adam by default), nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsage
from torchsage.dg.networks import classifier, featurizer
from torchsage.optim import SAGEAlign, SAGEAlignmentOnly, SAGECurvatureOnly, SharpnessAware

__all__ = ["ALGORITHMS", "Algorithm", "get_algorithm"]

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


class ERM(Algorithm):
    """Empirical risk minimisation: the mean of the per-environment cross-entropies."""

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        loss = torch.stack([F.cross_entropy(self.predict(x), y) for x, y in minibatches]).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}


class _SharpnessAware(Algorithm):
    """ERM driven by a torchsage two-pass optimizer around Adam."""

    optimizer_class: Callable[..., SharpnessAware]
    #: hyperparameters passed to the optimizer under the same name
    optimizer_hparams: tuple[str, ...] = ("rho",)

    def make_optimizer(self) -> torch.optim.Optimizer:
        cls, options = self.base_optimizer()
        options.update({k: self.hparams[k] for k in self.optimizer_hparams})
        # model=: BatchNorm statistics are updated on the clean pass only
        return self.optimizer_class(self.network.parameters(), cls, model=self.network, **options)

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        def closure() -> list[Tensor]:
            return [F.cross_entropy(self.predict(x), y) for x, y in minibatches]

        info = self.optimizer.step(closure)
        values = {
            "loss": info.loss,
            "perturbed_loss": info.perturbed_loss,
            "disagreement": info.disagreement,
            "noise_std": info.noise_std,
        }
        return {k: v for k, v in values.items() if math.isfinite(v)}  # NaN: not measured


class SAM(_SharpnessAware):
    optimizer_class = torchsage.SAM


class ASAM(_SharpnessAware):
    optimizer_class = torchsage.ASAM
    optimizer_hparams = ("rho", "eta")


class GSAM(_SharpnessAware):
    optimizer_class = torchsage.GSAM
    optimizer_hparams = ("rho", "alpha")


class SAGM(_SharpnessAware):
    optimizer_class = torchsage.SAGM
    optimizer_hparams = ("rho", "alpha")


class _SAGEFamily(_SharpnessAware):
    # The noise seed defaults to torch.initial_seed(), which the training script sets from --seed.
    optimizer_hparams = ("rho", "gamma", "disagreement", "ns_steps", "rho_scaling")


class SAGE(_SAGEFamily):
    optimizer_class = torchsage.SAGE


class SAGE_CurvatureOnly(_SAGEFamily):  # registry names follow the ablations
    optimizer_class = SAGECurvatureOnly
    optimizer_hparams = ("rho", "disagreement", "ns_steps", "rho_scaling")


class SAGE_AlignmentOnly(_SAGEFamily):
    optimizer_class = SAGEAlignmentOnly
    optimizer_hparams = ("gamma", "disagreement")


class SAGE_Align(_SAGEFamily):
    optimizer_class = SAGEAlign
    optimizer_hparams = ("rho", "lambda_max", "disagreement", "ns_steps", "rho_scaling")


def _pairwise_mean(items: Sequence[Tensor], distance: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    total, pairs = items[0].new_zeros(()), 0
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            total = total + distance(items[i], items[j])
            pairs += 1
    return total / max(pairs, 1)


def coral_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference of the feature means plus that of the (unbiased) covariances."""
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    cov_a = (a - mean_a).T @ (a - mean_a) / max(len(a) - 1, 1)
    cov_b = (b - mean_b).T @ (b - mean_b) / max(len(b) - 1, 1)
    return (mean_a - mean_b).square().mean() + (cov_a - cov_b).square().mean()


def head_gradients(features: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample gradients of the cross-entropy with respect to a linear head ``(W, b)``,
    flattened as ``[vec(W), b]`` per row: ``(softmax(z) - onehot(y)) f^T`` and
    ``softmax(z) - onehot(y)``. Differentiable in ``features`` and ``logits``."""
    residual = logits.softmax(1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return torch.cat([(residual.unsqueeze(2) * features.unsqueeze(1)).flatten(1), residual], dim=1)


class CORAL(Algorithm):
    """Deep CORAL (Sun and Saenko, 2016): ERM plus ``mmd_gamma`` times the mean over environment
    pairs of the squared differences of feature means and feature covariances."""

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        features = [self.featurizer(x) for x, _ in minibatches]
        losses = [F.cross_entropy(self.classifier(f), y) for f, (_, y) in zip(features, minibatches)]

        penalty = _pairwise_mean(features, coral_distance)
        loss = torch.stack(losses).mean()
        objective = loss + self.hparams["mmd_gamma"] * penalty
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "penalty": penalty.item()}


class Fishr(Algorithm):
    """Fishr (Rame et al., 2022): ERM plus ``lambda`` times the spread across environments of the
    per-coordinate variance of per-sample classifier gradients (exponentially averaged).

    For a linear head and cross-entropy the per-sample gradients have the closed form
    ``(softmax(z) - onehot(y)) f^T`` (weight) and ``softmax(z) - onehot(y)`` (bias), so no
    per-sample autograd is needed; the penalty stays differentiable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.classifier, nn.Linear):
            raise ValueError("Fishr needs a linear classifier: set nonlinear_classifier to false")
        self.register_buffer("ema_variance", torch.zeros(0))
        self._ema_ready = False

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        features = [self.featurizer(x) for x, _ in minibatches]
        logits = [self.classifier(f) for f in features]
        losses = [F.cross_entropy(z, y) for z, (_, y) in zip(logits, minibatches)]
        variances = []
        for f, z, (_, y) in zip(features, logits, minibatches):
            variances.append(head_gradients(f, z, y).var(0, unbiased=False))
        current = torch.stack(variances)
        if not self._ema_ready:
            smoothed = current
        else:
            ema = self.hparams["ema"]
            smoothed = ema * self.ema_variance + (1 - ema) * current
        self.ema_variance = smoothed.detach()
        self._ema_ready = True
        penalty = (smoothed - smoothed.mean(0, keepdim=True)).square().sum(1).mean()
        weight = self.hparams["lambda"] if step >= self.hparams["penalty_anneal_iters"] else 0.0
        if step == self.hparams["penalty_anneal_iters"]:
            self.optimizer = self.make_optimizer()  # the penalty changes the loss scale (DomainBed)
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad()
        (loss + weight * penalty).backward()
        self.optimizer.step()
        return {"loss": loss.item(), "penalty": penalty.item()}


#: name -> class. Adding an algorithm is one entry.
ALGORITHMS: dict[str, type[Algorithm]] = {
    "ERM": ERM,
    "SAM": SAM,
    "ASAM": ASAM,
    "GSAM": GSAM,
    "SAGM": SAGM,
    "CORAL": CORAL,
    "Fishr": Fishr,
    "SAGE": SAGE,
    "SAGE_CurvatureOnly": SAGE_CurvatureOnly,
    "SAGE_AlignmentOnly": SAGE_AlignmentOnly,
    "SAGE_Align": SAGE_Align,
}


def canonical_algorithm(name: str) -> str:
    """The registered name of an algorithm, matched without regard to case and punctuation
    (``sage`` -> ``SAGE``, ``SAGECurvatureOnly`` -> ``SAGE_CurvatureOnly``); ValueError listing
    the known ones otherwise."""
    from torchsage.registry import resolve

    return resolve(name, ALGORITHMS, "algorithm")


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered as ``name`` (any case and punctuation)."""
    return ALGORITHMS[canonical_algorithm(name)]
