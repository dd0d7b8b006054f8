"""SAGETrainer with the real transformers package on a tiny BERT built from a config (nothing
downloaded): its steps are SAGE's steps on the per-group losses, save_model round-trips, and a run
resumed from a checkpoint ends on the uninterrupted run's weights."""

import math

import pytest
import torch
import torch.nn.functional as F

import torchsage
from torchsage.integrations.hf import per_sample_loss

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torchsage.integrations.hf import SAGETrainer  # noqa: E402 (needs transformers)

GROUPS = {0: "news", 1: "forum", 2: "review"}
SAGE_OPTIONS = {"rho": 0.05, "gamma": 1e-3, "seed": 5}


def tiny_bert(seed: int):
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 40):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 40, (n, 8), generator=g)
        self.domain = torch.randint(0, 3, (n,), generator=g)
        self.labels = (self.ids[:, 0] % 3 + self.domain) % 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[i],
            "domain": self.domain[i],
        }


def arguments(tmp_path, **kw):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**options, **kw})


class Recording(SAGETrainer):
    """Keeps each training batch, to replay the steps by hand."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = [*getattr(self, "batches", []), {k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_steps_are_sage_steps_on_the_group_losses(tmp_path):
    model = tiny_bert(0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = arguments(tmp_path, max_grad_norm=0.05)  # small enough to clip: checks it reaches SAGE
    trainer = Recording(
        model=model,
        args=args,
        train_dataset=Rows(),
        group_column="domain",
        groups=GROUPS,
        optimizer_kwargs=SAGE_OPTIONS,
    )
    trainer.train()
    assert trainer.state.global_step == 6 and len(trainer.batches) == 6
    assert isinstance(trainer.optimizer.optimizer, torchsage.SAGE)
    info = trainer.last_step_info
    assert set(info.names) <= set(GROUPS.values()) and info.disagreement > 0 and info.noise_std > 0
    logged = [entry for entry in trainer.state.log_history if "sage/disagreement" in entry]
    assert len(logged) == 3 and all(math.isfinite(e["sage/disagreement"]) for e in logged)

    # The same steps by hand: SAGE around the Trainer's base optimizer on the recorded batches.
    replay = tiny_bert(1)
    replay.load_state_dict(start)
    replay.train()
    base, base_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, replay)
    decay = set(trainer.get_decay_parameter_names(replay))
    groups = [
        {
            "params": [p for n, p in replay.named_parameters() if n in decay],
            "weight_decay": args.weight_decay,
        },
        {"params": [p for n, p in replay.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    opt = torchsage.SAGE(groups, base, **SAGE_OPTIONS, max_grad_norm=args.max_grad_norm, **base_kwargs)
    for batch in trainer.batches:

        def closure(batch=batch):
            logits = replay(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_sample = F.cross_entropy(logits, batch["labels"], reduction="none")
            return {
                name: per_sample[batch["domain"] == k].mean()
                for k, name in GROUPS.items()
                if (batch["domain"] == k).any()
            }

        last = opt.step(closure)
    assert last.names == info.names
    # Same operations on the same batches; only the per-group means are summed in another order
    # (float32, 8 terms), a few ulps that six Adam steps carry into the weights.
    torch.testing.assert_close(flat(trainer.model), flat(replay), rtol=1e-5, atol=1e-6)


def test_save_model_and_resume_from_checkpoint(tmp_path):
    full = SAGETrainer(
        model=tiny_bert(0),
        args=arguments(tmp_path / "full"),
        train_dataset=Rows(),
        group_column="domain",
        groups=GROUPS,
        optimizer_kwargs=SAGE_OPTIONS,
    )
    full.train()
    full.save_model(str(tmp_path / "saved"))
    loaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    assert torch.equal(flat(loaded), flat(full.model))

    first = SAGETrainer(
        model=tiny_bert(0),
        args=arguments(tmp_path / "part", save_strategy="steps", save_steps=3),
        train_dataset=Rows(),
        group_column="domain",
        groups=GROUPS,
        optimizer_kwargs=SAGE_OPTIONS,
    )
    first.train()
    resumed = SAGETrainer(
        model=tiny_bert(7),  # other weights: everything must come from the checkpoint
        args=arguments(tmp_path / "part", save_strategy="steps", save_steps=3),
        train_dataset=Rows(),
        group_column="domain",
        groups=GROUPS,
        optimizer_kwargs=SAGE_OPTIONS,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert torch.equal(flat(resumed.model), flat(full.model))
    assert resumed.last_step_info.noise_std == full.last_step_info.noise_std


def test_count_weighting_and_bad_configurations(tmp_path):
    trainer = SAGETrainer(
        model=tiny_bert(0),
        args=arguments(tmp_path, max_steps=1),
        train_dataset=Rows(),
        group_column="domain",
        weighting="count",
        optimizer_kwargs={"rho": 0.05, "gamma": 0.0},
    )
    trainer.train()
    assert trainer.last_step_info.names == tuple(
        sorted(trainer.last_step_info.names)
    )  # groups=None: sorted ids
    missing = SAGETrainer(
        model=tiny_bert(0), args=arguments(tmp_path, max_steps=1), train_dataset=Rows(), group_column="source"
    )
    with pytest.raises(ValueError, match="the batch has no 'source' column"):
        missing.train()


def test_per_sample_loss_against_loops():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g)
    labels = torch.randint(0, 4, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, :] = -100  # no token to predict: 0, not nan
    for shift in (False, True):
        got = per_sample_loss(logits, labels, shift=shift)
        for i in range(3):
            terms = []
            for t in range(5 - shift):
                target = int(labels[i, t + shift])
                if target != -100:
                    terms.append(-torch.log_softmax(logits[i, t], 0)[target])
            expected = sum(terms) / len(terms) if terms else torch.tensor(0.0)
            assert float(got[i]) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
    pred, target = torch.tensor([[1.0], [2.0]]), torch.tensor([0.5, 4.0])
    assert per_sample_loss(pred, target).tolist() == [0.25, 4.0]
    with pytest.raises(ValueError, match="override"):
        per_sample_loss(torch.randn(2, 3, 4, 5), torch.zeros(2, dtype=torch.long))


def test_hugging_face_checkpoints(tmp_path):
    """docs/files.md: a crafted or truncated optimizer.pt is refused by the Trainer's load (torch's
    weights-only unpickler), creating nothing; SAGE's state loads with weights_only=True."""
    import pickle

    from test_files import _CreatesFile, snapshot, truncated

    def trainer(out, steps):
        args = arguments(out, max_steps=steps, save_strategy="steps", save_steps=3)
        return SAGETrainer(model=tiny_bert(0), args=args, train_dataset=Rows(), group_column="domain",
                           groups=GROUPS, optimizer_kwargs=SAGE_OPTIONS)  # fmt: skip

    trainer(tmp_path / "run", 3).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    optimizer = checkpoint / "optimizer.pt"
    state = torch.load(optimizer, weights_only=True)
    torch.save(state, tmp_path / "good.pt")
    for name, error in (("crafted", pickle.UnpicklingError), ("truncated", (RuntimeError, OSError))):
        if name == "crafted":
            torch.save({**state, "extra": _CreatesFile(tmp_path / "marker")}, optimizer)
        else:
            truncated(tmp_path / "good.pt", optimizer)
        before = snapshot(checkpoint)
        with pytest.raises(error):
            trainer(tmp_path / "resumed", 6).train(resume_from_checkpoint=str(checkpoint))
        assert not (tmp_path / "marker").exists() and snapshot(checkpoint) == before
