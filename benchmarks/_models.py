"""Shared pieces of the benchmarks: models, random batches, and one-step callables per method.

* :func:`mnist_cnn`: the DomainBed "MNIST CNN" (four 3x3 convolutions with GroupNorm, global
  average pool, linear head).
* :func:`mlp`: a ReLU MLP on flattened 28x28 inputs (784-512-512-10 by default).
* :func:`make_batches`: K random ``(x, y)`` batches of 1x28x28 inputs and 10-class labels.
* :class:`ReferenceSAGE`: a SAGE step organised the way the paper's authors organise theirs (one
  joint forward over the concatenated batches, K backward passes through the joint graph, K
  flattened gradient copies stacked into a K x P matrix) but computing torchsage's default step
  (global rho scaling, ``normalized_std``), not the authors' settings (``||W||_F`` scaling, see
  ``torchsage.preset``). It is the baseline the library's streaming step is compared against for
  time and memory; it is written here from that description and imports nothing from outside.
* :func:`build_step`: a zero-argument callable doing one optimisation step of a method
  (``erm``, ``sam``, ``sage``, ``sage_gen``, ``reference``) on a given model and batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsage

__all__ = [
    "METHODS",
    "ReferenceSAGE",
    "build_step",
    "count_parameters",
    "make_batches",
    "make_model",
    "mlp",
    "mnist_cnn",
]

Batches = list[tuple[Tensor, Tensor]]

#: method name -> label used in tables
METHODS: dict[str, str] = {
    "erm": "ERM",
    "sam": "SAM",
    "sage": "SAGE",
    "sage_gen": "SAGE (generator closure)",
    "reference": "reference SAGE",
}


def mnist_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """DomainBed's MNIST CNN: 4 conv3x3 + ReLU + GroupNorm(8), global average pool, Linear."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1),
        nn.ReLU(),
        nn.GroupNorm(8, 64),
        nn.Conv2d(64, 128, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.GroupNorm(8, 128),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.ReLU(),
        nn.GroupNorm(8, 128),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.ReLU(),
        nn.GroupNorm(8, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def mlp(widths: Sequence[int] = (784, 512, 512, 10)) -> nn.Module:
    """ReLU MLP on flattened inputs; ``widths`` from input to output."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_model(name: str, seed: int = 0) -> nn.Module:
    """``cnn``, ``mlp`` (784-512-512-10) or ``mlp-wide`` (784-2048-2048-10), seeded."""
    torch.manual_seed(seed)
    if name == "cnn":
        return mnist_cnn()
    if name == "mlp":
        return mlp()
    if name == "mlp-wide":
        return mlp((784, 2048, 2048, 10))
    raise ValueError(f"unknown model {name!r}: use cnn, mlp or mlp-wide")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_batches(k: int, batch_size: int, seed: int = 0, num_classes: int = 10) -> Batches:
    """K random batches ``(x, y)``, ``x`` of shape ``(batch_size, 1, 28, 28)``."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 1, 28, 28, generator=gen),
            torch.randint(0, num_classes, (batch_size,), generator=gen),
        )
        for _ in range(k)
    ]


class ReferenceSAGE:
    """SAGE organised as the paper's authors organise it, computing torchsage's default step.

    One step:

    1. concatenate the K batches, one joint forward, per-distribution losses from slices of the
       joint output;
    2. K backward passes through the joint graph (``retain_graph=True``), after each one a flattened
       copy ``torch.cat([p.grad.flatten() ...])`` of the gradient is kept: K copies in a list, then
       stacked into a K x P matrix;
    3. ``g_bar`` = the row mean; disagreement ``D = sqrt(mean_k ||g_k - g_bar||^2) / ||g_bar||``;
    4. ascent: for each parameter with ``ndim >= 2`` the polar factor of its mean gradient reshaped
       to ``(out, -1)`` (:func:`torchsage.polar_factor`, 5 Newton-Schulz steps, muon
       coefficients), ``g / ||g||`` for vectors, the whole perturbation scaled to norm ``rho``;
    5. save the weights, perturb, a second joint forward/backward on the mean loss, restore;
    6. add Gaussian noise of std ``gamma * D`` to the gradients; the base optimizer steps.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        rho: float = 0.05,
        gamma: float = 0.01,
        ns_steps: int = 5,
        eps: float = 1e-12,
        **base_kwargs,
    ) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = base_optimizer(self.params, **base_kwargs)
        self.rho = rho
        self.gamma = gamma
        self.ns_steps = ns_steps
        self.eps = eps

    def _joint_losses(self, x: Tensor, y: Tensor, sizes: list[int]) -> list[Tensor]:
        out = self.model(x)
        return [F.cross_entropy(o, t) for o, t in zip(out.split(sizes), y.split(sizes))]

    def step(self, batches: Batches) -> dict[str, float]:
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        sizes = [len(b[0]) for b in batches]
        k = len(batches)

        # 1-2. one joint forward, K backward passes, K flattened gradient copies
        losses = self._joint_losses(x, y, sizes)
        flat_grads = []
        for i, loss in enumerate(losses):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward(retain_graph=i < k - 1)
            flat_grads.append(torch.cat([p.grad.flatten() for p in self.params]))
        loss_value = torch.stack([loss.detach() for loss in losses]).mean().item()
        del losses

        # 3. statistics from the K x P matrix
        grads = torch.stack(flat_grads)
        g_bar = grads.mean(dim=0)
        spread = (grads - g_bar).norm(dim=1).square().mean().sqrt()
        disagreement = (spread / (g_bar.norm() + self.eps)).item()

        # 4. polar-factor ascent on the mean gradient
        mean_grads = [
            g.view_as(p) for g, p in zip(g_bar.split([p.numel() for p in self.params]), self.params)
        ]
        directions = []
        for g in mean_grads:
            if g.ndim >= 2:
                d = torchsage.polar_factor(
                    g.reshape(g.shape[0], -1), steps=self.ns_steps, coefficients="muon"
                )
                directions.append(d.view_as(g))
            else:
                directions.append(g / g.norm().clamp_min(self.eps))
        norm = torch.sqrt(sum(d.square().sum() for d in directions))
        scale = self.rho / (norm + self.eps)

        # 5. perturbed joint pass, weights restored
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, d in zip(self.params, directions):
                p.add_(d * scale)
        self.optimizer.zero_grad(set_to_none=True)
        perturbed = torch.stack(self._joint_losses(x, y, sizes)).mean()
        perturbed.backward()
        with torch.no_grad():
            for p, w in zip(self.params, saved):
                p.copy_(w)

        # 6. descent noise and base step
        std = self.gamma * disagreement
        if std > 0:
            with torch.no_grad():
                for p in self.params:
                    p.grad.add_(torch.randn_like(p.grad) * std)
        self.optimizer.step()
        return {
            "loss": loss_value,
            "perturbed_loss": perturbed.item(),
            "disagreement": disagreement,
            "perturbation_norm": float(norm * scale),
        }


def build_step(
    method: str,
    model: nn.Module,
    batches: Batches,
    lr: float = 0.01,
    rho: float = 0.05,
    gamma: float = 0.01,
    seed: int = 0,
) -> Callable[[], object]:
    """A zero-argument callable doing one step of ``method`` on ``model`` with ``batches``.

    ``erm``: per-distribution forward passes, backward of the mean loss, SGD step.
    ``sam``: :class:`torchsage.SAM`; ``sage``: :class:`torchsage.SAGE` with a closure returning
    the list of losses; ``sage_gen``: the same with a closure returning a generator (one
    distribution's graph alive at a time); ``reference``: :class:`ReferenceSAGE`.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def closure() -> list[Tensor]:
        return [F.cross_entropy(model(x), y) for x, y in batches]

    def lazy_closure():
        return (F.cross_entropy(model(x), y) for x, y in batches)

    if method == "erm":
        opt = torch.optim.SGD(params, lr=lr)

        def erm_step() -> None:
            opt.zero_grad(set_to_none=True)
            torch.stack(closure()).mean().backward()
            opt.step()

        return erm_step
    if method == "sam":
        sam = torchsage.SAM(params, torch.optim.SGD, rho=rho, lr=lr)
        return lambda: sam.step(closure)
    if method in ("sage", "sage_gen"):
        sage = torchsage.SAGE(
            params, torch.optim.SGD, rho=rho, gamma=gamma, disagreement="normalized_std", seed=seed, lr=lr
        )
        fn = closure if method == "sage" else lazy_closure
        return lambda: sage.step(fn)
    if method == "reference":
        ref = ReferenceSAGE(model, torch.optim.SGD, rho=rho, gamma=gamma, lr=lr)
        return lambda: ref.step(batches)
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
