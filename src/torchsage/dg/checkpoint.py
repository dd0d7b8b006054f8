"""The domain-generalization checkpoint: ``model.pt`` written by ``torchsage dg train --save-model``
and read back for the diagnostics, save and load beside each other.

The file is a dict: ``args`` (the run's recorded arguments), ``hparams``, ``input_shape``,
``num_classes``, ``env_names`` and ``model`` (the state dict of the network, featurizer then
classifier, as ``torch.nn.Sequential``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from torchsage.dg.datasets import environment_splits, get_dataset
from torchsage.dg.networks import classifier, featurizer
from torchsage.files import load_weights
from torchsage.harness.records import atomic_torch_save

__all__ = ["CHECKPOINT_KEYS", "load_dg_model", "save_model"]

#: the entries of a dg checkpoint
CHECKPOINT_KEYS = ("args", "hparams", "input_shape", "num_classes", "env_names", "model")


def save_model(
    out: Path,
    record_args: dict[str, Any],
    hparams: dict[str, Any],
    dataset: Any,
    network: torch.nn.Module,
) -> None:
    """Writes ``out/model.pt`` (atomically) for :func:`load_dg_model`."""
    atomic_torch_save(
        {
            "args": record_args,
            "hparams": hparams,
            "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes,
            "env_names": dataset.env_names,
            "model": network.state_dict(),
        },
        Path(out) / "model.pt",
    )


def load_dg_model(
    checkpoint: dict[str, Any],
    batch_size: int,
    envs: list[int] | None = None,
    split: str = "in",
    data_dir: str | None = None,
) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """The network of a ``dg train --save-model`` checkpoint and one batch per environment.

    The environments are split into ``in`` / ``out`` exactly as in training (same holdout
    fraction and trial seed); the batch of an environment is the first ``batch_size`` samples of
    the chosen split (deterministic). Default environments: the training ones.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(missing)}: not written by `dg train --save-model`")
    kinds = {
        "args": dict,
        "hparams": dict,
        "input_shape": (list, tuple),
        "num_classes": int,
        "env_names": (list, tuple),
    }
    wrong = [
        f"{k} ({type(checkpoint[k]).__name__})" for k, t in kinds.items() if not isinstance(checkpoint[k], t)
    ]
    if wrong:
        raise ValueError(f"the checkpoint's {', '.join(wrong)} are not what `dg train --save-model` writes")
    args, hparams = checkpoint["args"], checkpoint["hparams"]
    names = list(checkpoint["env_names"])
    test_envs = list(args.get("test_envs", []))
    chosen = [i for i in range(len(names)) if i not in test_envs] if envs is None else list(envs)
    for i in chosen:
        if not 0 <= i < len(names):
            raise ValueError(f"environment {i} out of range: the model's data set has 0..{len(names) - 1}")
    if len(set(chosen)) < 2:
        raise ValueError(f"the terms need at least 2 distinct environments, got {chosen}")

    feat = featurizer(checkpoint["input_shape"], hparams)
    network = torch.nn.Sequential(
        feat, classifier(feat.n_outputs, int(checkpoint["num_classes"]), hparams["nonlinear_classifier"])
    )
    load_weights(
        network, checkpoint["model"], what="the saved weights (for the network their hparams describe)"
    )

    dataset = get_dataset(
        args["dataset"],
        data_dir if data_dir is not None else args.get("data_dir"),
        augment=False,
        image_size=int(hparams.get("image_size", 224)),
    )
    from torchsage.dg.finetune import harness_view

    # a randomly initialised trunk is not drawn again: the cache comes from the saved network's own
    trunk = feat if hparams.get("cache_trunk") else None
    dataset = harness_view(
        dataset, hparams, data_dir if data_dir is not None else args.get("data_dir"), trunk=trunk
    )
    splits = environment_splits(
        dataset,
        float(args.get("holdout_fraction", 0.2)),
        args.get("trial_seed", 0),
        args.get("test_envs", ()),
        float(hparams.get("novel_emoji", 0.0)),
    )
    batches = []
    for i in chosen:
        part_in, part_out = splits[i]
        part = part_in if split == "in" else part_out
        n = min(batch_size, len(part))
        if n == 0:
            raise ValueError(f"environment {i} has no samples in its {split!r} split")
        head = Subset(part.dataset, part.indices[:n])
        if isinstance(part.dataset, TensorDataset):
            idx = torch.as_tensor(head.indices)
            x, y = (t[idx] for t in part.dataset.tensors)
        else:
            x, y = next(iter(DataLoader(head, batch_size=n, shuffle=False)))
        batches.append((x, y))
    return network, batches, [names[i] for i in chosen]
