"""Does the "authors-dg" preset train a small CNN from scratch? Its gamma against smaller ones.

Trains DomainBed's MNIST CNN (width 16, random init) on RotatedDigits, the 75-degree domain held
out, with ``torchsage.SAGE(**preset("authors-dg"))`` and only ``gamma`` changed, one batch of
``--batch`` per training domain per step (equal batches, so equal weights), and prints for each
gamma: the mean disagreement and noise std over the run, and the final accuracy on the training
domains and on the held-out one.

    python benchmarks/authors_gamma.py [--steps 400] [--gammas 1.0 0.01 0.001 0] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torchsage
from torchsage.dg import MNISTCNN, rotated_digits


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(gamma: float, steps: int, batch: int, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    envs = [e.tensors for e in rotated_digits()]
    train, (xt, yt) = envs[:-1], envs[-1]
    model = MNISTCNN(1, 10, widths=(16, 16, 16, 16))
    opt = torchsage.SAGE(
        model.parameters(), **{**torchsage.preset("authors-dg"), "gamma": gamma, "seed": seed}
    )
    gen = torch.Generator().manual_seed(seed)
    noise, disagreement = [], []
    for _ in range(steps):
        data = []
        for x, y in train:
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            data.append((x[idx], y[idx]))
        info = opt.step(lambda data=data: [F.cross_entropy(model(x), y) for x, y in data])
        noise.append(info.noise_std)
        disagreement.append(info.disagreement)
    model.eval()
    xs, ys = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    return {
        "gamma": gamma,
        "disagreement": sum(disagreement) / steps,
        "noise_std": sum(noise) / steps,
        "train_acc": accuracy(model, xs, ys),
        "test_acc": accuracy(model, xt, yt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32, help="per training domain")
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.01, 0.001, 0.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| gamma | mean D (cosine) | mean noise std | train acc | test acc (75 deg) |")
    print("|---|---|---|---|---|")
    for gamma in args.gammas:
        r = run(gamma, args.steps, args.batch, args.seed)
        print(
            f"| {r['gamma']:g} | {r['disagreement']:.3f} | {r['noise_std']:.3g} | "
            f"{r['train_acc']:.3f} | {r['test_acc']:.3f} |"
        )


if __name__ == "__main__":
    main()
