"""The main job on the embedded default: SGD, SAM and SAGE on RotatedDigits.

Trains the same small GroupNorm CNN on five rotated-digit domains (0 to 60 degrees) with each
optimizer and reports the accuracy on the held-out 75-degree domain. The domain-generalization
harness (``torchsage dg``) runs the full DomainBed protocol; this is the quick look.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import torchsage
from torchsage.dg import MNISTCNN, rotated_digits

__all__ = ["DEMO_METHODS", "DemoResult", "run_demo"]


_SGD = dict(momentum=0.9, weight_decay=5e-4)

DEMO_METHODS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda params, lr, rho, gamma, seed: torch.optim.SGD(params, lr=lr, **_SGD),
    "SAM": lambda params, lr, rho, gamma, seed: torchsage.SAM(
        params, torch.optim.SGD, rho=rho, lr=lr, **_SGD
    ),
    "SAGE": lambda params, lr, rho, gamma, seed: torchsage.SAGE(
        params, torch.optim.SGD, rho=rho, gamma=gamma, seed=seed, lr=lr, **_SGD
    ),
}


@dataclass(frozen=True)
class DemoResult:
    method: str
    seed: int
    test_accuracy: float
    train_accuracy: float
    seconds: float


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def run_demo(
    methods: Sequence[str] = ("SGD", "SAM", "SAGE"),
    seeds: Sequence[int] = (0, 1),
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 0.05,
    rho: float = 0.05,
    gamma: float = 1e-3,
    test_env: int = 5,
    progress: bool = True,
) -> list[DemoResult]:
    """Trains each method with each seed and returns the test-domain accuracies."""
    unknown = [m for m in methods if m not in DEMO_METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}: use {sorted(DEMO_METHODS)}")
    envs = rotated_digits()
    if not 0 <= test_env < len(envs):
        raise ValueError(f"test_env must lie in [0, {len(envs) - 1}], got {test_env}")
    train = [e.tensors for i, e in enumerate(envs) if i != test_env]
    test_x, test_y = envs[test_env].tensors
    results = []
    runs = [(m, s) for s in seeds for m in methods]
    bar = tqdm(runs, disable=not progress, desc="demo", leave=False)
    for method, seed in bar:
        bar.set_postfix_str(f"{method} seed {seed}")
        torch.manual_seed(seed)
        model = MNISTCNN(1, 10, widths=(32, 64, 64, 64))
        opt = DEMO_METHODS[method](model.parameters(), lr, rho, gamma, seed)
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        for _ in range(steps):
            batches = []
            for x, y in train:
                idx = torch.randint(0, len(x), (batch_size,), generator=gen)
                batches.append((x[idx], y[idx]))

            def closure(batches=batches, model=model):
                return [F.cross_entropy(model(x), y) for x, y in batches]

            if isinstance(opt, torchsage.optim.SharpnessAware):
                opt.step(closure)
            else:
                opt.zero_grad()
                torch.stack(closure()).mean().backward()
                opt.step()
        seconds = time.perf_counter() - start
        train_acc = sum(_accuracy(model, x, y) for x, y in train) / len(train)
        results.append(DemoResult(method, seed, _accuracy(model, test_x, test_y), train_acc, seconds))
    return results


def format_results(results: Sequence[DemoResult]) -> str:
    """Markdown table: mean +- std of the test-domain accuracy per method."""
    lines = [
        "| method | test-domain accuracy (%) | train-domain accuracy (%) | seeds | s/run |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        test = torch.tensor([100 * r.test_accuracy for r in rs])
        train = torch.tensor([100 * r.train_accuracy for r in rs])
        std = test.std().item() if len(rs) > 1 else 0.0
        secs = sum(r.seconds for r in rs) / len(rs)
        lines.append(
            f"| {method} | {test.mean():.1f} +- {std:.1f} | {train.mean():.1f} | {len(rs)} | {secs:.0f} |"
        )
    return "\n".join(lines)
