"""SAGETrainer and FSDP2: transformers builds the optimizer before accelerate shards the model and
then switches the optimizer's parameter groups to the shards (``fsdp2_switch_optimizer_parameters``);
a torchsage optimizer built on the unsharded parameters cannot step them, so SAGETrainer refuses it.

accelerate runs FSDP only on GPU-like devices: under torchrun on the CPU (``use_cpu=True``,
``ddp_backend="gloo"``) it drops the FSDP plugin and trains under DDP (test_hf_ddp.py), so the
refusal is checked here on what accelerate does to the optimizer, in one gloo process."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("accelerate")
pytest.importorskip("torch.distributed.fsdp")

import torchsage
from torchsage.integrations import data_parallel


@pytest.fixture
def one_process(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def test_an_optimizer_switched_to_the_shards_by_accelerate_is_refused(one_process):
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    from torch.distributed.fsdp import fully_shard

    model = _model()
    optimizer = torchsage.SAGE(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.0, lr=0.1)
    old = {n: p.data_ptr for n, p in model.named_parameters()}  # accelerate's keys
    fully_shard(model, mesh=one_process)
    fsdp2_switch_optimizer_parameters(optimizer, {old[n]: p for n, p in model.named_parameters()})
    assert all(hasattr(p, "full_tensor") for g in optimizer.param_groups for p in g["params"])
    with pytest.raises(
        ValueError, match=r"SAGETrainer: the model was sharded with fully_shard .* train with DDP"
    ):
        data_parallel(optimizer, 2, model, "SAGETrainer")


def test_an_optimizer_built_on_the_shards_is_taken(one_process):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model, mesh=one_process)
    optimizer = torchsage.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    data_parallel(optimizer, 2, model, "SAGETrainer")  # the shards reduce themselves: nothing to do
    assert optimizer.passes.sharded
