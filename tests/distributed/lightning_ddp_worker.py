"""Scenarios for the Lightning DDP tests: ``SAGEMixin`` under ``Trainer(strategy="ddp", devices=2)``
started by torchrun (2 gloo processes on the CPU), and the same module replayed in one process on
the union of the processes' batches (test_lightning_ddp.py).

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node 2 lightning_ddp_worker.py OUTDIR``.
Each rank writes ``OUTDIR/<scenario>.rank<r>.pt``.

The data: for training Lightning gives each process a shuffling ``DistributedSampler`` (seed 0):
process ``r`` reads rows ``perm[r::2]`` of the permutation ``perm`` it draws in epoch 0. Rows
``perm[2j]`` and ``perm[2j + 1]`` get the same domain, so both processes hold as many rows of each
domain in every batch (the shards layout averages the processes' per-domain means: the union's
mean when the counts are equal). The one-process run reads, as its batch ``b``, process 0's batch
``b`` followed by process 1's (:func:`union_order`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed.nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

GROUPS = {0: "photo", 1: "art", 2: "sketch"}
ROWS, BATCH, STEPS = 48, 4, 3  # BATCH rows per process and step; the one-process batch is 2 * BATCH

SCENARIOS: dict[str, dict[str, Any]] = {
    "sage": dict(opt="SAGE", kw=dict(rho=0.05, gamma=0.0, seed=3)),
    "sam": dict(opt="SAM", kw=dict(rho=0.05)),
    "sage_accumulate": dict(opt="SAGE", accumulate=2, kw=dict(rho=0.05, gamma=0.0, seed=3)),
    # SAGE's noise on: rank 0's seed is agreed at construction, so every process draws the same noise
    "sage_noise": dict(opt="SAGE", noise=True, kw=dict(rho=0.05, gamma=0.05, seed=3)),
    # an optimizer that does not average the gradients: refused on every process (last: it raises)
    "refused": dict(opt="SAM", refused=True, kw=dict(rho=0.05, process_group=None)),
}


def _sampler_rows(rank: int) -> list[int]:
    """The rows process ``rank`` of 2 reads in epoch 0 under Lightning's DistributedSampler."""
    from torch.utils.data import DistributedSampler

    return list(DistributedSampler(range(ROWS), num_replicas=2, rank=rank, shuffle=True, seed=0))


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, 6, generator=g)
    domain = torch.empty(ROWS, dtype=torch.long)
    pairs = torch.randint(0, 3, (ROWS // 2,), generator=g)
    domain[_sampler_rows(0)] = pairs  # the j-th row of each process: the same domain
    domain[_sampler_rows(1)] = pairs
    y = ((x[:, 0] + 0.5 * domain) > 0.3).long()
    return TensorDataset(x, y, domain)


def union_order(ranks: tuple[int, ...] = (0, 1)) -> list[int]:
    """The rows in the order of the one-process run: batch ``b`` holds each process's batch ``b``."""
    rows = [_sampler_rows(r) for r in ranks]
    return [i for b in range(0, ROWS // 2, BATCH) for mine in rows for i in mine[b : b + BATCH]]


def module_class() -> type:
    import lightning as L

    import torchsage
    from torchsage.integrations.lightning import SAGEMixin

    class Classifier(SAGEMixin, L.LightningModule):
        def __init__(self, opt: str, kw: dict[str, Any]):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
            self.opt, self.kw = opt, kw
            self.infos: list[dict[str, Any]] = []

        def training_step(self, batch, batch_idx):
            x, y, domain = batch

            def closure():
                per_sample = F.cross_entropy(self.net(x), y, reduction="none")
                return torchsage.group_losses(per_sample, domain, GROUPS)

            info = self.sage_step(closure, sizes=torchsage.group_sizes(domain, GROUPS))
            if info is not None:
                self.infos.append(info.as_dict())

        def configure_optimizers(self):
            cls = getattr(torchsage, self.opt)
            return cls(self.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **self.kw)

    return Classifier


def run(
    name: str,
    world: int,
    ranks: tuple[int, ...] = (0, 1),
    module: type | None = None,
    strategy: Any = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """STEPS steps of a scenario: under DDP with ``world`` 2 (started by torchrun), or in one
    process with ``world`` 1 on the union of the batches of ``ranks`` (``(0,)``: process 0's own).
    ``module``, ``strategy`` and ``config`` replace the module class, ``"ddp"`` and the scenario
    (lightning_fsdp_worker.py)."""
    import lightning as L

    config = config or SCENARIOS[name]
    model = (module or module_class())(config["opt"], config["kw"])
    options: dict[str, Any] = dict(strategy=strategy or "ddp", devices=2) if world > 1 else dict(devices=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        accumulate_grad_batches=config.get("accumulate", 1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )
    if world > 1:
        loader = DataLoader(dataset(), batch_size=BATCH, shuffle=True)  # Lightning puts in its sampler
    else:
        loader = DataLoader(dataset(), batch_size=BATCH * len(ranks), sampler=union_order(ranks))
    trainer.fit(model, loader)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "infos": model.infos,
        "global_step": trainer.global_step,
    }


def main(out: str) -> None:
    from torchrun_launch import save_scenarios

    save_scenarios(SCENARIOS, out, lambda name: run(name, 2))


if __name__ == "__main__":
    main(sys.argv[1])
