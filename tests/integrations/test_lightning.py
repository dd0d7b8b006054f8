"""SAGEMixin with the real lightning package: two CPU epochs on a mixed-domain loader, a checkpoint
resumed to the uninterrupted run's weights bit for bit, schedulers stepped, StepInfo logged."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchsage
from torchsage.integrations import step_info_metrics
from torchsage.integrations.lightning import SAGEMixin

L = pytest.importorskip("lightning")

GROUPS = {0: "photo", 1: "art", 2: "sketch"}
BATCHES_PER_EPOCH = 6


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(44, 6, generator=g)
    domain = torch.randint(0, 3, (44,), generator=g)
    domain[8:16] = 0  # the second batch holds domain 0 only: the others are absent from that step
    y = ((x[:, 0] + 0.3 * domain) > 0).long()
    # In order, so that both runs see the same batches (44 samples: 5 batches of 8 and one of 4).
    return DataLoader(TensorDataset(x, y, domain), batch_size=8, shuffle=False)


class Classifier(SAGEMixin, L.LightningModule):
    def __init__(self, seed: int, scheduler: str = "epoch"):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        self.scheduler = scheduler
        self.infos: list[torchsage.StepInfo] = []
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y, domain = batch

        def closure():
            per_sample = F.cross_entropy(self.net(x), y, reduction="none")
            return torchsage.group_losses(per_sample, domain, GROUPS)

        self.lrs.append(self.optimizers().param_groups[0]["lr"])  # the rate this step uses
        self.infos.append(self.sage_step(closure))

    def configure_optimizers(self):
        opt = torchsage.SAGE(
            self.parameters(), torch.optim.SGD, rho=0.05, gamma=0.01, seed=3, lr=0.1, momentum=0.9
        )
        if self.scheduler == "epoch":
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(tmp_path, epochs: int, name: str) -> "L.Trainer":
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name=name),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_two_epochs_log_the_step_info_and_step_the_epoch_scheduler(tmp_path):
    model = Classifier(seed=0)
    t = trainer(tmp_path, 2, "run")
    t.fit(model, loader())
    assert t.global_step == len(model.infos) == 2 * BATCHES_PER_EPOCH
    # StepLR(1, 0.5) per epoch: epoch 0 at 0.1, epoch 1 at 0.05, 0.025 after the second epoch.
    assert model.lrs == [0.1] * BATCHES_PER_EPOCH + [0.05] * BATCHES_PER_EPOCH
    assert t.optimizers[0].param_groups[0]["lr"] == 0.025
    assert model.infos[1].names == ("photo",) and model.infos[1].disagreement == 0.0  # one domain present
    assert all(math.isfinite(i.loss) and not i.skipped for i in model.infos)

    with open(f"{t.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sage/loss")]
    assert len(rows) == len(model.infos)
    for row, info in zip(rows, model.infos):
        for key, value in step_info_metrics(info).items():
            if math.isnan(value):
                assert row[key] in ("", "nan"), key
            else:  # the CSV holds the logged float32 value's decimal form
                assert float(row[key]) == pytest.approx(value, rel=1e-6), key
    assert rows[1]["sage/loss/art"] == "nan"  # absent from the second batch: not the first's value


def test_step_interval_scheduler(tmp_path):
    model = Classifier(seed=0, scheduler="step")
    trainer(tmp_path, 1, "step").fit(model, loader())
    # StepLR(2, 0.5) stepped after every optimizer step: halves every two steps.
    assert model.lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025], rel=1e-12)


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    uninterrupted = Classifier(seed=0)
    trainer(tmp_path, 2, "full").fit(uninterrupted, loader())

    first = Classifier(seed=0)
    t = trainer(tmp_path, 1, "first")
    t.fit(first, loader())
    t.save_checkpoint(tmp_path / "epoch1.ckpt")

    resumed = Classifier(seed=99)  # other initial weights: everything must come from the checkpoint
    t2 = trainer(tmp_path, 2, "resumed")
    t2.fit(resumed, loader(), ckpt_path=tmp_path / "epoch1.ckpt")

    assert t2.global_step == 2 * BATCHES_PER_EPOCH
    assert resumed.lrs == [0.05] * BATCHES_PER_EPOCH  # the scheduler's state came back too
    for a, b in zip(weights(resumed), weights(uninterrupted)):
        assert torch.equal(a, b)
    noise_resumed = [i.noise_std for i in resumed.infos]
    assert noise_resumed == [i.noise_std for i in uninterrupted.infos[BATCHES_PER_EPOCH:]]


def test_refuses_automatic_optimization():
    model = Classifier(seed=0)
    assert model.automatic_optimization is False
    with pytest.raises(ValueError, match="manual optimization"):
        model.automatic_optimization = True


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(precision):
    from lightning.pytorch.plugins import MixedPrecision

    model = Classifier(seed=0)
    t = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        plugins=[MixedPrecision(precision, "cpu")],  # fp16 on CPU only through the plugin
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # 16-mixed steps through torchsage.amp.scaled_step on the plugin's scaler
    # (tests/integrations/test_lightning_modes.py replays it)
    t.fit(model, loader())
    assert len(model.infos) == BATCHES_PER_EPOCH and all(math.isfinite(i.loss) for i in model.infos)


def test_lightning_checkpoints(tmp_path):
    """docs/files.md: a crafted or truncated checkpoint is refused by Lightning's load (torch's
    weights-only unpickler), creating nothing and leaving the module's weights; SAGE's state loads
    with weights_only=True."""
    import pickle

    from test_files import _CreatesFile, snapshot, truncated

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    t = trainer(tmp_path, 1, "first")
    t.fit(Classifier(seed=0), loader())
    t.save_checkpoint(folder / "good.ckpt")
    payload = torch.load(folder / "good.ckpt", weights_only=True)
    torch.save({**payload, "extra": _CreatesFile(tmp_path / "marker")}, folder / "crafted.ckpt")
    truncated(folder / "good.ckpt", folder / "cut.ckpt")
    for name, error in (("crafted.ckpt", pickle.UnpicklingError), ("cut.ckpt", (RuntimeError, OSError))):
        module = Classifier(seed=1)
        before, start = snapshot(folder), weights(module)
        with pytest.raises(error):
            trainer(tmp_path, 2, name).fit(module, loader(), ckpt_path=folder / name)
        assert not (tmp_path / "marker").exists() and snapshot(folder) == before
        assert all(torch.equal(a, b) for a, b in zip(start, weights(module)))
    trainer(tmp_path, 2, "resumed").fit(
        Classifier(seed=1), loader(), ckpt_path=folder / "good.ckpt", weights_only=True
    )
