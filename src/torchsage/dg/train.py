"""One domain-generalization run on the DomainBed protocol.

Every environment is split into an ``in`` part (training, or test accuracy for test environments)
and an ``out`` part (validation) by ``holdout_fraction``, with a permutation seeded by the trial
seed and the environment index. Each step draws one minibatch from the ``in`` part of every
training environment. At DomainBed's checkpoints (0-based steps with ``step % checkpoint_freq ==
0``, and the last step) the accuracy of every environment's ``in`` and ``out`` parts is appended
to ``results.jsonl`` as one whole line, with the learning rate of that step (the hyperparameter
``lr_schedule``: ``"none"``, ``"step"`` or ``"cosine"``, see :func:`lr_factor`); a ``done`` file
marks the finished run. With the hyperparameter ``swad`` the run also averages the weights over
the authors' loss valley and writes ``swad.json`` (:mod:`torchsage.dg.swad`).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the same command trains data-parallel
on a gloo process group: every process draws the same minibatches and keeps its slice of each
(``batch_size`` must divide evenly), the optimizer averages the gradients (the sharpness-aware
algorithms through their ``process_group``; the plain ones through a hook before each step), the
accuracies are counted on a share of every split and summed, and rank 0 alone writes
``results.jsonl``, ``model.pt`` and ``done``. ERM and the sharpness-aware algorithms then follow
the one-process run to float tolerance; CORAL's and Fishr's penalties are computed per slice.

``device`` (default: ``cuda`` when available, else ``cpu``) holds the model, its optimizer state
(moments and SAGE's noise generator), every minibatch and the evaluation batches; a device that is
not usable here is one :class:`ValueError` before anything is loaded. Under ``torchrun`` a bare
``cuda`` means ``cuda:LOCAL_RANK``. The image data sets are read by ``num_workers`` loader
processes (default: DomainBed's 8, at most the CPUs available; 0 for the tensor data sets) into
pinned memory when the device is a GPU, and copied asynchronously.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import (
    DataLoader,
    Dataset,
    Subset,
    TensorDataset,
)

from torchsage.amp import AMP_DTYPES, LossScaledOptimizer, autocast
from torchsage.dg.algorithms import Algorithm, canonical_algorithm, get_algorithm
from torchsage.dg.batches import count_batches as _count
from torchsage.dg.batches import infinite_batches, merged_batches
from torchsage.dg.batches import to_device as _to
from torchsage.dg.datasets import (
    canonical_dataset,
    environment_names,
    environment_splits,
    get_dataset,
    seed_hash,
)
from torchsage.dg.finetune import harness_view
from torchsage.dg.hparams import STEP_AT, STEP_FACTOR, parse_hparams, random_hparams
from torchsage.dg.recipe import algorithm_class, check_preset, preset_hparams, preset_label
from torchsage.dg.swad import SWAD, check_swad_hparams
from torchsage.harness.progress import bar as tqdm
from torchsage.harness.records import append_json_line as _append_line
from torchsage.harness.records import mark_done
from torchsage.optim import Communicator, SharpnessAware, average_gradients, torchrun_session

__all__ = [
    "TrainArgs",
    "check_device_name",
    "count_correct",
    "default_num_workers",
    "infinite_batches",
    "resolve_device",
    "tensor_devices",
    "train",
]


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
    num_workers: int | None = None  # None: default_num_workers(dataset)
    progress: bool = True
    amp: str | None = None  # autocast of the training steps: "bf16", "fp16" (loss-scaled) or None
    device: str | None = None  # None: "cuda" when available, else "cpu"
    preset: str | None = None  # "authors" or "authors-domainbed": torchsage.dg.recipe


def resolve_device(name: str | None = None, local_rank: int | None = None) -> torch.device:
    """The device a run trains on: ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...) or, for
    ``None``, ``cuda`` when available and else ``cpu``; with ``local_rank`` (a ``torchrun`` process)
    a bare ``cuda`` becomes ``cuda:<local_rank>``.

    Raises:
        ValueError: a name torch does not know, ``meta`` (it holds no data), or a device that is
            not usable on this machine; the message says what to pass instead.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device_name(name)
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:  # CPU-only build, no such GPU, no driver
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--device {name} is not available on this machine ({reason}): use --device cpu"
        ) from None
    return device


def check_device_name(name: str) -> torch.device:
    """``name`` as a device, without asking whether this machine has it (a Slurm sweep checks the
    name where it is launched; each run checks the device on its node).

    Raises:
        ValueError: a name torch does not know, or ``meta`` (it holds no data).

    Example:
        >>> check_device_name("cuda:1")
        device(type='cuda', index=1)
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise ValueError("--device meta holds no data, nothing can train on it: use cpu or cuda")
    return device


#: ``lr_schedule`` hyperparameter values.
LR_SCHEDULES = ("none", "step", "cosine")


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The multiple of the initial learning rate at ``step`` (0-based) of ``steps``: ``"none"``: 1;
    ``"step"``: :data:`STEP_FACTOR` from ``step >= round(STEP_AT * steps)`` on, else 1;
    ``"cosine"``: ``(1 + cos(pi * step / steps)) / 2`` (torch's ``CosineAnnealingLR`` with
    ``T_max = steps``, ``eta_min = 0``).

    Example:
        >>> [lr_factor("step", s, 10) for s in (7, 8)]
        [1.0, 0.1]
    """
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return STEP_FACTOR if step >= round(STEP_AT * steps) else 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


class _ScheduledLR:
    """While active, every optimizer step in this process first sets each of the optimizer's
    groups to ``factor`` times its initial learning rate (kept in the group as ``initial_lr``, as
    torch's schedulers do). Applied at the step itself, it reaches an optimizer an algorithm
    rebuilds mid-run and the base optimizer inside a sharpness-aware one."""

    def __init__(self) -> None:
        self.factor = 1.0
        self._handle: Any = None

    def _apply(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * self.factor

    def __enter__(self) -> _ScheduledLR:
        self._handle = register_optimizer_step_pre_hook(self._apply)
        return self

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


def default_num_workers(dataset: str) -> int:
    """Data loader processes when ``num_workers`` is not given: DomainBed's 8 for the image data
    sets (at most the CPUs this process may use), 0 for the in-memory tensor data sets."""
    from torchsage.dg.images import IMAGE_DATASETS

    if dataset not in IMAGE_DATASETS:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus))


def tensor_devices(algorithm: Algorithm) -> dict[str, set[torch.device]]:
    """The devices of everything an algorithm holds: ``"parameters"``, ``"buffers"``,
    ``"optimizer state"`` (every tensor in the optimizer's state, the wrapped base optimizer's
    included) and ``"noise generators"`` (SAGE's). A run on one device gives one device in each
    non-empty set; the tests and ``benchmarks/gpu_check.py`` check that.

    Example:
        >>> from torchsage.dg.algorithms import get_algorithm
        >>> from torchsage.dg.hparams import default_hparams
        >>> hp = {**default_hparams("ERM", "RotatedDigits"), "cnn_width": 8}
        >>> found = tensor_devices(get_algorithm("ERM")((1, 16, 16), 10, 5, hp))
        >>> found["parameters"]
        {device(type='cpu')}
    """
    out: dict[str, set[torch.device]] = {
        "parameters": {p.device for p in algorithm.parameters()},
        "buffers": {b.device for b in algorithm.buffers()},
        "optimizer state": set(),
        "noise generators": set(),
    }
    seen: set[int] = set()
    optimizers = [getattr(algorithm, "optimizer", None)]
    while optimizers:
        opt = optimizers.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        for state in getattr(opt, "state", {}).values():
            values = state.values() if isinstance(state, dict) else [state]
            out["optimizer state"].update(v.device for v in values if isinstance(v, torch.Tensor))
        out["noise generators"].update(g.device for g in getattr(opt, "_generators", {}).values())
        optimizers += [getattr(opt, name, None) for name in ("base_optimizer", "optimizer")]
    return out


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
    check_preset(args.algorithm, args.preset)
    hparams = random_hparams(args.algorithm, args.dataset, args.hparams_seed)
    if args.preset is not None:
        hparams.update(preset_hparams(args.preset, args.dataset))
    hparams.update(parse_hparams(args.hparams, args.algorithm, args.dataset))
    if hparams.get("merged_batch") and args.preset is None:
        raise ValueError("merged_batch is part of the authors' recipe: use --preset authors")
    if hparams.get("lr_schedule", "none") not in LR_SCHEDULES:
        raise ValueError(
            f"hparam lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {hparams['lr_schedule']!r}"
        )
    check_swad_hparams(hparams)
    return hparams


def _eval_batches(
    data: Dataset,
    num_workers: int,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> Iterable[tuple]:
    """The evaluation batches of ``data`` (or of every ``world``-th example from ``rank`` on), built
    once per run: the tensor data sets' batches themselves; for the image sets a loader whose
    worker processes persist across checkpoints (starting them at every checkpoint cost more than
    the evaluation)."""
    if world > 1:
        data = Subset(data, range(rank, len(data), world))  # type: ignore[arg-type]
        if isinstance(data.dataset, Subset) and isinstance(data.dataset.dataset, TensorDataset):
            data = Subset(data.dataset.dataset, [data.dataset.indices[i] for i in data.indices])
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset):
        idx = torch.as_tensor(data.indices)
        x, y = data.dataset.tensors[:2]
        return [
            (x[idx[i : i + batch_size]], y[idx[i : i + batch_size]]) for i in range(0, len(idx), batch_size)
        ]
    return DataLoader(
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


@torch.no_grad()
def count_correct(
    algorithm: Algorithm,
    data: Dataset,
    num_workers: int,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
) -> tuple[int, int]:
    """(correct, total) of ``algorithm.predict`` on ``data``, or on every ``world``-th example
    from ``rank`` on (the processes' counts add up to the whole).

    Example:
        >>> from types import SimpleNamespace
        >>> zero = SimpleNamespace(predict=lambda x: torch.stack([x + 1, x], 1))  # always class 0
        >>> data = Subset(TensorDataset(torch.zeros(5), torch.tensor([0, 0, 1, 0, 1])), range(5))
        >>> count_correct(zero, data, num_workers=0)
        (3, 5)
    """
    batches = _eval_batches(data, num_workers, batch_size, rank, world)
    return _count(algorithm, batches, device or torch.device("cpu"))


def train(args: TrainArgs) -> Path:
    """Runs one training job and returns its output directory (data-parallel under torchrun)."""
    with torchrun_session() as comm, _ScheduledLR() as schedule:
        return _train(args, comm, schedule)


def _train(args: TrainArgs, comm: Communicator | None, schedule: _ScheduledLR) -> Path:
    hparams = _check(args)
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if comm is not None else None
    device = resolve_device(args.device, local_rank)
    num_workers = default_num_workers(args.dataset) if args.num_workers is None else args.num_workers
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    pin = device.type == "cuda"
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

    dataset = harness_view(dataset, hparams, args.data_dir)
    splits = environment_splits(
        dataset,
        args.holdout_fraction,
        args.trial_seed,
        args.test_envs,
        float(hparams.get("novel_emoji", 0.0)),
    )
    train_envs = [i for i in range(len(splits)) if i not in args.test_envs]
    train_sets = [Subset(dataset.training_view(i), splits[i][0].indices) for i in train_envs]
    merged = bool(hparams.get("merged_batch"))
    if merged and world > 1:
        raise ValueError(
            "the authors' merged batch (--preset authors) runs in one process, not under torchrun"
        )
    streams = [
        infinite_batches(d, hparams["batch_size"], seed_hash(args.seed, i), num_workers, rank, world, pin)
        for i, d in zip(train_envs, train_sets)
    ]
    if merged:  # instead, one stream of the union, split by domain at every step
        seed = seed_hash(args.seed, "merged")
        streams = [merged_batches(train_sets, hparams["batch_size"], seed, num_workers, pin)]
    algorithm = algorithm_class(get_algorithm(args.algorithm), args.preset)(
        dataset.input_shape, dataset.num_classes, len(train_envs), hparams
    )
    evaluation = [
        _eval_batches(part, num_workers, rank=rank, world=world, pin_memory=pin)
        for split in splits
        for part in split
    ]
    # parameters move in place, so the optimizer built above keeps them; its state (moments, SAGE's
    # noise generator) is created on their device at the first step
    algorithm.to(device)

    device_type = device.type
    if args.amp == "fp16":  # both passes' losses scaled, gradients unscaled by the optimizer
        algorithm.optimizer = LossScaledOptimizer(algorithm.optimizer, torch.amp.GradScaler(device_type))

    # dense weight averaging (hparam swad): segments of the weights between checkpoints, swad.json
    swad = SWAD(algorithm, hparams, train_envs, evaluation, device, comm) if hparams.get("swad") else None
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
    record_args["algorithm"] = preset_label(args.algorithm, args.preset)  # a row of its own in reports
    record_args.update(
        steps=steps,
        checkpoint_freq=checkpoint_freq,
        test_envs=list(args.test_envs),
        device=str(device),
        num_workers=num_workers,
    )
    # steps per pass over the smallest training split (DomainBed), or over their union when merged
    epoch_size = (sum if merged else min)(len(d) for d in train_sets) / hparams["batch_size"]

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
        minibatches = next(streams[0]) if merged else [next(s) for s in streams]
        minibatches = [_to(b, device) for b in minibatches]
        schedule.factor = lr_factor(hparams.get("lr_schedule", "none"), step, steps)
        with autocast(device_type, args.amp):  # forward passes in bf16/fp16, weights stay float32
            logged_now = algorithm.update(minibatches, step)
        for key, value in logged_now.items():
            logged[key].append(float(value))
        if swad is not None:
            swad.after_step(step)
        if step % checkpoint_freq == 0 or step == steps - 1:  # DomainBed's checkpoints
            algorithm.eval()
            record: dict[str, Any] = {
                "step": step,
                "lr": hparams["lr"] * schedule.factor,
                "epoch": step / epoch_size,  # as DomainBed counts it
                "step_time": (time.perf_counter() - start) / (step + 1),
            }
            means = {k: sum(v) / len(v) for k, v in sorted(logged.items())}
            counts = [_count(algorithm, batches, device) for batches in evaluation]
            if comm is not None:  # one sum of the logged means and the correct/total counts
                flat = torch.tensor(
                    [*means.values(), *(c for pair in counts for c in pair)], dtype=torch.float64
                )
                flat = comm.all_reduce(flat).tolist()
                means = {k: v / world for k, v in zip(means, flat)}
                rest = flat[len(means) :]
                counts = [(rest[2 * j], rest[2 * j + 1]) for j in range(len(counts))]
            if swad is not None:  # closes the segment with the training domains' validation loss
                swad.checkpoint(step)
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
    if swad is not None:  # the averaged network evaluated on every split: swad.json
        swad.finish(out, streams, merged, rank)
    if rank != 0:
        return out
    if args.save_model:
        from torchsage.dg.checkpoint import save_model

        save_model(out, record_args, hparams, dataset, algorithm.network)
    mark_done(out)
    return out
