"""One domain-generalization run on the DomainBed protocol.

Every environment is split into an ``in`` part (training, or test accuracy for test environments)
and an ``out`` part (validation) by ``holdout_fraction``, with a permutation seeded by the trial
seed and the environment index. Each step draws one minibatch from the ``in`` part of every
training environment. Every ``checkpoint_freq`` steps (and after the last) the accuracy of every
environment's ``in`` and ``out`` parts is appended to ``results.jsonl`` as one whole line; a
``done`` file marks the finished run.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the same command trains data-parallel
on a gloo process group: every process draws the same minibatches and keeps its slice of each
(``batch_size`` must divide evenly), the optimizer averages the gradients (the sharpness-aware
algorithms through their ``process_group``; the plain ones through a hook before each step), the
accuracies are counted on a share of every split and summed, and rank 0 alone writes
``results.jsonl``, ``model.pt`` and ``done``. ERM and the sharpness-aware algorithms then follow
the one-process run to float tolerance; CORAL's and Fishr's penalties are computed per slice.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from torchsage.amp import AMP_DTYPES, LossScaledOptimizer, autocast
from torchsage.dg.algorithms import Algorithm, canonical_algorithm, get_algorithm
from torchsage.dg.datasets import (
    canonical_dataset,
    environment_names,
    get_dataset,
    seed_hash,
    split_environment,
)
from torchsage.dg.hparams import parse_hparams, random_hparams
from torchsage.harness.progress import bar as tqdm
from torchsage.harness.records import append_json_line as _append_line
from torchsage.harness.records import mark_done
from torchsage.optim import Communicator, SharpnessAware, average_gradients, torchrun_session

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
    """Validates everything that can be checked before loading data; returns the hparams.
    Names in any case and punctuation become the registered ones (recorded as such)."""
    args.dataset = canonical_dataset(args.dataset)  # unknown dataset -> ValueError
    args.algorithm = canonical_algorithm(args.algorithm)  # unknown algorithm -> ValueError
    names = environment_names(args.dataset)
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


class _Slices:
    """The one-process index batches (``BatchSampler`` over ``sampler``), each cut to process
    ``rank``'s slice: the processes' slices make up the one-process batch."""

    def __init__(self, sampler: RandomSampler, batch_size: int, rank: int, world: int) -> None:
        self.batches = BatchSampler(sampler, batch_size, drop_last=True)
        self.size = batch_size // world
        self.rank = rank

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank * self.size : (self.rank + 1) * self.size]


def _infinite_batches(
    data: Dataset, batch_size: int, seed: int, num_workers: int, rank: int = 0, world: int = 1
) -> Iterator[tuple]:
    """Random minibatches with replacement, forever (tensor data sets are indexed directly);
    with ``world`` processes, this process's slice of each (same draws in every process)."""
    gen = torch.Generator().manual_seed(seed)
    size = batch_size // world
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset):
        indices = torch.as_tensor(data.indices)
        tensors = data.dataset.tensors
        while True:
            pick = indices[torch.randint(0, len(indices), (batch_size,), generator=gen)]
            pick = pick[rank * size : (rank + 1) * size]
            yield tuple(t[pick] for t in tensors)
    sampler = RandomSampler(data, replacement=True, num_samples=10**9, generator=gen)
    if world > 1:
        sliced = _Slices(sampler, batch_size, rank, world)
        yield from DataLoader(data, batch_sampler=sliced, num_workers=num_workers)  # type: ignore[arg-type]
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)
    yield from loader


@torch.no_grad()
def _accuracy(algorithm: Algorithm, data: Dataset, num_workers: int, batch_size: int = 256) -> float:
    correct, total = _correct(algorithm, data, num_workers, batch_size)
    return correct / max(total, 1)


@torch.no_grad()
def _correct(
    algorithm: Algorithm,
    data: Dataset,
    num_workers: int,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
) -> tuple[int, int]:
    """(correct, total) on ``data``, or on every ``world``-th example from ``rank`` on."""
    if world > 1:
        data = Subset(data, range(rank, len(data), world))  # type: ignore[arg-type]
        if isinstance(data.dataset, Subset) and isinstance(data.dataset.dataset, TensorDataset):
            data = Subset(data.dataset.dataset, [data.dataset.indices[i] for i in data.indices])
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
    return correct, total


def train(args: TrainArgs) -> Path:
    """Runs one training job and returns its output directory (data-parallel under torchrun)."""
    with torchrun_session() as comm:
        return _train(args, comm)


def _train(args: TrainArgs, comm: Communicator | None) -> Path:
    hparams = _check(args)
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    if hparams["batch_size"] % world:
        raise ValueError(
            f"batch_size {hparams['batch_size']} does not split evenly over {world} processes: "
            "choose a multiple of the process count"
        )
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
        _infinite_batches(d, hparams["batch_size"], seed_hash(args.seed, i), args.num_workers, rank, world)
        for i, d in zip(train_envs, train_sets)
    ]
    algorithm = get_algorithm(args.algorithm)(
        dataset.input_shape, dataset.num_classes, len(train_envs), hparams
    )

    device_type = next(algorithm.parameters()).device.type
    if args.amp == "fp16":  # both passes' losses scaled, gradients unscaled by the optimizer
        algorithm.optimizer = LossScaledOptimizer(algorithm.optimizer, torch.amp.GradScaler(device_type))

    results = out / "results.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)  # an unfinished earlier attempt restarts from scratch
    hook = None
    if comm is not None:  # plain optimizers: average the gradients before each step

        def average(optimizer: Any, *_: Any) -> None:
            if optimizer is algorithm.optimizer and not isinstance(optimizer, SharpnessAware):
                grads = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                average_gradients(comm, grads, [True] * len(grads), 1.0, float(world))

        hook = register_optimizer_step_pre_hook(average)
    record_args = {k: v for k, v in asdict(args).items() if k != "progress"}
    record_args.update(steps=steps, checkpoint_freq=checkpoint_freq, test_envs=list(args.test_envs))
    epoch_size = min(len(d) for d in train_sets) / hparams["batch_size"]

    logged: dict[str, list[float]] = defaultdict(list)
    start = time.perf_counter()
    bar = tqdm(
        range(steps),
        disable=not args.progress or rank != 0,
        desc=f"{args.algorithm} on {args.dataset}",
        leave=False,
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
            means = {k: sum(v) / len(v) for k, v in sorted(logged.items())}
            counts = [
                _correct(algorithm, part, args.num_workers, rank=rank, world=world)
                for split in splits
                for part in split
            ]
            if comm is not None:  # one sum of the logged means and the correct/total counts
                flat = torch.tensor(
                    [*means.values(), *(c for pair in counts for c in pair)], dtype=torch.float64
                )
                flat = comm.all_reduce(flat).tolist()
                means = {k: v / world for k, v in zip(means, flat)}
                rest = flat[len(means) :]
                counts = [(rest[2 * j], rest[2 * j + 1]) for j in range(len(counts))]
            record.update(means)
            for j, (correct, total) in enumerate(counts):
                record[f"env{j // 2}_{'out' if j % 2 else 'in'}_acc"] = correct / max(total, 1)
            record["hparams"] = hparams
            record["args"] = record_args
            if rank == 0:
                _append_line(results, record)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}")
            logged.clear()
    if hook is not None:
        hook.remove()
    if rank != 0:
        return out
    if args.save_model:
        from torchsage.dg.checkpoint import save_model

        save_model(out, record_args, hparams, dataset, algorithm.network)
    mark_done(out)
    return out
