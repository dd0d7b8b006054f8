"""FSDP2 (``fully_shard``) against DistributedDataParallel under SAGE: step time and peak memory
per process, under ``torchrun`` on the CPU (gloo) or on GPUs (nccl).

Every process builds the same MLP (784-W-W-W-10), holds its shard of K random batches and takes
SAGE steps (rho 0.05, gamma 1e-3, SGD lr 0.01 momentum 0.9); the model is wrapped in
``fully_shard`` (``--mode fsdp``) or ``DistributedDataParallel`` (``--mode ddp``). After one warm-up
step, ``--steps`` steps are timed (median). Peak memory: on the CPU the growth of the process's
peak resident set (``ru_maxrss``) from just before the model is built, so it counts the model,
its gradients, the optimizer's state and buffers, the activations and the communication buffers
(and whatever the allocator keeps, and the library code pages first touched: run the same with
``--width 16`` and subtract, as docs/benchmarks.md does); on a GPU
``torch.cuda.max_memory_allocated``. Besides, what each process keeps between steps is counted
(its parameters, gradients and optimizer state: the local shards under FSDP2). Rank 0 prints one
JSON line with every rank's figures.

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_vs_ddp.py --mode fsdp
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_vs_ddp.py --mode ddp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.nn  # before the group exists: see torchsage.optim.torchrun_session
import torch.nn.functional as F

import torchsage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fsdp", "ddp"], required=True)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="samples per distribution per process")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    torch.manual_seed(0)
    w = args.width
    model = torch.nn.Sequential(
        torch.nn.Linear(784, w), torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
        torch.nn.Linear(w, w), torch.nn.ReLU(), torch.nn.Linear(w, 10),
    ).to(device)  # fmt: skip
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
        net, kw = model, {}
    else:
        net = torch.nn.parallel.DistributedDataParallel(model)
        kw = {"model": net}
    opt = torchsage.SAGE(
        model.parameters(), torch.optim.SGD, rho=0.05, gamma=1e-3, lr=0.01, momentum=0.9, seed=0, **kw
    )
    gen = torch.Generator().manual_seed(rank)
    batches = [
        (torch.randn(args.batch, 784, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
        for _ in range(args.k)
    ]
    batches = [(x.to(device), y.to(device)) for x, y in batches]

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step(lambda: [F.cross_entropy(net(x), y) for x, y in batches])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step()
    times = [step() for _ in range(args.steps)]
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # what the process keeps between steps, counted: its parameters, their gradients and the
    # optimizer's state (momentum), each the local shard under FSDP2
    kept = [p for p in model.parameters()]
    kept += [p.grad for p in model.parameters() if p.grad is not None]
    kept += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in kept]
    state = sum(t.numel() * t.element_size() for t in local) / 2**20
    mine = torch.tensor([statistics.median(times), peak, state], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "world": world,
                    "device": device.type,
                    "parameters": params,
                    "k": args.k,
                    "batch_per_process": args.batch,
                    "median_step_s": [round(float(t[0]), 3) for t in every],
                    "peak_mib": [round(float(t[1]), 1) for t in every],
                    "kept_mib": [round(float(t[2]), 1) for t in every],
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
