"""Newton-Schulz on the Gram matrix against the plain iteration: time by shape, and accuracy.

For each ``m x n`` shape (``m <= n``; a tall matrix is iterated transposed, so only the wide
orientation matters) a Gaussian matrix is orthogonalised by ``torchsage.polar_factor`` with
``method="newton_schulz"`` (five products of ``m x n`` size per step) and with
``method="gram_newton_schulz"`` (``m x m`` products per step, ``m x n`` ones only at the start, at the
restart and at the end), five Muon steps, float32. The two are timed in alternating order within
each round (so drift in the machine's speed hits both alike); the table gives medians over rounds
and their ratio. ``flop ratio`` is the count of multiply-adds of the Gram form over the plain one
(``20 m^2 n + 10 m^3`` for the plain form; ``8 m^2 n + 28 m^3`` for the Gram form with its one
restart), the figure the timing is compared with.

Accuracy: the largest entry of the difference between the two results, and each one's distance to
the exact polar factor of a float64 SVD (RMS per singular direction, ``||Q - U V^T||_F /
sqrt(m)``); Gaussian matrices have singular values above 1e-2 of the Frobenius norm at these
shapes, where five Muon steps land in about [0.68, 1.13], so the distance is that of the iteration,
the same for both forms.

    python benchmarks/gram_newton_schulz.py --threads 1            # a few minutes on one core
    python benchmarks/gram_newton_schulz.py --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from torchsage import polar_factor

SHAPES = (
    (64, 64), (64, 128), (64, 576),
    (128, 128), (128, 192), (128, 256), (128, 384), (128, 1152),
    (256, 256), (256, 384), (256, 512), (256, 768), (256, 2304),
    (384, 384), (384, 576), (384, 768), (384, 1152), (384, 1536),
    (512, 512), (512, 1024), (512, 2048), (512, 4608),
    (768, 768), (768, 1536), (768, 2304), (768, 3072),
)  # fmt: skip
QUICK_SHAPES = ((64, 576), (128, 128), (256, 768), (384, 1536))


def flop_ratio(m: int, n: int) -> float:
    return (8 * m * m * n + 28 * m**3) / (20 * m * m * n + 10 * m**3)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pair(G: torch.Tensor, rounds: int, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    device = str(G.device)
    calls = {
        "plain": lambda: polar_factor(G, method="newton_schulz", dtype=dtype),
        "gram": lambda: polar_factor(G, method="gram_newton_schulz", dtype=dtype),
    }
    for call in calls.values():  # warm-up
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for name in ("plain", "gram") if r % 2 == 0 else ("gram", "plain"):
            sync(device)
            start = time.perf_counter()
            calls[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["plain"]), statistics.median(times["gram"])


def distance_to_exact(Q: torch.Tensor, G: torch.Tensor) -> float:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return float(torch.linalg.matrix_norm(Q.double() - U @ Vh) / math.sqrt(min(G.shape)))


def measure(shapes, rounds: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per shape: median times of both forms, their ratio, the flop ratio, and accuracy."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n in shapes:
        G = torch.randn(m, n, generator=gen).to(device)
        plain, gram = time_pair(G, rounds, dtype)
        Qp = polar_factor(G, dtype=dtype)
        Qg = polar_factor(G, method="gram_newton_schulz", dtype=dtype)
        rows.append(
            dict(
                m=m,
                n=n,
                plain_ms=plain * 1e3,
                gram_ms=gram * 1e3,
                flop_ratio=flop_ratio(m, n),
                max_abs_diff=float((Qp - Qg).abs().max()),
                dist_plain=distance_to_exact(Qp.cpu(), G.cpu()),
                dist_gram=distance_to_exact(Qg.cpu(), G.cpu()),
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| m x n | n/m | plain (ms) | Gram (ms) | Gram/plain | flop ratio | max abs diff | dist plain "
        "| dist Gram |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['m']} x {r['n']} | {r['n'] / r['m']:.2g} | {r['plain_ms']:.2f} | {r['gram_ms']:.2f} | "
            f"{r['gram_ms'] / r['plain_ms']:.2f} | {r['flop_ratio']:.2f} | {r['max_abs_diff']:.1e} | "
            f"{r['dist_plain']:.3f} | {r['dist_gram']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="four shapes, three rounds")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes, rounds = (QUICK_SHAPES, 3) if args.quick else (SHAPES, args.rounds)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, float32, 5 Muon steps, {rounds} rounds")
    print(table(measure(shapes, rounds)))


if __name__ == "__main__":
    main()
