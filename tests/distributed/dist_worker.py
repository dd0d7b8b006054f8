"""Scenarios for the distributed tests: run under torchrun by test_optim.py, and replayed in one
process (on the union of the shards) as the reference.

Usage (what the test runs): ``python -m torch.distributed.run --standalone --nproc-per-node 2
dist_worker.py OUTDIR``. Each rank writes ``OUTDIR/<scenario>.rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

K = 3  # distributions
BATCH = 8  # union batch per distribution
STEPS = 3
DOMAINS = {0: [0, 1], 1: [2]}  # domains layout with 2 processes: unequal counts on purpose

SCENARIOS: dict[str, dict[str, Any]] = {
    "sage_shards": dict(opt="SAGE", layout="shards", kw=dict(rho=0.05, gamma=0.05)),
    "sage_shards_lazy": dict(opt="SAGE", layout="shards", lazy=True, kw=dict(rho=0.05, gamma=0.05)),
    # two distributions per collective: 3 distributions take two bucket flushes
    "sage_shards_small_bucket": dict(
        opt="SAGE", layout="shards", bucket_rows=2, kw=dict(rho=0.05, gamma=0.05)
    ),
    "sam_shards": dict(opt="SAM", layout="shards", kw=dict(rho=0.05)),
    "sage_domains_cosine": dict(
        opt="SAGE", layout="domains", kw=dict(rho=0.05, gamma=0.05, disagreement="cosine")
    ),
    "sage_domains": dict(opt="SAGE", layout="domains", kw=dict(rho=0.05, gamma=0.05)),
    "align_domains": dict(opt="SAGEAlign", layout="domains", kw=dict(rho=0.05, lambda_max=0.8)),
    "sam_domains": dict(opt="SAM", layout="domains", kw=dict(rho=0.05)),
    "sage_shards_ddp": dict(opt="SAGE", layout="shards", ddp=True, kw=dict(rho=0.05, gamma=0.05)),
    "sam_domains_ddp": dict(opt="SAM", layout="domains", ddp=True, kw=dict(rho=0.05)),
    # DDP without find_unused_parameters on a model with a parameter no loss reaches, activation
    # checkpointing inside the model, and each shard given in two micro-batches
    "sage_shards_ddp_unused": dict(
        opt="SAGE", layout="shards", ddp=True, unused=True, kw=dict(rho=0.05, gamma=0.05)
    ),
    "sage_shards_ddp_checkpoint": dict(
        opt="SAGE", layout="shards", ddp=True, checkpoint=True, kw=dict(rho=0.05, gamma=0.05)
    ),
    "sage_shards_ddp_micro": dict(
        opt="SAGE", layout="shards", ddp=True, micro=True, kw=dict(rho=0.05, gamma=0.05)
    ),
    "sam_shards_micro": dict(opt="SAM", layout="shards", micro=True, kw=dict(rho=0.05)),
    "gsam_shards_ddp": dict(opt="GSAM", layout="shards", ddp=True, kw=dict(rho=0.05, alpha=0.3)),
    "gsam_shards": dict(opt="GSAM", layout="shards", kw=dict(rho=0.05, alpha=0.3)),
    "align_shards_ddp": dict(opt="SAGEAlign", layout="shards", ddp=True, kw=dict(rho=0.05, lambda_max=0.8)),
    "sage_upgrad_shards_ddp": dict(
        opt="SAGE", layout="shards", ddp=True, solver="upgrad", kw=dict(rho=0.05, gamma=0.05)
    ),
    "sage_shards_nan": dict(opt="SAGE", layout="shards", nan=True, kw=dict(rho=0.05, gamma=0.05)),
    "sage_domains_nan": dict(opt="SAGE", layout="domains", nan=True, kw=dict(rho=0.05, gamma=0.05)),
    "sage_upgrad_shards": dict(opt="SAGE", layout="shards", solver="upgrad", kw=dict(rho=0.05, gamma=0.05)),
    # per-distribution weights (step(closure, weights=...)): the same on every shard
    "sage_shards_weights": dict(
        opt="SAGE", layout="shards", bucket_rows=2, weights=[1.0, 3.0, 2.0], kw=dict(rho=0.05, gamma=0.05)
    ),
    "sam_shards_weights": dict(opt="SAM", layout="shards", weights=[1.0, 3.0, 2.0], kw=dict(rho=0.05)),
    # the domains layout refuses weights (each process holds only some distributions)
    "sage_domains_weights": dict(
        opt="SAGE", layout="domains", refused=True, weights=[1.0, 3.0, 2.0], kw=dict(rho=0.05, gamma=0.05)
    ),
    # rank 0 holds 3 distributions, rank 1 only 2: a shards layout error on both processes
    "sam_shards_unequal": dict(opt="SAM", layout="shards", unequal=True, kw=dict(rho=0.05)),
    "sage_shards_unequal": dict(opt="SAGE", layout="shards", unequal=True, kw=dict(rho=0.05, gamma=0.05)),
}


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The union batches, identical in every process."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for k in range(K):
        x = torch.randn(BATCH, 4, generator=gen) * (1 + k) + k
        y = torch.randint(0, 3, (BATCH,), generator=gen)
        out.append((x, y))
    return out


class TwoHeads(nn.Module):
    """A trunk shared by two tasks, one head each."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


class Checkpointed(nn.Module):
    """The usual network with its hidden layer under activation checkpointing (recomputed in the
    backward pass instead of stored)."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.spare = nn.Linear(8, 3) if unused else None  # reached by no loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spare is not None:
            return self.head(self.body(x))
        return self.head(torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False))


def build_model(config: dict[str, Any]) -> nn.Module:
    if config.get("solver"):
        return TwoHeads()
    if config.get("checkpoint") or config.get("unused"):
        return Checkpointed(unused=bool(config.get("unused")))
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def local_batches(config: dict[str, Any], rank: int | None, world: int) -> dict[int, tuple]:
    """This process's batches, keyed by distribution: all of them on the union (rank None)."""
    batches = dict(enumerate(data()))
    if rank is None:
        return batches
    if config["layout"] == "domains":
        return {k: batches[k] for k in DOMAINS[rank]}
    size = BATCH // world
    if config.get("unequal") and rank == 1:
        batches.pop(2)
    return {
        k: (x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size])
        for k, (x, y) in batches.items()
    }


def make_closure(config, net, batches, step, rank):
    """Per-distribution losses; the NaN scenarios poison distribution 2 at step 1 (on the process
    that holds it, or on rank 1's shard)."""

    def poisoned(k: int, loss: torch.Tensor) -> torch.Tensor:
        if config.get("nan") and step == 1 and k == 2 and rank in (None, 1):
            return loss * float("nan")
        return loss

    if config.get("solver"):
        (x0, y0), (x1, y1) = batches[0], batches[1]

        def closure():
            return {"a": F.cross_entropy(net(x0)[0], y0), "b": F.cross_entropy(net(x1)[1], y1 % 2)}

        return closure
    if config.get("micro") and rank is not None:  # this shard in two micro-batches
        import torchsage

        def half(part: int):
            def closure():
                out = []
                for x, y in batches.values():
                    rows = slice(0, len(x) // 2) if part == 0 else slice(len(x) // 2, len(x))
                    out.append(F.cross_entropy(net(x[rows]), y[rows]))
                return out

            return closure

        return torchsage.MicroBatches([half(0), half(1)])
    if config.get("lazy"):

        def closure():
            return (poisoned(k, F.cross_entropy(net(x), y)) for k, (x, y) in batches.items())

        return closure

    def closure():
        return [poisoned(k, F.cross_entropy(net(x), y)) for k, (x, y) in batches.items()]

    return closure


def run(name: str, rank: int | None, world: int, seed_offset: int = 0) -> dict[str, Any]:
    """Runs one scenario for STEPS steps; rank None is the single-process reference on the union."""
    import torchsage

    # The optimizer's own test reaches into its private module on purpose: it shrinks the gradient
    # bucket size so that small models exercise the multi-bucket path. No other package does this.
    from torchsage.optim import _distributed

    config = SCENARIOS[name]
    torch.manual_seed(100 + seed_offset)  # ranks differ: the optimizer must agree on rank 0's state
    model = build_model(config)
    net = model
    if config.get("ddp") and rank is not None:
        net = nn.parallel.DistributedDataParallel(model)
    cls = getattr(torchsage, config["opt"]) if config["opt"] != "SAGEAlign" else torchsage.optim.SAGEAlign
    kw = dict(config["kw"])
    if config["opt"].startswith("SAGE"):
        kw["seed"] = None if rank is not None else 100  # rank 0's torch.initial_seed()
    if config.get("nan"):
        kw["on_nonfinite"] = "skip"
    if config.get("solver"):
        from torchjd.aggregation import UPGrad

        kw["solver"] = UPGrad()
    saved = _distributed.BUCKET_BYTES
    if config.get("bucket_rows"):
        n = sum(p.numel() for p in model.parameters())
        _distributed.BUCKET_BYTES = config["bucket_rows"] * n * 4
    try:
        opt = cls(
            model.parameters(),
            torch.optim.SGD,
            lr=0.1,
            momentum=0.9,
            model=net,
            layout=config["layout"],
            **kw,
        )
        batches = local_batches(config, rank, world)
        infos = []
        for step in range(STEPS):
            closure = make_closure(config, net, batches, step, rank)
            infos.append(opt.step(closure, weights=config.get("weights")).as_dict())
    finally:
        _distributed.BUCKET_BYTES = saved
    result: dict[str, Any] = {
        "params": [p.detach().clone() for p in model.parameters()],
        "infos": infos,
    }
    if hasattr(opt, "seed"):
        result["seed"] = opt.seed
        result["generators"] = {k: g.get_state() for k, g in opt._generators.items()}
    if opt._parallel is not None:
        result["calls"] = opt._parallel.comm.calls
        result["bytes"] = opt._parallel.comm.bytes_reduced
    return result


def threads() -> dict[str, str]:
    """This process's threads: {thread id: name} (Linux; empty elsewhere)."""
    task = "/proc/self/task"
    if not os.path.isdir(task):
        return {}
    names = {}
    for tid in os.listdir(task):
        try:
            with open(os.path.join(task, tid, "comm")) as f:
                names[tid] = f.read().strip()
        except OSError:  # the thread ended meanwhile
            pass
    return names


def main(out: str) -> None:
    import torch.distributed as dist

    from torchsage.optim import torchrun_session

    torch.set_num_threads(1)
    before = threads()
    # the library's session: joins the group, and at the end a barrier, then a teardown that leaves
    # no thread of the group running into interpreter shutdown
    with torchrun_session():
        rank, world = dist.get_rank(), dist.get_world_size()
        for name in SCENARIOS:
            print(f"rank {rank}: scenario {name}", file=sys.stderr, flush=True)  # locates a crash
            try:
                result = run(name, rank, world, seed_offset=rank)
            except ValueError as error:  # recorded: the test expects it on every process
                result = {"error": str(error)}
            torch.save(result, os.path.join(out, f"{name}.rank{rank}.pt"))
    # threads started during the session and still running after it (the group's, if it survived)
    left = sorted(name for tid, name in threads().items() if tid not in before)
    torch.save(left, os.path.join(out, f"threads_left.rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
