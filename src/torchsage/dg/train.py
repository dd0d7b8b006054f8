"""One domain-generalization run on the DomainBed protocol.

Every environment is split into an ``in`` part (training, or test accuracy for test environments)
and an ``out`` part (validation) by ``holdout_fraction``, with a permutation seeded by the trial
seed and the environment index. Each step draws one minibatch from the ``in`` part of every
training environment. Every ``checkpoint_freq`` steps (and after the last) the accuracy of every
environment's ``in`` and ``out`` parts is appended to ``results.jsonl`` as one whole line; a
``done`` file marks the finished run.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset
from tqdm.auto import tqdm

from torchsage.amp import AMP_DTYPES, LossScaledOptimizer, autocast
from torchsage.dg.algorithms import Algorithm, get_algorithm
from torchsage.dg.datasets import environment_names, get_dataset, seed_hash, split_environment
from torchsage.dg.hparams import parse_hparams, random_hparams

__all__ = ["TrainArgs", "train"]


@dataclass
class TrainArgs:
    """The arguments of one run (recorded in every result line under ``args``)."""

    dataset: str
    algorithm: str
    test_envs: list[int]
    output_dir: str
    data_dir: str | None = None
    steps: int | None = None
    checkpoint_freq: int | None = None
    hparams_seed: int = 0
    trial_seed: int = 0
    seed: int = 0
    hparams: str | None = None
    holdout_fraction: float = 0.2
    save_model: bool = False
    num_workers: int = 0
    progress: bool = True
    amp: str | None = None  # autocast of the training steps: "bf16", "fp16" (loss-scaled) or None


def _check(args: TrainArgs) -> dict[str, Any]:
    """Validates everything that can be checked before loading data; returns the hparams."""
    names = environment_names(args.dataset)  # unknown dataset -> ValueError
    get_algorithm(args.algorithm)  # unknown algorithm -> ValueError
    if not args.test_envs:
        raise ValueError("--test-envs needs at least one environment index")
    for i in args.test_envs:
        if not 0 <= i < len(names):
            raise ValueError(
                f"test environment {i} out of range: {args.dataset} has environments 0..{len(names) - 1} "
                f"({', '.join(names)})"
            )
    if len(set(args.test_envs)) == len(names):
        raise ValueError("every environment is a test environment: nothing is left to train on")
    for name in ("steps", "checkpoint_freq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 < args.holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction must lie in (0, 1), got {args.holdout_fraction}")
    if args.amp is not None:
        if args.amp not in AMP_DTYPES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {args.amp!r}")
        if args.amp == "fp16" and not hasattr(get_algorithm(args.algorithm), "optimizer_class"):
            raise ValueError(
                f"--amp fp16 needs loss scaling, which torchsage does for the sharpness-aware "
                f"algorithms only, not {args.algorithm}: use --amp bf16"
            )
    hparams = random_hparams(args.algorithm, args.dataset, args.hparams_seed)
    hparams.update(parse_hparams(args.hparams, args.algorithm, args.dataset))
    return hparams


def _infinite_batches(data: Dataset, batch_size: int, seed: int, num_workers: int) -> Iterator[tuple]:
    """Random minibatches with replacement, forever (tensor data sets are indexed directly)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset):
        indices = torch.as_tensor(data.indices)
        tensors = data.dataset.tensors
        while True:
            pick = indices[torch.randint(0, len(indices), (batch_size,), generator=gen)]
            yield tuple(t[pick] for t in tensors)
    sampler = RandomSampler(data, replacement=True, num_samples=10**9, generator=gen)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)
    yield from loader


@torch.no_grad()
def _accuracy(algorithm: Algorithm, data: Dataset, num_workers: int, batch_size: int = 256) -> float:
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset):
        idx = torch.as_tensor(data.indices)
        batches = [
            (
                data.dataset.tensors[0][idx[i : i + batch_size]],
                data.dataset.tensors[1][idx[i : i + batch_size]],
            )
            for i in range(0, len(idx), batch_size)
        ]
    else:
        batches = DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    correct = total = 0
    for x, y in batches:
        correct += (algorithm.predict(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    # One write of the whole line, flushed to disk: a kill leaves at most a torn last line,
    # which readers report instead of parsing.
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def train(args: TrainArgs) -> Path:
    """Runs one training job and returns its output directory."""
    hparams = _check(args)
    out = Path(args.output_dir)
    if (out / "done").exists():
        raise ValueError(f"{out} already holds a finished run (delete it or choose another --output-dir)")

    torch.manual_seed(args.seed)
    dataset = get_dataset(
        args.dataset,
        args.data_dir,
        augment=bool(hparams["data_augmentation"]),
        image_size=int(hparams.get("image_size", 224)),
    )
    images = dataset.extra.get("images")
    if images is not None:  # a corrupt file stops the run before any result is written
        from torchsage.dg.images import verify

        verify(images)
    steps = args.steps or dataset.steps
    checkpoint_freq = args.checkpoint_freq or dataset.checkpoint_freq

    splits = [
        split_environment(env, args.holdout_fraction, seed_hash(args.trial_seed, i))
        for i, env in enumerate(dataset.environments)
    ]
    train_envs = [i for i in range(len(splits)) if i not in args.test_envs]
    train_sets = [Subset(dataset.training_view(i), splits[i][0].indices) for i in train_envs]
    streams = [
        _infinite_batches(d, hparams["batch_size"], seed_hash(args.seed, i), args.num_workers)
        for i, d in zip(train_envs, train_sets)
    ]
    algorithm = get_algorithm(args.algorithm)(
        dataset.input_shape, dataset.num_classes, len(train_envs), hparams
    )

    device_type = next(algorithm.parameters()).device.type
    if args.amp == "fp16":  # both passes' losses scaled, gradients unscaled by the optimizer
        algorithm.optimizer = LossScaledOptimizer(algorithm.optimizer, torch.amp.GradScaler(device_type))

    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)  # an unfinished earlier attempt restarts from scratch
    record_args = {k: v for k, v in asdict(args).items() if k != "progress"}
    record_args.update(steps=steps, checkpoint_freq=checkpoint_freq, test_envs=list(args.test_envs))
    epoch_size = min(len(d) for d in train_sets) / hparams["batch_size"]

    logged: dict[str, list[float]] = defaultdict(list)
    start = time.perf_counter()
    bar = tqdm(
        range(steps), disable=not args.progress, desc=f"{args.algorithm} on {args.dataset}", leave=False
    )
    for step in bar:
        algorithm.train()
        minibatches = [next(s) for s in streams]
        with autocast(device_type, args.amp):  # forward passes in bf16/fp16, weights stay float32
            logged_now = algorithm.update(minibatches, step)
        for key, value in logged_now.items():
            logged[key].append(float(value))
        if (step + 1) % checkpoint_freq == 0 or step == steps - 1:
            algorithm.eval()
            record: dict[str, Any] = {
                "step": step,
                "epoch": (step + 1) / epoch_size,
                "step_time": (time.perf_counter() - start) / (step + 1),
            }
            record.update({k: sum(v) / len(v) for k, v in logged.items()})
            for i, (part_in, part_out) in enumerate(splits):
                record[f"env{i}_in_acc"] = _accuracy(algorithm, part_in, args.num_workers)
                record[f"env{i}_out_acc"] = _accuracy(algorithm, part_out, args.num_workers)
            record["hparams"] = hparams
            record["args"] = record_args
            _append_line(results, record)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}")
            logged.clear()
    if args.save_model:
        tmp = out / "model.pt.tmp"
        torch.save(
            {
                "args": record_args,
                "hparams": hparams,
                "input_shape": list(dataset.input_shape),
                "num_classes": dataset.num_classes,
                "env_names": dataset.env_names,
                "model": algorithm.network.state_dict(),
            },
            tmp,
        )
        tmp.replace(out / "model.pt")
    (out / "done").write_text("done\n")
    return out
