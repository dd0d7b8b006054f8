"""The fixed costs SAGE adds to a SAM step, timed one by one on a benchmark model.

Prints the median time of: the Newton-Schulz directions of the model's matrices (5 Muon steps),
the draw of one Gaussian per parameter (the descent noise), and one Welford update of the
streaming statistics (per distribution). These do not shrink with the batch, so they decide
SAGE/SAM at small batches.

    python benchmarks/components.py [--model cnn|mlp] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _models import count_parameters, make_model
from torchsage.disagreement import GradientStatistics
from torchsage.optim import PolarAscent


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    model = make_model(args.model)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    n = count_parameters(model)
    gen = torch.Generator().manual_seed(0)
    ascent = PolarAscent()
    stats = GradientStatistics(params)
    copies = [g.clone() for g in grads]

    def welford() -> None:
        torch._foreach_copy_(copies, grads)
        stats.update(copies, inplace=True)

    copy_ms = median_ms(lambda: torch._foreach_copy_(copies, grads), args.repeats)
    print(f"{args.model}: {n:,} parameters, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    rows = {
        "Newton-Schulz directions (5 Muon steps)": median_ms(lambda: ascent.directions(grads), args.repeats),
        f"noise draw ({n:,} Gaussians)": median_ms(lambda: torch.randn(n, generator=gen), args.repeats),
        "Welford update, one distribution": median_ms(welford, args.repeats) - copy_ms,
    }
    print("| component | median ms |")
    print("|---|--:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
