"""Which optimizers declare that they step FSDP2 shards, and the reason given by those that do not
(the torchrun tests in tests/distributed/test_fsdp.py run them on shards)."""

import torch

import torchsage
from torchsage.optim import SharpnessAware
from torchsage.optim._ascent import GradientAscent


def _param():
    return [torch.nn.Parameter(torch.zeros(2, 2))]


def test_every_library_optimizer_steps_shards():
    for cls in (
        torchsage.SAM,
        torchsage.ASAM,
        torchsage.GSAM,
        torchsage.SAGM,
        torchsage.SAGE,
        torchsage.SAGEAlign,
    ):
        assert cls(_param(), torch.optim.SGD, lr=0.1)._unsharded_reason() is None, cls.__name__


def test_reasons_name_the_solver_and_an_undeclared_optimizer():
    class Custom(SharpnessAware):
        def __init__(self, params, base, **kw):
            super().__init__(params, base, GradientAscent(), dict(rho=0.05), **kw)

    assert (
        "does not declare supports_sharded_parameters"
        in Custom(_param(), torch.optim.SGD, lr=0.1)._unsharded_reason()
    )
    with_solver = torchsage.SAGE(_param(), torch.optim.SGD, lr=0.1, solver="mean")
    assert "drop solver= on the sharded model" in with_solver._unsharded_reason()
