"""Scenarios for the Lightning FSDP2 tests: ``SAGEMixin`` under ``Trainer(strategy=ModelParallelStrategy(
data_parallel_size=2, tensor_parallel_size=1), devices=2)`` started by torchrun (2 gloo processes on the
CPU), the module's ``configure_model`` sharding it with ``fully_shard`` on the data-parallel mesh, and
the same module replayed unsharded in one process on the union of the processes' batches
(test_lightning_fsdp.py). The data and the one-process run are lightning_ddp_worker.py's.

Usage: ``python -m torch.distributed.run --standalone --nproc-per-node 2 lightning_fsdp_worker.py OUTDIR``.
Each rank writes ``OUTDIR/<scenario>.rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torchrun_launch

ddp = torchrun_launch.load_worker(Path(__file__).parent / "lightning_ddp_worker.py")
STEPS = ddp.STEPS

SCENARIOS: dict[str, dict[str, Any]] = {
    "sage": ddp.SCENARIOS["sage"],
    "sam": ddp.SCENARIOS["sam"],
    # the optimizer built before fully_shard, on the unsharded parameters: refused on every process
    "prebuilt": dict(ddp.SCENARIOS["sam"], refused=True, prebuilt=True),
}


def module_class(prebuilt: bool = False) -> type:
    """The DDP tests' module, its ``configure_model`` sharding it when the strategy has a device mesh
    (``prebuilt``: after building the optimizer that ``configure_optimizers`` then returns)."""

    class Sharded(ddp.module_class()):
        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            if prebuilt:
                self.prebuilt = super().configure_optimizers()
            if self._device_mesh is not None:  # ModelParallelStrategy's; None on one device
                fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

        def configure_optimizers(self):
            return self.prebuilt if prebuilt else super().configure_optimizers()

    return Sharded


def run(name: str, world: int, ranks: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """STEPS steps of a scenario under FSDP2 with ``world`` 2 (torchrun), or in one process (see
    lightning_ddp_worker.run), the full weights gathered with ``full_tensor()``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if world > 1 else None
    config = SCENARIOS[name]
    module = module_class(bool(config.get("prebuilt")))
    result = ddp.run(name, world, ranks, module=module, strategy=strategy, config=config)
    result["sharded"] = [hasattr(p, "full_tensor") for p in result["params"]]  # DTensors: FSDP2's
    result["params"] = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in result["params"]]
    return result


def main(out: str) -> None:
    torchrun_launch.save_scenarios(SCENARIOS, out, lambda name: run(name, 2))


if __name__ == "__main__":
    main(sys.argv[1])
