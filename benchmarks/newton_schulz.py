"""Newton-Schulz polar factors: accuracy of float32 and bfloat16 against a float64 SVD, and what
batching and ``torch.compile`` buy.

Accuracy. For each shape and spectrum below, ``G = U diag(s) V^T`` is built in float64 with random
orthonormal ``U``, ``V``; the exact polar factor ``U V^T`` comes from ``torch.linalg.svd`` in
float64. ``torchsage.polar_factor`` then runs in float32 and in bfloat16 (``dtype=``) on ``G``
rounded to float32, with the Muon schedule (5 steps) and Polar Express (8 steps). Reported, each
the median over ``--samples`` matrices:

* ``orth``: orthogonality error ``max_i |sigma_i(Q) - 1|`` over the ``rank`` largest singular values
  of the result ``Q`` (0 for an exactly orthogonal factor);
* ``dist``: distance to the exact polar factor, ``||Q - U V^T||_F / sqrt(rank)`` (RMS error per
  singular direction);
* ``bf16-fp32``: ``||Q_bf16 - Q_fp32||_F / sqrt(rank)``, what bfloat16 adds to the float32 result.

Spectra: ``gaussian`` (i.i.d. normal entries), ``cond 1e2`` and ``cond 1e4`` (singular values
log-uniform between 1 and 1e-2 or 1e-4 of the largest), ``rank 8`` (exactly rank 8, the shape of
a gradient summed over a few examples). Singular values far below the Frobenius norm are not lifted
to 1 by a fixed number of steps, so ``orth`` and ``dist`` grow with the condition number: that is a
property of the iteration, not of its precision.

Speed. The matrices of a model's gradients are orthogonalised as SAGE's ascent does it: one call
per matrix (``loop``), or equal shapes stacked into one batched call
(``torchsage.optim.PolarAscent.directions``, ``batched``), each eager or through ``torch.compile``
(``compile=True``; compilation happens in the warm-up and is reported apart). Medians over
``--rounds`` interleaved rounds.

    python benchmarks/newton_schulz.py                     # full run (a few minutes on 2 cores)
    python benchmarks/newton_schulz.py --quick             # smoke run
    python benchmarks/newton_schulz.py --json ns.json      # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

import torchsage
from torchsage.optim import PolarAscent

F64 = torch.float64
SCHEDULES = {"muon": ("muon", 5), "polar_express": ("polar_express", 8)}
SPECTRA = ("gaussian", "cond 1e2", "cond 1e4", "rank 8")
SHAPES = ((64, 64), (128, 576), (512, 128), (768, 768))
QUICK_SHAPES = ((64, 64), (128, 576))

#: gradient matrix shapes of the timed models, (rows, cols) after reshaping to (out, -1)
MODEL_SHAPES: dict[str, list[tuple[int, int]]] = {
    # DomainBed's MNIST CNN: 4 convolutions and the linear head
    "mnist_cnn": [(64, 9), (128, 576), (128, 1152), (128, 1152), (10, 128)],
    # a 6-block transformer, width 128: q, k, v, o (128 x 128), MLP up (512 x 128) and down (128 x 512)
    "transformer_w128_d6": [(128, 128)] * 24 + [(512, 128)] * 6 + [(128, 512)] * 6,
    # 12 blocks of width 256
    "transformer_w256_d12": [(256, 256)] * 48 + [(1024, 256)] * 12 + [(256, 1024)] * 12,
}
QUICK_MODELS = ("mnist_cnn", "transformer_w128_d6")


def random_orthonormal(n: int, k: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """``n x k`` with orthonormal columns (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64).to(device))
    return q * torch.sign(torch.diagonal(r))


def test_matrix(m: int, n: int, spectrum: str, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """A float64 ``m x n`` matrix with the named spectrum (see the module docstring)."""
    r = min(m, n)
    if spectrum == "gaussian":
        return torch.randn(m, n, generator=gen, dtype=F64).to(device)
    if spectrum.startswith("cond "):
        low = float(spectrum.split()[1])
        s = torch.logspace(0.0, -math.log10(low), r, dtype=F64, device=device)
    elif spectrum.startswith("rank "):
        r = min(r, int(spectrum.split()[1]))
        s = torch.linspace(1.0, 0.5, r, dtype=F64, device=device)
    else:
        raise ValueError(f"unknown spectrum {spectrum!r}: use one of {', '.join(SPECTRA)}")
    return (random_orthonormal(m, r, gen, device) * s) @ random_orthonormal(n, r, gen, device).T


def exact_polar(G: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``U V^T`` in float64 over the numerically non-zero singular values, and that rank."""
    U, S, Vh = torch.linalg.svd(G.to(F64), full_matrices=False)
    rank = int((S > S[0] * max(G.shape) * 1e-12).sum())
    return U[:, :rank] @ Vh[:rank], rank


def errors(Q: torch.Tensor, exact: torch.Tensor, rank: int) -> tuple[float, float]:
    """(orthogonality error over the top ``rank`` singular values, RMS distance to ``exact``)."""
    Q = Q.to(F64)
    s = torch.linalg.svdvals(Q)[:rank]
    orth = float((s - 1).abs().max())
    dist = float(torch.linalg.matrix_norm(Q - exact) / math.sqrt(rank))
    return orth, dist


def accuracy(
    shapes: Sequence[tuple[int, int]],
    spectra: Sequence[str] = SPECTRA,
    samples: int = 3,
    device: str = "cpu",
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    progress: bool = True,
) -> list[dict]:
    """One row per (shape, spectrum, schedule): medians of ``orth`` and ``dist`` per dtype, and
    ``bf16-fp32`` (see the module docstring)."""
    rows = []
    total = len(shapes) * len(spectra) * samples
    with tqdm(total=total, desc="accuracy", file=sys.stderr, leave=False, disable=not progress) as bar:
        for m, n in shapes:
            for spectrum in spectra:
                gen = torch.Generator().manual_seed(100_000 * m + 10 * n + list(SPECTRA).index(spectrum))
                measured: dict[str, dict[str, list[float]]] = {}
                for _ in range(samples):
                    G = test_matrix(m, n, spectrum, gen, device)
                    exact, rank = exact_polar(G)
                    G32 = G.float()
                    for name, (coefficients, steps) in SCHEDULES.items():
                        out = {}
                        for dtype in dtypes:
                            Q = torchsage.polar_factor(
                                G32, steps=steps, coefficients=coefficients, dtype=dtype
                            )
                            out[dtype] = Q
                            orth, dist = errors(Q, exact, rank)
                            key = str(dtype).removeprefix("torch.")
                            cell = measured.setdefault(name, {})
                            cell.setdefault(f"orth_{key}", []).append(orth)
                            cell.setdefault(f"dist_{key}", []).append(dist)
                        if torch.bfloat16 in out and torch.float32 in out:
                            gap = torch.linalg.matrix_norm(
                                out[torch.bfloat16].double() - out[torch.float32].double()
                            )
                            measured[name].setdefault("bf16_minus_fp32", []).append(
                                float(gap) / math.sqrt(rank)
                            )
                    bar.update(1)
                for name, cell in measured.items():
                    row = {"shape": [m, n], "spectrum": spectrum, "schedule": name}
                    row.update({k: statistics.median(v) for k, v in cell.items()})
                    rows.append(row)
    return rows


def accuracy_table(rows: list[dict]) -> str:
    lines = [
        "| shape | spectrum | schedule | orth fp32 | orth bf16 | dist fp32 | dist bf16 | bf16-fp32 |",
        "|---|---|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['spectrum']} | {r['schedule']} "
            f"| {r.get('orth_float32', math.nan):.2e} | {r.get('orth_bfloat16', math.nan):.2e} "
            f"| {r.get('dist_float32', math.nan):.2e} | {r.get('dist_bfloat16', math.nan):.2e} "
            f"| {r.get('bf16_minus_fp32', math.nan):.2e} |"
        )
    return "\n".join(lines)


def gradient_like(
    shapes: Sequence[tuple[int, int]], device: str = "cpu", seed: int = 0
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=gen).to(device) for m, n in shapes]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(
    models: Sequence[str],
    rounds: int = 20,
    warmup: int = 2,
    device: str = "cpu",
    variants: Sequence[str] = ("loop", "batched", "loop+compile", "batched+compile"),
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[dict]:
    """Median milliseconds to orthogonalise every gradient matrix of each model, per variant."""
    rows = []
    for model in models:
        grads = gradient_like(MODEL_SHAPES[model], device)
        calls: dict[str, Callable[[], object]] = {}
        compile_s: dict[str, float] = {}
        for variant in variants:
            compiled = variant.endswith("+compile")
            if variant.startswith("loop"):

                def call(compiled: bool = compiled, grads: list = grads) -> object:
                    return [torchsage.polar_factor(g, dtype=dtype, compile=compiled) for g in grads]

            else:
                ascent = PolarAscent(dtype=dtype, compile=compiled)

                def call(ascent: PolarAscent = ascent, grads: list = grads) -> object:
                    return ascent.directions(grads)

            calls[variant] = call
        for variant, call in calls.items():  # warm-up; the first compiled call compiles
            start = time.perf_counter()
            try:
                for _ in range(warmup):
                    call()
                    _sync(device)
            except RuntimeError as error:
                print(f"{variant}: {error}", file=sys.stderr)
                calls[variant] = None  # type: ignore[assignment]
                continue
            compile_s[variant] = time.perf_counter() - start
        live = {v: c for v, c in calls.items() if c is not None}
        times: dict[str, list[float]] = {v: [] for v in live}
        names = list(live)
        for r in tqdm(range(rounds), desc=model, file=sys.stderr, leave=False, disable=not progress):
            for v in names[r % len(names) :] + names[: r % len(names)]:
                _sync(device)
                start = time.perf_counter()
                live[v]()
                _sync(device)
                times[v].append(time.perf_counter() - start)
        row: dict = {"model": model, "matrices": len(grads), "distinct_shapes": len(set(MODEL_SHAPES[model]))}
        row.update({f"{v}_ms": statistics.median(ts) * 1e3 for v, ts in times.items()})
        row.update({f"{v}_warmup_s": s for v, s in compile_s.items() if v.endswith("compile")})
        rows.append(row)
    return rows


def speed_table(rows: list[dict], variants: Sequence[str]) -> str:
    compiled = "batched+compile" in variants
    head = "| model | matrices | shapes | " + " | ".join(f"{v} ms" for v in variants)
    head += " | batched speed-up |"
    head += " compile speed-up (batched) |" if compiled else ""
    lines = [head, "|---|--:|--:|" + "--:|" * (len(variants) + 1 + compiled)]
    for r in rows:
        cells = " | ".join(f"{r.get(f'{v}_ms', math.nan):.2f}" for v in variants)
        line = f"| {r['model']} | {r['matrices']} | {r['distinct_shapes']} | {cells} "
        line += f"| {r.get('loop_ms', math.nan) / r.get('batched_ms', math.nan):.2f}x |"
        if compiled:
            line += f" {r.get('batched_ms', math.nan) / r.get('batched+compile_ms', math.nan):.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def environment(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    card = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    return (
        f"torch {torch.__version__}, torchsage {torchsage.__version__}, Python {platform.python_version()}; "
        f"CPU: {cpu} ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}; GPU: {card}"
    )


def write_json(path: str | Path, data: dict) -> None:
    """Writes ``data`` whole: to a temporary file first, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 shapes, 1 sample, 2 models, 5 rounds"
    )
    parser.add_argument("--samples", type=int, default=3, help="matrices per (shape, spectrum)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="time the eager variants only")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    samples = 1 if args.quick else args.samples
    models = QUICK_MODELS if args.quick else tuple(MODEL_SHAPES)
    rounds = min(args.rounds, 5) if args.quick else args.rounds
    variants = (
        ("loop", "batched") if args.no_compile else ("loop", "batched", "loop+compile", "batched+compile")
    )
    progress = not args.no_progress

    print(environment("cpu"))
    out: dict = {"environment": environment("cpu")}
    if not args.skip_accuracy:
        rows = accuracy(shapes, samples=samples, progress=progress)
        print(f"\n### Accuracy against a float64 SVD (median of {samples} matrices)\n")
        print(accuracy_table(rows))
        out["accuracy"] = rows
    if not args.skip_speed:
        rows = speed(models, rounds=rounds, variants=variants, progress=progress)
        print(f"\n### Time to orthogonalise every gradient matrix (float32, median of {rounds} rounds)\n")
        print(speed_table(rows, variants))
        warm = [
            f"{r['model']} {v.removesuffix('_warmup_s')}: {r[v]:.1f} s"
            for r in rows
            for v in r
            if v.endswith("_warmup_s")
        ]
        if warm:
            print("\nwarm-up including compilation: " + "; ".join(warm))
        out["speed"] = rows
        eager = ("loop", "batched")
        rows = speed(models, rounds=rounds, variants=eager, dtype=torch.bfloat16, progress=progress)
        print(f"\n### The same in bfloat16 (eager, median of {rounds} rounds)\n")
        print(speed_table(rows, eager))
        out["speed_bf16"] = rows
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
