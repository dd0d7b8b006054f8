"""How large SAGE's noise is against a fine-tuned network's gradient, coordinate by coordinate.

For saved DG runs (``dg train --save-model``; by default the ERM runs of the pretrained study's
core part under ``--root``), the mean gradient of the training designs' losses over one step's
batch (the first ``--batch`` samples of each training design's ``in`` split) at the run's final
weights, over the trained parameters; printed: the coordinates' median and upper quantiles of
``|g|`` and the share below ``--noise`` (SAGE's noise standard deviation per coordinate: gamma
times the disagreement, 0.0019 in the pretrained study's SAGE runs, their logged ``noise_std``).
An adaptive base optimizer (Adam) normalises each coordinate, so a coordinate whose gradient is
below the noise moves by about the learning rate in a random direction.

    python benchmarks/gradient_scale.py --root runs/study --runs 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from torchsage.dg.checkpoint import load_dg_model
from torchsage.files import safe_torch_load


def gradient_sizes(run_dir: Path, batch: int) -> tuple[torch.Tensor, float]:
    """``|g|`` of every trained coordinate at the run's final weights, and the loss."""
    checkpoint = safe_torch_load(run_dir / "model.pt", what="model checkpoint")
    network, batches, _ = load_dg_model(checkpoint, batch)
    network.eval()
    params = [p for p in network.parameters() if p.requires_grad]
    loss = sum(F.cross_entropy(network(x), y) for x, y in batches) / len(batches)
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.flatten() for g in grads]).abs(), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/study")
    parser.add_argument("--runs", type=int, default=3, help="the first N finished runs, trial by trial")
    parser.add_argument("--algorithm", default="ERM")
    parser.add_argument("--batch", type=int, default=16, help="samples per training design")
    parser.add_argument("--noise", type=float, default=0.0019)
    args = parser.parse_args()
    from torchsage.study.pretrained import PT_CELLS, pt_jobs

    torch.set_num_threads(1)
    jobs = [
        j
        for j in pt_jobs(args.root, cells=PT_CELLS[:1], core=True)
        if j.state == "done" and j.settings["algorithm"] == args.algorithm
    ][: args.runs]
    if not jobs:
        raise SystemExit(f"no finished {args.algorithm} run of pt-symbola-core under {args.root}")
    generator = torch.Generator().manual_seed(0)
    for job in jobs:
        a, loss = gradient_sizes(job.output_dir, args.batch)
        sample = a[torch.randperm(a.numel(), generator=generator)[:1_000_000]]  # quantile's size limit
        q = torch.quantile(sample, torch.tensor([0.5, 0.9, 0.99]))
        print(
            f"trial {job.settings['trial']}: {a.numel()} coordinates, loss {loss:.3f}, |g| median "
            f"{q[0]:.2e}, 90% {q[1]:.2e}, 99% {q[2]:.2e}; below {args.noise:g}: "
            f"{100 * float((a < args.noise).float().mean()):.1f}%"
        )


if __name__ == "__main__":
    main()
