"""Scenarios for the Hugging Face DDP tests: ``SAGETrainer`` started by torchrun (2 gloo processes on
the CPU, accelerate's DistributedDataParallel), and the same Trainer replayed in one process on the
union of the processes' batches (test_hf_ddp.py).

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node 2 hf_ddp_worker.py OUTDIR``.
Each rank writes ``OUTDIR/<scenario>.rank<r>.pt``.

The data: the Trainer here reads the rows in order (``Sequential``, a SequentialSampler instead of
the Trainer's random one) and accelerate hands process ``r`` the batches ``r, r + 2, ...`` of ``B``
rows: step ``b`` of the two processes together reads rows ``2bB ... 2bB + 2B - 1``, the one-process
batch ``b`` of ``2B`` rows (with accumulation, the windows line up the same way). Rows ``i`` and
``i + B`` of every ``2B`` rows, read by the two processes in the same step, share their domain, so
both processes hold as many rows of each domain (the shards layout averages the processes'
per-domain means: the union's mean when the counts are equal).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.nn

ROWS, BATCH, STEPS = 48, 4, 3  # BATCH rows per process and batch; the one-process batch is 2 * BATCH

SCENARIOS: dict[str, dict[str, Any]] = {
    "sage": dict(opt="SAGE", kw=dict(rho=0.05, gamma=0.0, seed=5)),
    "sam": dict(opt="SAM", kw=dict(rho=0.05)),
    "sage_accumulate": dict(opt="SAGE", accumulate=2, kw=dict(rho=0.05, gamma=0.0, seed=5)),
    # SAGE's noise on: rank 0's seed is agreed at construction, so every process draws the same noise
    "sage_noise": dict(opt="SAGE", kw=dict(rho=0.05, gamma=1e-2, seed=5)),
    # an optimizer that does not average the gradients: refused on every process (last: it raises)
    "refused": dict(opt="SAM", refused=True, kw=dict(rho=0.05, process_group=None)),
}


def _test_hf() -> Any:
    """tests/integrations/test_hf.py (its tiny BERT and arguments), imported by path."""
    path = Path(__file__).parents[1] / "integrations" / "test_hf.py"
    spec = importlib.util.spec_from_file_location("test_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 40, (ROWS, 8), generator=g)
        # rows i and i + BATCH of every 2 * BATCH rows: the same domain
        per_step = torch.randint(0, 3, (ROWS // (2 * BATCH), BATCH), generator=g)
        self.domain = per_step.repeat(1, 2).reshape(-1)
        self.labels = (self.ids[:, 0] % 3 + self.domain) % 3

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[i],
            "domain": self.domain[i],
        }


def own_rows(rank: int) -> list[int]:
    """The rows process ``rank`` reads: its batches ``rank, rank + 2, ...`` of ``BATCH`` rows."""
    return [i for i in range(ROWS) if (i // BATCH) % 2 == rank]


def run(name: str, world: int, out: str, ranks: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """STEPS steps of a scenario: under DDP with ``world`` 2 (started by torchrun), or in one
    process with ``world`` 1 on the union of the batches of ``ranks`` (``(0,)``: process 0's own)."""
    import torchsage
    from torchsage.integrations.hf import SAGETrainer

    class Sequential(SAGETrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    config = SCENARIOS[name]
    hf = _test_hf()
    trainer = Sequential(
        model=hf.tiny_bert(0),
        args=hf.arguments(
            out,
            per_device_train_batch_size=BATCH * (len(ranks) // world),
            gradient_accumulation_steps=config.get("accumulate", 1),
            max_steps=STEPS,
            logging_steps=1,
            optim="sgd",  # plain SGD: Adam's first steps move by about lr whatever the gradient's size
            learning_rate=0.5,
            ddp_backend="gloo" if world > 1 else None,
        ),
        train_dataset=Rows() if len(ranks) == 2 else torch.utils.data.Subset(Rows(), own_rows(ranks[0])),
        group_column="domain",
        groups=hf.GROUPS,
        optimizer_class=getattr(torchsage, config["opt"]),
        optimizer_kwargs=config["kw"],
    )
    trainer.train()
    info = trainer.last_step_info
    return {
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "info": info.as_dict(),
        "global_step": trainer.state.global_step,
        # the step handed accelerate's DistributedDataParallel module to the optimizer (model=)
        "handed": _optimizer_model(trainer) is trainer.model_wrapped,
    }


def _optimizer_model(trainer: Any) -> Any:
    parallel = trainer.optimizer.optimizer._parallel
    return None if parallel is None else parallel.model


def main(out: str) -> None:
    from torchrun_launch import save_scenarios

    save_scenarios(SCENARIOS, out, lambda name: run(name, 2, os.path.join(out, name)))


if __name__ == "__main__":
    main(sys.argv[1])
