"""Scenarios for the FSDP2 tests: run under torchrun by test_fsdp.py (2 processes, gloo, CPU), each
on a model sharded with ``fully_shard``, and replayed in one process on the union of the shards.

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node 2 fsdp_worker.py OUTDIR``.
Each rank writes ``OUTDIR/<scenario>.rank<r>.pt``.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

K, BATCH, STEPS = 3, 8, 3
VOCAB = 32

SCENARIOS: dict[str, dict[str, Any]] = {
    "sam": dict(opt="SAM", kw=dict(rho=0.05)),
    "asam": dict(opt="ASAM", kw=dict(rho=0.5)),
    "sagm": dict(opt="SAGM", kw=dict(rho=0.05, alpha=0.01)),
    "gsam": dict(opt="GSAM", kw=dict(rho=0.05, alpha=0.3)),
    "sam_micro": dict(opt="SAM", micro=True, kw=dict(rho=0.05)),
    "sam_nan": dict(opt="SAM", nan=True, kw=dict(rho=0.05, on_nonfinite="skip")),
    # SAGE without noise: every rho scaling and disagreement measure, micro-batches too
    "sage": dict(opt="SAGE", kw=dict(rho=0.05, gamma=0.0)),
    "sage_weight_cosine": dict(
        opt="SAGE", kw=dict(rho=0.01, gamma=0.0, rho_scaling="weight", disagreement="cosine")
    ),
    "sage_layer_micro_express": dict(
        opt="SAGE",
        micro=True,
        kw=dict(rho=0.02, gamma=0.0, rho_scaling="layer", ns_steps=6, ns_coefficients="polar_express"),
    ),
    # the noise alone (rho 0), plain SGD with lr 1: the weights move by minus the gradient and the
    # noise, so the one-process step without noise leaves the noise in the difference
    "sage_noise": dict(opt="SAGE", noise=True, kw=dict(rho=0.0, gamma=5.0)),
    "align": dict(opt="SAGEAlign", kw=dict(rho=0.05, lambda_max=0.8)),
    "align_vectors_unmixed": dict(
        opt="SAGEAlign", kw=dict(rho=0.05, mix_vectors=False, rho_scaling="weight")
    ),
    "solver_refused": dict(opt="SAGE", refused=True, kw=dict(rho=0.05, solver="mean")),
    # an embedding: its gradient's rows are the batch's tokens', the rest zero on each shard
    "sage_embedding": dict(opt="SAGE", embedding=True, kw=dict(rho=0.05, gamma=0.0)),
    "sage_embedding_weight": dict(
        opt="SAGE", embedding=True, kw=dict(rho=0.02, gamma=0.0, rho_scaling="weight")
    ),
    # a resume between steps 1 and 2 (model and optimizer state dicts through torch.save): without
    # noise it must equal the one-process run; with noise, the sharded run that did not stop
    "sage_resume": dict(opt="SAGE", resume=True, kw=dict(rho=0.05, gamma=0.0)),
    "sage_noisy": dict(opt="SAGE", own=True, kw=dict(rho=0.05, gamma=0.5)),
    "sage_noisy_resume": dict(opt="SAGE", own=True, resume=True, kw=dict(rho=0.05, gamma=0.5)),
    # per-group ascent directions: the first layer along SAM's direction, the last weight not
    # perturbed, the last bias by default (its normalised gradient)
    "sage_groups": dict(opt="SAGE", groups=True, kw=dict(rho=0.05, gamma=0.0)),
    "sage_groups_weight": dict(opt="SAGE", groups=True, kw=dict(rho=0.02, gamma=0.0, rho_scaling="weight")),
    "align_groups": dict(opt="SAGEAlign", groups=True, kw=dict(rho=0.05, lambda_max=0.8)),
}


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, 4, generator=gen) * (1 + k) + k, torch.randint(0, 3, (BATCH,), generator=gen))
        for k in range(K)
    ]


def build_model(width: int = 8) -> nn.Module:
    torch.manual_seed(100)  # the same on every process: fully_shard keeps each process's own rows
    # 8 x 4 splits evenly over 2 processes, 3 x 8 and the 3-vector do not (2 rows and 1)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))


def _setup(config: dict[str, Any], rank: int | None, world: int) -> tuple[nn.Module, Any, list]:
    """The scenario's model (sharded when ``rank`` is not None), optimizer and batches."""
    import torchsage

    noise = bool(config.get("noise"))
    model = build_model(256 if noise else 8)
    if config.get("embedding"):  # 32 token rows, 16 per process; a batch uses some of them
        torch.manual_seed(100)
        model = nn.Sequential(nn.EmbeddingBag(VOCAB, 6, mode="mean"), nn.Linear(6, 3))
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    batches = data()
    if config.get("embedding"):
        batches = [(torch.remainder((x * 3).long(), VOCAB), y) for x, y in batches]
    if rank is not None:
        size = BATCH // world
        batches = [
            (x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]) for x, y in batches
        ]
    cls = getattr(torchsage, config["opt"]) if config["opt"] != "SAGEAlign" else torchsage.optim.SAGEAlign
    kw = dict(config["kw"])
    if config["opt"].startswith("SAGE"):
        kw["seed"] = 5
    if noise and rank is None:
        kw["gamma"] = 0.0  # the reference without noise
    base = dict(lr=1.0) if noise else dict(lr=0.1, momentum=0.9)
    groups: Any = model.parameters()
    if config.get("groups"):
        first, last = model[0], model[2]
        groups = [
            {"params": first.parameters(), "ascent": "gradient"},
            {"params": [last.weight], "ascent": "none"},
            {"params": [last.bias]},
        ]
    return model, cls(groups, torch.optim.SGD, **base, **kw), batches


def _step(config: dict[str, Any], model: nn.Module, opt: Any, batches: list, step: int, rank: int | None):
    import torchsage

    poisoned = config.get("nan") and step == 1 and rank in (None, 1)

    def losses(rows=slice(None)):
        out = [F.cross_entropy(model(x[rows]), y[rows]) for x, y in batches]
        return [*out[:2], out[2] * float("nan")] if poisoned else out

    closure: Any = losses
    if config.get("micro"):
        half = len(batches[0][0]) // 2
        closure = torchsage.MicroBatches([lambda: losses(slice(0, half)), lambda: losses(slice(half, None))])
    return opt.step(closure).as_dict()


def _full(model: nn.Module) -> list[torch.Tensor]:
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [p.detach().clone() for p in params]


def run(name: str, rank: int | None, world: int) -> dict[str, Any]:
    """STEPS steps of a scenario; rank None: the one-process reference on the union. With
    ``resume``, on the shards, after the first step the model's and the optimizer's state dicts go through
    ``torch.save``/``torch.load`` into a freshly built (and sharded) model and optimizer, which take
    the remaining steps."""
    config = SCENARIOS[name]
    model, opt, batches = _setup(config, rank, world)
    start = _full(model)
    infos = []
    for step in range(1 if config.get("noise") else STEPS):
        if config.get("resume") and rank is not None and step == 1:  # the reference runs straight
            saved = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
            model, opt, batches = _setup(config, rank, world)
            saved.seek(0)
            state = torch.load(saved, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        infos.append(_step(config, model, opt, batches, step, rank))
    return {"params": _full(model), "start": start, "infos": infos, "state": len(opt.state)}


def main(out: str) -> None:
    import torch.distributed as dist

    from torchsage.optim import torchrun_session

    torch.set_num_threads(1)
    with torchrun_session():
        rank, world = dist.get_rank(), dist.get_world_size()
        for name in SCENARIOS:
            print(f"rank {rank}: scenario {name}", file=sys.stderr, flush=True)
            try:
                result = run(name, rank, world)
            except ValueError as error:  # recorded: the test expects it on every process
                result = {"error": str(error)}
            torch.save(result, os.path.join(out, f"{name}.rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
