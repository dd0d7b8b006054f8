"""What rho means under each SAGE rho scaling, next to SAM, on the demo network.

For a GroupNorm CNN trained briefly on RotatedDigits, prints for SAM and the three SAGE rho
scalings at the same rho: the norm of the whole perturbation, the largest and smallest per-layer
norm, and the loss increase L(w + e) - L(w) on the training domains.

    python benchmarks/rho_scaling.py [--rho 0.05] [--warmup-steps 100]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torchsage
from torchsage.dg import MNISTCNN, rotated_digits
from torchsage.optim import GradientAscent, PolarAscent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=100)
    args = parser.parse_args()

    torch.manual_seed(0)
    envs = [e.tensors for e in rotated_digits()[:5]]
    model = MNISTCNN(1, 10, widths=(32, 64, 64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)

    def batches(n=64):
        out = []
        for x, y in envs:
            idx = torch.randint(0, len(x), (n,), generator=gen)
            out.append((x[idx], y[idx]))
        return out

    for _ in range(args.warmup_steps):
        opt.zero_grad()
        torch.stack([F.cross_entropy(model(x), y) for x, y in batches()]).mean().backward()
        opt.step()

    data = batches(128)
    params = [p for p in model.parameters()]

    def loss() -> float:
        with torch.no_grad():
            return torch.stack([F.cross_entropy(model(x), y) for x, y in data]).mean().item()

    model.zero_grad()
    torch.stack([F.cross_entropy(model(x), y) for x, y in data]).mean().backward()
    base = loss()
    groups = [({"rho": args.rho}, params)]
    rules = {"SAM": GradientAscent()}
    rules.update({f"SAGE {s}": PolarAscent(scaling=s) for s in torchsage.optim.RHO_SCALINGS})
    n_matrices = sum(p.ndim >= 2 for p in params)
    print(f"rho = {args.rho}; {len(params)} parameters ({n_matrices} matrices); L(w) = {base:.4f}\n")
    print("| ascent | norm of e | largest layer norm | smallest layer norm | L(w+e) - L(w) |")
    print("|---|---|---|---|---|")
    for name, rule in rules.items():
        (e,) = rule.perturbation(groups, None)
        norms = torch.stack([t.norm() for t in e])
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, e):
                p.add_(t)
        increase = loss() - base
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        total = norms.square().sum().sqrt()
        print(f"| {name} | {total:.4f} | {norms.max():.4f} | {norms.min():.4f} | {increase:+.5f} |")


if __name__ == "__main__":
    main()
