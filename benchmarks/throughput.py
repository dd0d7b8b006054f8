"""Data-parallel throughput on CPU (gloo) and the bytes all-reduced per step as K grows.

Throughput: ERM (a DistributedDataParallel model, plain SGD step on the mean loss), ``torchsage.SAM``
(rho 0.05) and ``torchsage.SAGE`` (rho 0.05, gamma 0.01), shards layout, on the 784-256-256-10 MLP
with K distributions of a fixed global batch each, run with 1 and with 2 processes (one thread
each; with 2, each process holds half of every batch). Every round runs one step of each method in
a rotated order after a barrier; samples/s is the global batch (K x batch) over the median step
time of rank 0.

Communication: for each K, the payload bytes all-reduced per step and per process (what each
process contributes to the sums), counted by torchsage's communicator for SAM and SAGE (shards and
domains layouts) and by a counting DDP communication hook for ERM, with 2 processes.

    python benchmarks/throughput.py                   # full run
    python benchmarks/throughput.py --quick           # smoke run
    python benchmarks/throughput.py --ks 2 8 32 --rounds 20 --json out.json

The script launches itself under ``python -m torch.distributed.run --standalone`` once per process
count and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.nn  # before init_process_group: docs/distributed.md, "Teardown"
import torch.nn.functional as F

import torchsage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import count_parameters, make_batches, mlp

WIDTHS = (784, 256, 256, 10)
METHODS = ("erm", "sam", "sage")
LABELS = {"erm": "ERM (DDP)", "sam": "SAM", "sage": "SAGE", "sage_domains": "SAGE, domains layout"}


def shard(batches, rank: int, world: int):
    size = len(batches[0][0]) // world
    return [(x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]) for x, y in batches]


def counting_ddp(model, counter: list[int]):
    """DDP whose gradient all-reduce adds its bucket sizes to ``counter[0]``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ddp = torch.nn.parallel.DistributedDataParallel(model)

    def hook(state, bucket):
        buffer = bucket.buffer()
        counter[0] += buffer.numel() * buffer.element_size()
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp


def build(method: str, batches, layout: str = "shards", counter: list[int] | None = None):
    """A zero-argument step of ``method`` on a fresh model (same initial weights everywhere)."""
    torch.manual_seed(0)
    model = mlp(WIDTHS)
    if method == "erm":
        net = counting_ddp(model, counter if counter is not None else [0])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.stack([F.cross_entropy(net(x), y) for x, y in batches]).mean().backward()
            opt.step()

        return step, opt
    if method == "sam":
        opt = torchsage.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, layout=layout)
    else:
        opt = torchsage.SAGE(
            model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.01, lr=0.01, seed=0, layout=layout
        )

    def closure():
        return [F.cross_entropy(model(x), y) for x, y in batches]

    return (lambda: opt.step(closure)), opt


def worker(args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        union = make_batches(args.k, args.batch, seed=0)
        steps = {m: build(m, shard(union, rank, world))[0] for m in METHODS}
        for _ in range(args.warmup):
            for m in METHODS:
                steps[m]()
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for r in range(args.rounds):
            for m in METHODS[r % 3 :] + METHODS[: r % 3]:
                dist.barrier()
                start = time.perf_counter()
                steps[m]()
                times[m].append(time.perf_counter() - start)
        result = {
            "world": world,
            "k": args.k,
            "batch": args.batch,
            "parameters": count_parameters(mlp(WIDTHS)),
            "median_s": {m: statistics.median(t) for m, t in times.items()},
        }
        if world > 1:
            result["bytes"] = communication(args.ks, args.batch, rank, world)
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump(result, f)
        dist.barrier()  # every rank done before any tears down its connections
    finally:
        dist.destroy_process_group()


def communication(ks, batch: int, rank: int, world: int, steps: int = 2) -> dict[str, dict]:
    """Per K and method: payload bytes and collectives per step (after one warm-up step)."""
    table: dict[str, dict] = {}
    for k in ks:
        union = make_batches(k, batch, seed=1)
        row = {}
        for method in ("erm", "sam", "sage", "sage_domains"):
            if method == "sage_domains":
                if k % world:
                    continue
                mine = union[rank * (k // world) : (rank + 1) * (k // world)]  # whole distributions
                step, opt = build("sage", mine, layout="domains")
            else:
                counter = [0]
                step, opt = build(method, shard(union, rank, world), counter=counter)
            step()
            if method == "erm":
                counter[0] = 0
                for _ in range(steps):
                    step()
                row[method] = {"bytes": counter[0] / steps, "calls": None}
                continue
            comm = opt._parallel.comm
            b0, c0 = comm.bytes_reduced, comm.calls
            for _ in range(steps):
                step()
            row[method] = {"bytes": (comm.bytes_reduced - b0) / steps, "calls": (comm.calls - c0) / steps}
        table[str(k)] = row
    return table


def launch(nproc: int, args, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [os.path.abspath(__file__), "--worker", "--out", out, "--k", str(args.k)]
    cmd += ["--batch", str(args.batch), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    cmd += ["--ks", *map(str, args.ks)]
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=4, help="distributions in the throughput runs")
    parser.add_argument("--batch", type=int, default=64, help="global batch per distribution")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % 2:
        parser.error("--batch must be even (it is split over 2 processes)")
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.rounds, args.warmup, args.ks = 3, 1, [2, 4]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: launch(n, args, os.path.join(tmp, f"{n}.json")) for n in (1, 2)}
    samples = args.k * args.batch
    print(f"\nMLP {'-'.join(map(str, WIDTHS))} ({runs[1]['parameters']} parameters), K = {args.k}, ")
    print(f"global batch {args.batch} per distribution ({samples} samples per step), 1 thread per process\n")
    print("| method | 1 process: samples/s | 2 processes: samples/s | 2 vs 1 |")
    print("|---|---|---|---|")
    for m in METHODS:
        one, two = (samples / runs[n]["median_s"][m] for n in (1, 2))
        print(f"| {LABELS[m]} | {one:.0f} | {two:.0f} | {two / one:.2f}x |")
    n = runs[1]["parameters"]
    print(f"\nBytes all-reduced per step and process (2 processes; gradient = {4 * n} bytes), collectives:\n")
    methods = ("erm", "sam", "sage", "sage_domains")
    print("| K | " + " | ".join(LABELS[m] for m in methods) + " |")
    print("|---" * (len(methods) + 1) + "|")
    for k, row in runs[2]["bytes"].items():
        cells = []
        for m in methods:
            if m not in row:
                cells.append("-")
                continue
            b, c = row[m]["bytes"], row[m]["calls"]
            cells.append(f"{b / 1e6:.2f} MB ({b / (4 * n):.2f} grads)" + (f", {c:.0f} calls" if c else ""))
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
