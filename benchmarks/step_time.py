"""Wall-clock time of one optimisation step: ERM, SAM, SAGE and the reference SAGE design.

For each model (the DomainBed MNIST CNN and a 784-512-512-10 MLP) and each number of
distributions K, the four methods run on identical copies of the model with the same K random
batches (SGD, lr 0.01; SAM rho 0.05; SAGE rho 0.05, gamma 0.01, normalized_std disagreement).
After a warm-up, every round runs one step of each method in a rotated order (so drift in the
machine's speed hits all methods alike); the tables give medians over rounds.

The "NS share" column is the time of ``torchsage.optim.PolarAscent().directions`` (the
Newton-Schulz polar factors of the model's matrices plus the vector normalisations) on the
model's mean gradients, as a fraction of the median SAGE step. It is timed inside the same rounds.

Before timing, one step of ``torchsage.SAGE`` and of the reference design (both with gamma = 0,
so no noise) from identical weights is cross-checked: disagreement, perturbed loss and the
updated weights should agree to float32 rounding.

    python benchmarks/step_time.py                 # full run (minutes on a laptop CPU)
    python benchmarks/step_time.py --quick         # smoke run
    python benchmarks/step_time.py --models mlp --ks 2 8 --rounds 50
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

import torchsage
from _models import METHODS, ReferenceSAGE, build_step, count_parameters, make_batches, make_model
from torchsage.optim import PolarAscent

TIMED = ("erm", "sam", "sage", "reference")
DEFAULT_ROUNDS = {"cnn": 7, "mlp": 30}
DEFAULT_BATCH = {"cnn": 16, "mlp": 64}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mean_gradients(model: torch.nn.Module, batches) -> list[torch.Tensor]:
    """Gradient of the mean loss at the model's weights (the tensors SAGE's ascent sees)."""
    model = copy.deepcopy(model)
    loss = torch.stack([torch.nn.functional.cross_entropy(model(x), y) for x, y in batches]).mean()
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def cross_check(name: str, k: int, batch_size: int) -> str:
    """One gamma = 0 step of torchsage.SAGE and of ReferenceSAGE from the same weights."""
    base = make_model(name)
    batches = make_batches(k, batch_size, seed=1)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    sage = torchsage.SAGE(m1.parameters(), torch.optim.SGD, rho=0.05, gamma=0.0, seed=0, lr=0.01)
    info = sage.step(lambda: [torch.nn.functional.cross_entropy(m1(x), y) for x, y in batches])
    ref = ReferenceSAGE(m2, torch.optim.SGD, rho=0.05, gamma=0.0, lr=0.01).step(batches)
    weight_diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
    return (
        f"cross-check {name} K={k}: disagreement SAGE {info.disagreement:.6g} / reference "
        f"{ref['disagreement']:.6g}; perturbed loss {info.perturbed_loss:.6g} / {ref['perturbed_loss']:.6g}; "
        f"max |w_SAGE - w_ref| after one step (gamma=0) {weight_diff:.2e}"
    )


def time_config(name: str, k: int, batch_size: int, rounds: int, warmup: int, bar: tqdm) -> dict[str, list]:
    base = make_model(name)
    batches = make_batches(k, batch_size)
    calls = {m: build_step(m, copy.deepcopy(base), batches) for m in TIMED}
    ascent = PolarAscent()  # SAGE's defaults: global scaling, 5 muon Newton-Schulz steps, float32
    grads = mean_gradients(base, batches)
    calls["ns"] = lambda: ascent.directions(grads)
    names = list(calls)
    for _ in range(warmup):
        for m in names:
            calls[m]()
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        gc.collect()
        order = names[r % len(names) :] + names[: r % len(names)]
        for m in order:
            start = time.perf_counter()
            calls[m]()
            times[m].append(time.perf_counter() - start)
        bar.update(1)
    return times


def relative_iqr(xs: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return (q3 - q1) / statistics.median(xs)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)  # (idle + iowait, total)


def load_note(seconds: float = 1.0) -> str:
    """How busy the CPUs are before the run (sampled from /proc/stat), with a warning if busy."""
    cores = os.cpu_count() or 1
    try:
        idle0, total0 = _cpu_times()
        time.sleep(seconds)
        idle1, total1 = _cpu_times()
        busy = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
    except (OSError, ValueError, IndexError):
        return f"CPU load before the run: unknown ({cores} cores)"
    note = f"CPU busy before the run: {busy:.0%} of {cores} cores (1 s sample)"
    if busy > 0.1:
        note += (
            " -- WARNING: other processes are running; with several torch threads each parallel kernel "
            "then waits for descheduled threads, which inflates small kernels (Newton-Schulz most)"
        )
    return note


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=["cnn", "mlp"], default=["cnn", "mlp"])
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 5, 8], help="numbers of distributions")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default: cnn 7, mlp 30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each method first")
    parser.add_argument("--batch-cnn", type=int, default=DEFAULT_BATCH["cnn"], help="batch per distribution")
    parser.add_argument("--batch-mlp", type=int, default=DEFAULT_BATCH["mlp"], help="batch per distribution")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-check", action="store_true", help="skip the SAGE / reference cross-check")
    parser.add_argument("--json", default=None, help="also write the raw timings to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: K in {2, 3}, 3 rounds, 1 warm-up")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.warmup = [k for k in args.ks if k <= 3] or [2], 1
        args.rounds = args.rounds or 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch = {"cnn": args.batch_cnn, "mlp": args.batch_mlp}
    rounds = {m: args.rounds or DEFAULT_ROUNDS[m] for m in args.models}

    print(f"torch {torch.__version__}, torchsage {torchsage.__version__}, Python {platform.python_version()}")
    print(f"CPU: {cpu_model()}; torch threads: {torch.get_num_threads()}")
    print(load_note())
    print(
        "SGD lr 0.01; SAM rho 0.05; SAGE rho 0.05, gamma 0.01, normalized_std; "
        "medians over interleaved rounds"
    )
    if not args.no_check:
        for name in args.models:
            print(cross_check(name, 3, batch[name]))
    print()

    results: dict[str, dict[int, dict[str, list[float]]]] = {}
    total = sum(rounds[m] * len(args.ks) for m in args.models)
    with tqdm(total=total, desc="rounds", file=sys.stderr, leave=False) as bar:
        for name in args.models:
            results[name] = {}
            for k in args.ks:
                bar.set_postfix_str(f"{name} K={k}")
                results[name][k] = time_config(name, k, batch[name], rounds[name], args.warmup, bar)

    for name in args.models:
        params = count_parameters(make_model(name))
        print(
            f"### {name}: {params:,} parameters, batch {batch[name]} per distribution, "
            f"{rounds[name]} rounds, {args.warmup} warm-up\n"
        )
        print(
            "| K | ERM ms | SAM ms | SAGE ms | reference ms | SAGE/SAM | reference/SAGE "
            "| NS share of SAGE % |"
        )
        print("|--:|--:|--:|--:|--:|--:|--:|--:|")
        spreads = []
        for k in args.ks:
            t = results[name][k]
            med = {m: statistics.median(xs) * 1e3 for m, xs in t.items()}
            spreads += [relative_iqr(xs) for m, xs in t.items() if m in TIMED and len(xs) >= 4]
            print(
                f"| {k} | {med['erm']:.2f} | {med['sam']:.2f} | {med['sage']:.2f} | {med['reference']:.2f} "
                f"| {med['sage'] / med['sam']:.2f} | {med['reference'] / med['sage']:.2f} "
                f"| {100 * med['ns'] / med['sage']:.1f} |"
            )
        if spreads:
            print(f"\nlargest interquartile range / median of a step timing: {max(spreads):.0%}")
        print()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cpu": cpu_model(),
                    "methods": {m: METHODS[m] for m in TIMED},
                    "seconds": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
