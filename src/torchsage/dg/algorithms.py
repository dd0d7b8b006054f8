"""Domain-generalization algorithms: a registry of small classes with one interface.

Every algorithm owns a featurizer, a classifier and its optimizer, and implements
``update(minibatches, step) -> dict`` (one training step on one minibatch per training
environment, returning values to log) and ``predict(x) -> logits``. Each environment's minibatch
goes through its own forward pass, so the per-environment losses are what the sharpness-aware
optimizers need; their mean is the loss ERM minimises.

The sharpness-aware algorithms (SAM, ASAM, GSAM, SAGM, SAGE and its variants) are ERM with a
torchsage optimizer around the same base optimizer (Adam by default), nothing more. The baselines
from DomainBed (CORAL, Fishr, IRM, VREx, GroupDRO, Mixup, MMD) follow the equations of its
``algorithms.py``, written here on the per-environment forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsage
from torchsage.dg.algorithm_base import Algorithm, Minibatches
from torchsage.dg.algorithms_alignment import GGA, IGA, ANDMask, Fish, SANDMask
from torchsage.dg.hparams import STEP_FACTOR
from torchsage.optim import SAGEAlign, SAGEAlignmentOnly, SAGECurvatureOnly, SharpnessAware

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "ascent_schedule",
    "gaussian_mmd",
    "get_algorithm",
    "gsam_lr_min",
    "irm_penalty",
    "mixup_pairs",
]


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
        options["ascent_schedule"] = ascent_schedule(self.hparams)
        # model=: BatchNorm statistics are updated on the clean pass only
        return self.optimizer_class(self.parameter_groups(), cls, model=self.network, **options)

    def parameter_groups(self) -> Any:
        """The optimizer's parameters: the network's, or (SAGE family, ``classifier_ascent`` other
        than ``"polar"``) the featurizer's and the classifier's with that ascent direction."""
        direction = self.hparams.get("classifier_ascent", "polar")
        if direction == "polar":
            return self.network.parameters()
        return [
            {"params": list(self.featurizer.parameters())},
            {"params": list(self.classifier.parameters()), "ascent": direction},
        ]

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


def ascent_schedule(hparams: dict[str, Any]) -> torchsage.optim.AscentSchedule | None:
    """The schedule the hyperparameters ``ascent_every`` (k), ``ascent_trigger`` (``"none"``, or the
    statistic of :class:`torchsage.optim.Triggered`) and ``ascent_threshold`` ask for (None: every
    step, the default).

    Example:
        >>> ascent_schedule({"ascent_every": 5})
        EveryK(5)
        >>> ascent_schedule({"ascent_trigger": "disagreement", "ascent_threshold": 0.5})
        Triggered('disagreement', threshold=0.5, decay=0.9, warmup=0)
    """
    every, trigger = hparams.get("ascent_every", 1), hparams.get("ascent_trigger", "none")
    if trigger != "none":
        if every != 1:
            raise ValueError(
                f"ascent_every={every} and ascent_trigger={trigger!r} exclude each other: set one of them"
            )
        return torchsage.optim.Triggered(trigger, threshold=hparams.get("ascent_threshold", 0.0))
    return None if every == 1 else torchsage.optim.EveryK(every)


class SAM(_SharpnessAware):
    optimizer_class = torchsage.SAM


class ASAM(_SharpnessAware):
    """ASAM as its authors' code defines it: ``T = |w| + eta`` on the parameters whose name
    contains ``weight``, ``T = 1`` on the others (``"scaled": "weights"``, rho 0.5, eta 0.01);
    ``"scaled": "all"`` scales every parameter, and with ``"eta": 0`` that is the adaptive mode of
    the widely used SAM package."""

    optimizer_class = torchsage.ASAM
    optimizer_hparams = ("rho", "eta", "scaled")


def gsam_lr_min(hparams: dict[str, Any]) -> float:
    """The lowest learning rate of the run's ``lr_schedule``, where GSAM's radius reaches
    ``rho_min``: ``"step"``: ``lr`` times the step factor; ``"cosine"``: 0; ``"none"``: 0 (the
    learning rate stays at ``lr``, so the radius stays at ``rho_max``).

    Example:
        >>> gsam_lr_min({"lr": 1e-3, "lr_schedule": "step"})
        0.0001
    """
    schedule = hparams.get("lr_schedule", "none")
    return hparams["lr"] * STEP_FACTOR if schedule == "step" else 0.0


class GSAM(_SharpnessAware):
    """GSAM as its authors define it, with their hyperparameters' names: the radius goes linearly
    with the learning rate from ``rho_max`` at the initial one to ``rho_min`` at the lowest one of
    the run's schedule (:func:`gsam_lr_min`), descent ``g_p - alpha g_orth``; ``"rho_min": null``
    keeps the radius at ``rho_max``, ``"adaptive": true`` scales the ascent by ``|w|`` on every
    parameter as their ``adaptive`` option does."""

    optimizer_class = torchsage.GSAM

    def make_optimizer(self) -> torch.optim.Optimizer:
        cls, options = self.base_optimizer()
        hp = self.hparams
        rho_max, rho_min = hp["rho_max"], hp["rho_min"]
        if rho_min is not None and not 0 <= rho_min <= rho_max:
            raise ValueError(
                f"hparam rho_min ({rho_min}) must lie in [0, rho_max ({rho_max})]: GSAM's radius "
                "shrinks with the learning rate; use null to keep it at rho_max"
            )
        if rho_min is not None:
            options.update(rho_min=rho_min, lr_min=gsam_lr_min(hp))
        if hp["adaptive"]:
            options.update(adaptive=True, eta=0.0)  # their adaptive ascent: T = |w|, every parameter
        return self.optimizer_class(
            self.network.parameters(), cls, rho=rho_max, alpha=hp["alpha"], model=self.network, **options
        )


class SAGM(_SharpnessAware):
    optimizer_class = torchsage.SAGM
    optimizer_hparams = ("rho", "alpha")


class _SAGEFamily(_SharpnessAware):
    # The noise seed defaults to torch.initial_seed(), which the training script sets from --seed.
    optimizer_hparams = ("rho", "gamma", "disagreement", "ns_steps", "rho_scaling", "polar_method")


class SAGE(_SAGEFamily):
    optimizer_class = torchsage.SAGE


class SAGE_CurvatureOnly(_SAGEFamily):  # registry names follow the ablations
    optimizer_class = SAGECurvatureOnly
    optimizer_hparams = ("rho", "disagreement", "ns_steps", "rho_scaling", "polar_method")


class SAGE_AlignmentOnly(_SAGEFamily):
    optimizer_class = SAGEAlignmentOnly
    optimizer_hparams = ("gamma", "disagreement")


class SAGE_Align(_SAGEFamily):
    optimizer_class = SAGEAlign
    optimizer_hparams = ("rho", "lambda_max", "disagreement", "ns_steps", "rho_scaling", "polar_method")


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


def irm_penalty(logits: Tensor, labels: Tensor) -> Tensor:
    """IRM's penalty on one environment: the product of the derivatives, with respect to a scale
    ``s`` of the logits at ``s = 1``, of the cross-entropy on the even and on the odd examples (an
    unbiased estimate of the squared derivative on the whole batch). Differentiable in ``logits``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
        >>> irm_penalty(logits, torch.tensor([0, 0])).item() > 0  # both halves want a larger scale
        True
    """
    scale = logits.new_ones((), requires_grad=True)
    halves = [(logits[::2], labels[::2]), (logits[1::2], labels[1::2])]
    grads = [
        torch.autograd.grad(F.cross_entropy(z * scale, y), scale, create_graph=True)[0] for z, y in halves
    ]
    return grads[0] * grads[1]


class _AnnealedPenalty(Algorithm):
    """Mean risk plus a penalty weighted 1 before ``<prefix>_penalty_anneal_iters`` steps and
    ``<prefix>_lambda`` from then on; the base optimizer restarts at the switch, as in DomainBed
    (Adam's moments would otherwise carry the scale of the unpenalised loss)."""

    prefix: str

    def penalty(self, logits: Sequence[Tensor], losses: Tensor, minibatches: Minibatches) -> Tensor:
        raise NotImplementedError

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        logits = [self.predict(x) for x, _ in minibatches]
        losses = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits, minibatches)])
        penalty = self.penalty(logits, losses, minibatches)
        anneal = self.hparams[f"{self.prefix}_penalty_anneal_iters"]
        weight = self.hparams[f"{self.prefix}_lambda"] if step >= anneal else 1.0
        if step == anneal:
            self.optimizer = self.make_optimizer()
        loss = losses.mean()
        objective = loss + weight * penalty
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "objective": objective.item(), "penalty": penalty.item()}


class IRM(_AnnealedPenalty):
    """Invariant Risk Minimization (Arjovsky et al., 2019), IRMv1: the mean risk plus
    ``irm_lambda`` times the mean over environments of :func:`irm_penalty`."""

    prefix = "irm"

    def penalty(self, logits: Sequence[Tensor], losses: Tensor, minibatches: Minibatches) -> Tensor:
        return torch.stack([irm_penalty(z, y) for z, (_, y) in zip(logits, minibatches)]).mean()


class VREx(_AnnealedPenalty):
    """Variance Risk Extrapolation (Krueger et al., 2021): the mean risk plus ``vrex_lambda``
    times the variance (over environments, divided by their number) of the environment risks."""

    prefix = "vrex"

    def penalty(self, logits: Sequence[Tensor], losses: Tensor, minibatches: Minibatches) -> Tensor:
        return (losses - losses.mean()).square().mean()


class GroupDRO(Algorithm):
    """Group DRO (Sagawa et al., 2020, Algorithm 1): minimises ``sum_e q_e R_e`` where the
    environment weights follow an exponentiated-gradient ascent on the risks,
    ``q_e <- q_e exp(groupdro_eta * R_e)`` then ``q <- q / sum(q)``, from ``q = 1`` (kept across
    steps in the buffer ``q``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("q", torch.ones(self.num_domains))

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        if len(minibatches) != len(self.q):
            raise ValueError(f"GroupDRO was built for {len(self.q)} environments, got {len(minibatches)}")
        losses = torch.stack([F.cross_entropy(self.predict(x), y) for x, y in minibatches])
        with torch.no_grad():
            q = self.q * torch.exp(self.hparams["groupdro_eta"] * losses.detach().to(self.q.dtype))
            self.q.copy_(q / q.sum())
        loss = (self.q.to(losses.dtype) * losses).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "max_weight": self.q.max().item()}


def mixup_pairs(minibatches: Minibatches, order: Sequence[int]) -> list[tuple[tuple[Tensor, Tensor], ...]]:
    """Environment ``order[i]`` paired with ``order[i + 1]`` (cyclically), both cut to the shorter
    length.

    Example:
        >>> batches = [(torch.zeros(n, 1), torch.full((n,), n)) for n in (4, 2)]
        >>> [(len(a[0]), len(b[0])) for a, b in mixup_pairs(batches, [1, 0])]
        [(2, 2), (2, 2)]
    """
    pairs = []
    for i in range(len(order)):
        (xi, yi), (xj, yj) = minibatches[order[i]], minibatches[order[(i + 1) % len(order)]]
        n = min(len(xi), len(xj))
        pairs.append(((xi[:n], yi[:n]), (xj[:n], yj[:n])))
    return pairs


class Mixup(Algorithm):
    """Inter-domain Mixup (Xu et al., 2020; Yan et al., 2020): environments in a random cyclic
    order, each mixed with the next as ``x = lam x_i + (1 - lam) x_j`` with
    ``lam ~ Beta(mixup_alpha, mixup_alpha)``, and trained on ``lam CE(f(x), y_i) +
    (1 - lam) CE(f(x), y_j)``, summed over the pairs and divided by their number.

    The draws come from torch's global generator: ``torch.randperm(n)`` for the order, then one
    ``Beta(alpha, alpha).sample()`` per pair.
    """

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        order = torch.randperm(len(minibatches)).tolist()
        beta = torch.distributions.Beta(
            torch.tensor(float(self.hparams["mixup_alpha"])), torch.tensor(float(self.hparams["mixup_alpha"]))
        )
        terms = []
        for (xi, yi), (xj, yj) in mixup_pairs(minibatches, order):
            lam = float(beta.sample())
            logits = self.predict(lam * xi + (1 - lam) * xj)
            terms.append(lam * F.cross_entropy(logits, yi) + (1 - lam) * F.cross_entropy(logits, yj))
        objective = torch.stack(terms).sum() / len(minibatches)
        self.optimizer.zero_grad()
        objective.backward()
        self.optimizer.step()
        return {"loss": objective.item()}


#: DomainBed's bandwidths: the kernel is the sum of exp(-gamma ||a - b||^2) over these gammas
MMD_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def gaussian_mmd(a: Tensor, b: Tensor, gammas: Sequence[float] = MMD_GAMMAS) -> Tensor:
    """Biased squared MMD between the rows of ``a`` and ``b`` under the kernel
    ``k(u, v) = sum_g exp(-g ||u - v||^2)``: ``mean k(a, a) + mean k(b, b) - 2 mean k(a, b)``.

    Example:
        >>> a = torch.randn(16, 3)
        >>> float(gaussian_mmd(a, a)) < 1e-5 < float(gaussian_mmd(a, a + 3.0))
        True
    """

    def kernel_mean(u: Tensor, v: Tensor) -> Tensor:
        squared = u.square().sum(1, keepdim=True) + v.square().sum(1) - 2 * u @ v.T
        squared = squared.clamp_min(0.0)  # rounding can make ||u - u||^2 slightly negative
        return sum(torch.exp(-g * squared) for g in gammas).mean()  # type: ignore[return-value]

    return kernel_mean(a, a) + kernel_mean(b, b) - 2 * kernel_mean(a, b)


class MMD(Algorithm):
    """MMD matching (Li et al., 2018, as in DomainBed): the mean risk plus ``mmd_gamma`` times the
    mean over environment pairs of :func:`gaussian_mmd` between their features."""

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        features = [self.featurizer(x) for x, _ in minibatches]
        losses = [F.cross_entropy(self.classifier(f), y) for f, (_, y) in zip(features, minibatches)]
        penalty = _pairwise_mean(features, gaussian_mmd)
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad()
        (loss + self.hparams["mmd_gamma"] * penalty).backward()
        self.optimizer.step()
        return {"loss": loss.item(), "penalty": penalty.item()}


#: name -> class, the gradient-alignment baselines of :mod:`torchsage.dg.algorithms_alignment`
#: included. Adding an algorithm is one entry.
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
    "IRM": IRM,
    "VREx": VREx,
    "GroupDRO": GroupDRO,
    "Mixup": Mixup,
    "MMD": MMD,
    "Fish": Fish,
    "ANDMask": ANDMask,
    "SANDMask": SANDMask,
    "IGA": IGA,
    "GGA": GGA,
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
