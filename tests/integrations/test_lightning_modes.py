"""SAGEMixin with Lightning's accumulate_grad_batches and precision="16-mixed": batch 8 with 2
accumulation steps takes the steps of batch 16 with none, and float16 steps run through the
precision plugin's gradient scaler (an overflow skips the whole step)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchsage
from torchsage.integrations.lightning import SAGEMixin

L = pytest.importorskip("lightning")

GROUPS = {0: "photo", 1: "art", 2: "sketch"}


def loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(44, 6, generator=g)
    domain = torch.randint(0, 3, (44,), generator=g)
    domain[8:16] = 0  # the second batch of 8 holds domain 0 only
    y = ((x[:, 0] + 0.3 * domain) > 0).long()
    return DataLoader(TensorDataset(x, y, domain), batch_size=batch_size, shuffle=False)


class Classifier(SAGEMixin, L.LightningModule):
    def __init__(self, poison_first: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.infos: list = []
        self.batches: list = []
        self.poison_first = poison_first

    def training_step(self, batch, batch_idx):
        x, y, domain = batch
        self.batches.append(batch)
        poison = self.poison_first and batch_idx == 0

        def closure():
            per_sample = F.cross_entropy(self.net(x).float(), y, reduction="none")
            if poison:  # gradients that overflow, as float16 ones do under too large a scale
                per_sample = per_sample * float("inf")
            return torchsage.group_losses(per_sample, domain, GROUPS)

        self.infos.append(self.sage_step(closure, sizes=torchsage.group_sizes(domain, GROUPS)))

    def configure_optimizers(self):
        opt = torchsage.SAGE(
            self.parameters(), torch.optim.SGD, rho=0.05, gamma=0.01, seed=3, lr=0.1, momentum=0.9
        )
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def fit(model, batch_size, epochs=2, **kw):
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(model, loader(batch_size))
    return trainer


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_accumulate_grad_batches_equals_the_larger_batch():
    whole, accumulated = Classifier(), Classifier()
    t_whole = fit(whole, 16)
    t_acc = fit(accumulated, 8, accumulate_grad_batches=2)
    # 44 rows: steps of 16, 16 and 12 rows per epoch either way
    assert t_acc.global_step == t_whole.global_step == 6
    assert t_acc.accumulate_grad_batches == 1 and accumulated.sage_accumulate == 2
    assert [i is None for i in accumulated.infos] == [True, False, True, False, True, False] * 2
    steps = [i for i in accumulated.infos if i is not None]
    for a, b in zip(steps, whole.infos):
        assert a.losses == pytest.approx(b.losses, rel=1e-5)
        assert a.disagreement == pytest.approx(b.disagreement, rel=1e-4)
    # the per-group means are summed in another order (float32), a few ulps that six SGD steps with
    # momentum carry into the weights: 1e-5 relative, 1e-6 absolute
    torch.testing.assert_close(flat(accumulated), flat(whole), rtol=1e-5, atol=1e-6)
    assert t_acc.optimizers[0].param_groups[0]["lr"] == t_whole.optimizers[0].param_groups[0]["lr"] == 0.025
    assert float((flat(whole) - flat(Classifier())).abs().max()) > 1e-2  # far beyond the tolerance


def _fp16():
    from lightning.pytorch.plugins import MixedPrecision

    # float16 autocast on the CPU only through the plugin; it makes a CPU GradScaler
    return [MixedPrecision("16-mixed", "cpu")]


def test_16_mixed_runs_through_the_gradient_scaler():
    model = Classifier()
    trainer = fit(model, 8, epochs=1, plugins=_fp16())
    assert trainer.global_step == 6 and not any(i.skipped for i in model.infos)
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() == 2.0**16  # default scale, no overflow, no growth yet

    # the same steps by hand: float16 autocast and torchsage.amp.scaled_step
    replay = Classifier()
    opt = replay.configure_optimizers()["optimizer"]
    mine = torch.amp.GradScaler("cpu")
    for x, y, domain in model.batches:

        def closure(x=x, y=y, domain=domain):
            with torch.autocast("cpu", dtype=torch.float16):
                per_sample = F.cross_entropy(replay.net(x).float(), y, reduction="none")
            return torchsage.group_losses(per_sample, domain, GROUPS)

        torchsage.amp.scaled_step(opt, closure, mine)
        mine.update()
    # the same float16 and float32 operations on the same rows, in the same order
    assert torch.equal(flat(model), flat(replay))


def test_16_mixed_overflow_skips_the_whole_step():
    model = Classifier(poison_first=True)
    start = flat(model).clone()
    trainer = fit(model, 8, epochs=1, plugins=_fp16(), max_steps=1)
    info = model.infos[0]
    assert info.skipped and trainer.global_step == 1
    assert torch.equal(flat(model), start)
    opt = trainer.optimizers[0]
    assert not opt.state
    fresh = torch.Generator().manual_seed(3)
    assert all(torch.equal(g.get_state(), fresh.get_state()) for g in opt._generators.values())
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**15  # backed off once
    assert math.isnan(info.perturbed_loss)


def test_accumulation_refusals():
    class Varying(Classifier):
        def training_step(self, batch, batch_idx):
            x, y, domain = batch

            def closure():
                return torchsage.group_losses(
                    F.cross_entropy(self.net(x), y, reduction="none"), domain, GROUPS
                )

            self.sage_step(closure, weights=[1.0, 2.0, 3.0] if batch_idx % 2 else None)

    with pytest.raises(ValueError, match="different weights= within one accumulation window"):
        fit(Varying(), 8, epochs=1, accumulate_grad_batches=2)


class Compiled(Classifier):
    """The same classifier with its network under torch.compile (aot_eager: TorchDynamo and
    AOTAutograd without code generation, see tests/optim/test_compile.py)."""

    def __init__(self):
        super().__init__()
        self.net = torch.compile(self.net, backend="aot_eager")


def test_compiled_network_takes_the_eager_steps():
    eager = Classifier()
    fit(eager, 8, epochs=1)
    # the closure's per-group losses share one forward graph, which SAGE differentiates once per
    # group: torch.compile's donated buffers allow one backward pass per graph, so they are off
    with torch._functorch.config.patch(donated_buffer=False):
        torch._dynamo.reset()  # no graph cached by another test
        compiled = Compiled()
        fit(compiled, 8, epochs=1)
    # the traced graph runs the same operations; decompositions may reassociate a float32 sum (a
    # few ulp) that six SGD steps with momentum carry into the weights: 1e-5 relative, 1e-6 absolute
    torch.testing.assert_close(flat(compiled), flat(eager), rtol=1e-5, atol=1e-6)
    assert [i.names for i in compiled.infos] == [i.names for i in eager.infos]


def test_compiled_shared_graph_with_donated_buffers_is_named():
    torch._dynamo.reset()  # compile afresh, with donated buffers (the default)
    with pytest.raises(ValueError, match="donated buffers allow one backward pass only"):
        fit(Compiled(), 8, epochs=1)
