"""The multi-task benchmarks: data, network, per-task losses and metrics, default settings.

``MultiDigits`` (embedded, CPU-sized), ``NYUv2`` and ``Cityscapes`` (preprocessed arrays from a
data folder). Names are matched without regard to case and punctuation (``MultiDigits``,
``multidigits``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = ["BENCHMARKS", "Benchmark", "canonical_benchmark", "get_benchmark"]

LossFn = Callable[[Tensor, Any], Tensor]
#: ``MTLArgs`` (:mod:`torchsage.mtl.train`): what a benchmark's ``load`` reads (data_dir, n_train, ...)
MTLArgs = Any


@dataclass(frozen=True)
class Benchmark:
    """A multi-task benchmark: data, network, per-task losses and metrics, default settings.

    ``load(args)`` returns the (train, test) data sets; ``build(width)`` the network, whose
    forward returns a dict task -> output; ``batch(raw)`` turns a loader batch into
    ``(inputs, {task: target})``; ``losses[task](output[task], target)`` is a task's loss;
    ``metrics()`` returns fresh streaming accumulators per task, each with ``update(output,
    target)`` and ``compute() -> {metric: value}``.
    """

    name: str
    tasks: tuple[str, ...]
    load: Callable[[MTLArgs], tuple[Dataset, Dataset]]
    build: Callable[[int], nn.Module]
    batch: Callable[[Any], tuple[Tensor, dict[str, Any]]]
    losses: Callable[[], dict[str, LossFn]]
    metrics: Callable[[], dict[str, Any]]
    epochs: int
    batch_size: int
    lr: float
    width: int
    #: (step size in epochs, factor) of a StepLR schedule, or None
    step_lr: tuple[int, float] | None = None
    #: key of :data:`torchsage.mtl.metrics.BASELINES`, or None (baselines from ``stl`` runs)
    published_baseline: str | None = None
    needs_data_dir: bool = False
    #: SAGE/SAM rho and SAGE gamma of a run without --rho/--gamma/--preset (MultiDigits: the
    #: library's defaults, kept by the evidence study, docs/study.md "The defaults")
    rho: float = 0.05
    gamma: float = 1e-3
    #: batch size of the evaluation (None: the training batch size)
    eval_batch_size: int | None = None


# -- MultiDigits -------------------------------------------------------------------------------


def _digits_load(args: MTLArgs) -> tuple[Dataset, Dataset]:
    from torchsage.mtl.data import multi_digits

    return multi_digits("train", n=args.n_train), multi_digits("test", n=args.n_test)


def _digits_build(width: int) -> nn.Module:
    from torchsage.mtl.networks import MultiLeNet

    return MultiLeNet(width=width)


def _digits_batch(raw: Any) -> tuple[Tensor, dict[str, Any]]:
    x, left, right = raw
    return x, {"left": left, "right": right}


def _digits_losses() -> dict[str, LossFn]:
    ce = nn.functional.cross_entropy
    return {"left": ce, "right": ce}


def _digits_metrics() -> dict[str, Any]:
    from torchsage.mtl.metrics import AccuracyMetric

    return {"left": AccuracyMetric(), "right": AccuracyMetric()}


# -- NYUv2 and Cityscapes -------------------------------------------------------------------------

_DENSE_TASKS = {
    "nyuv2": {"segmentation": 13, "depth": 1, "normal": 3},
    "cityscapes": {"segmentation": 7, "depth": 1},
}


def _dense_load(name: str) -> Callable[[MTLArgs], tuple[Dataset, Dataset]]:
    def load(args: MTLArgs) -> tuple[Dataset, Dataset]:
        from torchsage.mtl import data

        if args.data_dir is None:
            raise ValueError(f"benchmark {name!r} needs --data-dir (the preprocessed numpy folder)")
        root = Path(args.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data directory {root} does not exist")
        cls = data.NYUv2 if name == "nyuv2" else data.Cityscapes
        return cls(str(root), split="train", augment=args.augment), cls(str(root), split="val")

    return load


def _dense_build(name: str) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        from torchsage.mtl.networks import SegNetMTAN

        return SegNetMTAN(dict(_DENSE_TASKS[name]), width=width)

    return build


def _dense_batch(raw: Any) -> tuple[Tensor, dict[str, Any]]:
    x, targets = raw
    return x, dict(targets)


def _dense_losses(name: str) -> Callable[[], dict[str, LossFn]]:
    def losses() -> dict[str, LossFn]:
        from torchsage.mtl import metrics

        table = {
            "segmentation": metrics.segmentation_loss,
            "depth": metrics.depth_loss,
            "normal": metrics.normal_loss,
        }
        return {task: table[task] for task in _DENSE_TASKS[name]}

    return losses


def _dense_metrics(name: str) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        from torchsage.mtl import metrics

        out: dict[str, Any] = {"segmentation": metrics.SegmentationMetric(_DENSE_TASKS[name]["segmentation"])}
        out["depth"] = metrics.DepthMetric()
        if "normal" in _DENSE_TASKS[name]:
            out["normal"] = metrics.NormalMetric()
        return out

    return make


def _dense(name: str, batch_size: int) -> Benchmark:
    return Benchmark(
        name=name,
        tasks=tuple(_DENSE_TASKS[name]),
        load=_dense_load(name),
        build=_dense_build(name),
        batch=_dense_batch,
        losses=_dense_losses(name),
        metrics=_dense_metrics(name),
        epochs=200,
        batch_size=batch_size,
        lr=1e-4,
        width=64,
        step_lr=(100, 0.5),
        published_baseline=name,
        needs_data_dir=True,
        rho=1e-3,
        gamma=1e-4,
    )


#: the benchmarks by name
BENCHMARKS: Mapping[str, Benchmark] = {
    "multidigits": Benchmark(
        name="multidigits",
        tasks=("left", "right"),
        load=_digits_load,
        build=_digits_build,
        batch=_digits_batch,
        losses=_digits_losses,
        metrics=_digits_metrics,
        epochs=10,
        batch_size=256,
        lr=1e-3,
        width=1,
        eval_batch_size=500,
    ),
    "nyuv2": _dense("nyuv2", batch_size=2),
    "cityscapes": _dense("cityscapes", batch_size=8),
}


def canonical_benchmark(name: str) -> str:
    """The registered name of a benchmark (any case and punctuation: ``MultiDigits``)."""
    from torchsage.registry import resolve

    return resolve(name, BENCHMARKS, "benchmark")


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as ``name`` (any case and punctuation); ``ValueError`` listing
    the known ones otherwise."""
    return BENCHMARKS[canonical_benchmark(name)]
