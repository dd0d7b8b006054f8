"""torchsage.integrations.data_parallel's refusals, without processes (the runs under torchrun are
tests/distributed/test_lightning_ddp.py and test_hf_ddp.py)."""

from types import SimpleNamespace

import pytest
import torch

from torchsage.integrations import data_parallel


def optimizer(parallel):
    params = [{"params": [torch.zeros(2)]}]  # plain tensors, not FSDP2 shards
    return SimpleNamespace(passes=SimpleNamespace(sharded=False), _parallel=parallel, param_groups=params)


def test_one_process_and_fsdp2_shards_need_nothing():
    data_parallel(optimizer(None), 1, None, "SAGEMixin")  # one process: nothing to average
    sharded = SimpleNamespace(passes=SimpleNamespace(sharded=True), _parallel=None)
    data_parallel(sharded, 2, None, "SAGEMixin")  # FSDP2 reduces itself


def test_an_optimizer_that_does_not_average_is_refused():
    with pytest.raises(
        ValueError, match="SAGETrainer runs on 2 processes but the optimizer does not average"
    ):
        data_parallel(optimizer(None), 2, None, "SAGETrainer")


def test_a_ddp_model_whose_closures_run_the_bare_module_is_refused():
    parallel = SimpleNamespace(model=object(), ddp=True)
    with pytest.raises(
        ValueError, match="SAGEMixin's closures run the module, not its DistributedDataParallel"
    ):
        data_parallel(optimizer(parallel), 2, None, "SAGEMixin")
    plain = SimpleNamespace(model=None, ddp=False)
    data_parallel(optimizer(plain), 2, None, "SAGEMixin")  # the optimizer averages both passes
    assert plain.ddp is False
