"""SAGETrainer with gradient accumulation and fp16: batch 8 with 2 accumulation steps takes the steps
of batch 16 with none, and fp16 runs through the Trainer's gradient scaler (an overflow skips the
step, leaving weights, optimizer state, noise generator and learning rate as they were)."""

import pytest
import torch

import torchsage

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_hf import GROUPS, SAGE_OPTIONS, Recording, Rows, arguments, flat, tiny_bert  # noqa: E402

from torchsage.integrations.hf import SAGETrainer  # noqa: E402


def _train(tmp_path, cls=SAGETrainer, weighting="uniform", **kw):
    trainer = cls(
        model=tiny_bert(0),
        args=arguments(tmp_path, **kw),
        train_dataset=Rows(),
        group_column="domain",
        groups=GROUPS,
        weighting=weighting,
        optimizer_kwargs=SAGE_OPTIONS,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("weighting", ["uniform", "count"])
def test_accumulation_equals_the_larger_batch(tmp_path, weighting):
    # 40 rows: batch 16 gives steps of 16, 16 and 8 rows; batch 8 with 2 accumulation steps gives
    # windows of 2, 2 and 1 batches of 8: the same rows in the same order (the sampler's shuffle
    # does not depend on the batch size)
    kw = dict(max_steps=3, logging_steps=1, weighting=weighting)
    whole = _train(tmp_path / "whole", per_device_train_batch_size=16, **kw)
    accumulated = _train(
        tmp_path / "accumulated", per_device_train_batch_size=8, gradient_accumulation_steps=2, **kw
    )
    assert accumulated.state.global_step == whole.state.global_step == 3
    # the per-sample losses come from forward passes on 8 rows instead of 16 (the matrix kernels
    # may block the rows differently: a few float32 ulps) and the group means are summed in
    # another order; three Adam steps carry that into the weights: 1e-5 relative, 1e-6 absolute
    torch.testing.assert_close(flat(accumulated.model), flat(whole.model), rtol=1e-5, atol=1e-6)
    a, b = accumulated.last_step_info, whole.last_step_info
    assert sorted(a.names) == sorted(b.names)
    assert a.disagreement == pytest.approx(b.disagreement, rel=1e-4)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    logged = [
        e[k] for e in accumulated.state.log_history if "loss" in e for k in ("loss", "sage/disagreement")
    ]
    expected = [e[k] for e in whole.state.log_history if "loss" in e for k in ("loss", "sage/disagreement")]
    assert logged == pytest.approx(expected, rel=1e-4)
    # the weights moved well beyond the tolerance
    assert float((flat(whole.model) - flat(tiny_bert(0))).abs().max()) > 1e-3


def _fp16_trainer(tmp_path, init_scale, cls=SAGETrainer, **kw):
    """fp16=True with a CPU gradient scaler. On the CPU accelerate turns fp16=True into nothing
    (no autocast, no scaler: it makes both only for accelerators), so the test installs the scaler
    accelerate makes on a GPU; the Trainer hands it to the optimizer wrapper when training starts."""
    trainer = cls(
        model=tiny_bert(0),
        args=arguments(tmp_path, fp16=True, **kw),
        train_dataset=Rows(),
        group_column="domain",
        groups=GROUPS,
        optimizer_kwargs=SAGE_OPTIONS,
    )
    assert trainer.accelerator.scaler is None
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer


def test_fp16_runs_through_the_gradient_scaler(tmp_path):
    trainer = _fp16_trainer(tmp_path, 2.0**16, cls=Recording, max_steps=3)
    trainer.train()
    assert trainer.state.global_step == 3
    assert not trainer.last_step_info.skipped
    assert float((flat(trainer.model) - flat(tiny_bert(0))).abs().max()) > 1e-3
    assert trainer.accelerator.scaler.get_scale() == 2.0**16  # no overflow, no growth yet

    # the same steps by hand with torchsage.amp.scaled_step and a scaler of the same scale
    replay = tiny_bert(0)
    replay.train()
    base, base_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(trainer.args, replay)
    decay = set(trainer.get_decay_parameter_names(replay))
    groups = [
        {"params": [p for n, p in replay.named_parameters() if n in decay], "weight_decay": 0.0},
        {"params": [p for n, p in replay.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    opt = torchsage.SAGE(
        groups, base, **SAGE_OPTIONS, max_grad_norm=trainer.args.max_grad_norm, **base_kwargs
    )
    mine = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for batch in trainer.batches:

        def closure(batch=batch):
            logits = replay(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_sample = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            return torchsage.group_losses(per_sample, batch["domain"], GROUPS)

        torchsage.amp.scaled_step(opt, closure, mine)
        mine.update()
    # a power-of-two scale multiplies and divides exactly; the group means are summed in another
    # order (float32, 8 terms), a few ulps that three Adam steps carry into the weights
    torch.testing.assert_close(flat(trainer.model), flat(replay), rtol=1e-5, atol=1e-6)


class Overflowing(SAGETrainer):
    """Per-sample losses whose gradients overflow, as float16 ones do when the scale is too large."""

    def per_sample_loss(self, model, inputs):
        losses = super().per_sample_loss(model, inputs)
        return losses * torch.where(losses > 0, float("inf"), 1.0)


def test_fp16_overflow_skips_the_whole_step(tmp_path):
    trainer = _fp16_trainer(tmp_path, 2.0**16, cls=Overflowing, max_steps=1, lr_scheduler_type="linear")
    start = flat(trainer.model).clone()
    trainer.train()
    info = trainer.last_step_info
    assert info.skipped and trainer.state.global_step == 1
    assert torch.equal(flat(trainer.model), start)
    sage = trainer.optimizer.optimizer
    assert not sage.state  # no moment was written
    fresh = torch.Generator().manual_seed(SAGE_OPTIONS["seed"])
    assert all(torch.equal(g.get_state(), fresh.get_state()) for g in sage._generators.values())
    assert trainer.accelerator.scaler.get_scale() == 2.0**15  # backed off once
    assert trainer.lr_scheduler.last_epoch == 0  # the scheduler did not step on the skipped step


def test_bf16_trains(tmp_path):
    # bf16=True: accelerate runs the forward passes under CPU bfloat16 autocast; no scaler
    trainer = _train(tmp_path, bf16=True, max_steps=2)
    assert trainer.accelerator.scaler is None and trainer.state.global_step == 2
    info = trainer.last_step_info
    assert not info.skipped and info.disagreement > 0
    assert float((flat(trainer.model) - flat(tiny_bert(0))).abs().max()) > 1e-4


def test_torch_compile_takes_the_eager_steps(tmp_path):
    # torch_compile=True: the Trainer compiles the model (aot_eager: TorchDynamo and AOTAutograd
    # without code generation, which takes minutes on a loaded CPU)
    eager = _train(tmp_path / "eager", max_steps=2)
    compiled = _train(
        tmp_path / "compiled", max_steps=2, torch_compile=True, torch_compile_backend="aot_eager"
    )
    # the same operations, decompositions aside (a few float32 ulp), through two Adam steps
    torch.testing.assert_close(flat(compiled.model), flat(eager.model), rtol=1e-5, atol=1e-6)
    assert compiled.last_step_info.disagreement == pytest.approx(eager.last_step_info.disagreement, rel=1e-4)


def test_fp16_with_accumulation_equals_the_larger_batch(tmp_path):
    whole = _fp16_trainer(tmp_path / "whole", 2.0**16, max_steps=3, per_device_train_batch_size=16)
    whole.train()
    accumulated = _fp16_trainer(
        tmp_path / "acc", 2.0**16, max_steps=3, per_device_train_batch_size=8, gradient_accumulation_steps=2
    )
    accumulated.train()
    assert not accumulated.last_step_info.skipped
    # the scale is a power of two (exact); the rest as in test_accumulation_equals_the_larger_batch
    torch.testing.assert_close(flat(accumulated.model), flat(whole.model), rtol=1e-5, atol=1e-6)
