"""One multi-task training run: a benchmark, a base solver, with or without SAGE.

The optimizer is

* ``torchsage.SAM(params, Adam, rho=0, solver=S)`` for the plain solver (one pass per step: the
  solver's own update),
* ``torchsage.SAGE(params, Adam, rho=rho, gamma=gamma, solver=S)`` with ``sage=True``,
* ``torchsage.SAM(params, Adam, rho=rho, solver=S)`` with ``sam=True``.

``solver="stl"`` (single-task learning) trains one model per task on that task's loss alone, with
the same network and optimizer; its final test metrics are the single-task baselines of
MultiDigits' Delta-m%. NYUv2 and Cityscapes use the published baselines
(:data:`torchsage.mtl.metrics.BASELINES`).

After every epoch the test split is evaluated and one whole line is appended to
``results.jsonl``: ``epoch``, the mean training loss of every task (``loss/<task>``), every test
metric (``<task>/<metric>``), ``delta_m`` (percent, ``null`` without a baseline), the means over
the epoch of the step's ``disagreement`` and ``noise_std`` (SAGE only), ``lr``, ``wall_time``
(seconds since the start) and ``args``. A ``done`` file marks the finished run. A run is
deterministic given its seed (model initialisation, batch order, the noise and the random solvers
all follow it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from torchsage._util import append_json_line as _append_line
from torchsage.mtl.solvers import SOLVER_NAMES, STL, solver_spec

__all__ = ["BENCHMARKS", "Benchmark", "MTLArgs", "load_for_diagnostics", "train"]

LossFn = Callable[[Tensor, Any], Tensor]


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


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


# -- arguments ----------------------------------------------------------------------------------


@dataclass
class MTLArgs:
    """The arguments of one run (recorded in every result line under ``args``).

    ``None`` takes the benchmark's default (epochs, batch size, lr, width, rho, gamma).
    ``stl_dir`` is a folder holding finished ``stl`` runs of the same benchmark: their mean final
    metrics become the baseline of ``delta_m`` (MultiDigits).
    """

    benchmark: str
    solver: str
    output_dir: str
    sage: bool = False
    sam: bool = False
    rho: float | None = None
    gamma: float | None = None
    epochs: int | None = None
    seed: int = 0
    data_dir: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    width: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    augment: bool = True
    stl_dir: str | None = None
    save_model: bool = False
    progress: bool = True
    solver_options: dict[str, Any] = field(default_factory=dict)
    #: "cpu", "cuda", "cuda:1", ...; None: "cuda" when available, else "cpu"
    device: str | None = None
    #: data loader worker processes (NYUv2 / Cityscapes)
    num_workers: int = 0

    @property
    def method(self) -> str:
        """``"sage"``, ``"sam"`` or ``"plain"``."""
        return "sage" if self.sage else "sam" if self.sam else "plain"


def _check_method_options(args: MTLArgs) -> None:
    """An option the chosen method does not use is refused rather than silently ignored."""
    if args.rho is not None and not (args.sage or args.sam):
        raise ValueError("--rho is the ascent radius of --sage or --sam: add one of them, or drop --rho")
    if args.gamma is not None and not args.sage:
        raise ValueError("--gamma is SAGE's noise scale: add --sage, or drop --gamma")


def _method_options(options: Sequence[str], method: str) -> list[str]:
    """``options`` without the ones ``method`` does not take (a sweep passes --rho to plain runs)."""
    drop = {"plain": {"--rho", "--gamma"}, "sam": {"--gamma"}}.get(method, set())
    kept: list[str] = []
    skip = False
    for item in options:
        if skip:
            skip = False
        elif item in drop:
            skip = True
        else:
            kept.append(item)
    return kept


def _resolved(args: MTLArgs) -> tuple[Benchmark, dict[str, Any]]:
    """Checks the arguments (before any data is read) and fills in the benchmark's defaults."""
    bench = get_benchmark(args.benchmark)
    solver = args.solver.lower() if isinstance(args.solver, str) else args.solver
    if solver not in SOLVER_NAMES:
        raise ValueError(f"unknown solver {args.solver!r}: use one of {', '.join(SOLVER_NAMES)}")
    if args.sage and args.sam:
        raise ValueError("--sage and --sam exclude each other: choose one")
    _check_method_options(args)
    if bench.needs_data_dir and args.data_dir is None:
        raise ValueError(f"benchmark {bench.name!r} needs --data-dir (the preprocessed numpy folder)")
    cfg: dict[str, Any] = {
        "epochs": args.epochs if args.epochs is not None else bench.epochs,
        "batch_size": args.batch_size if args.batch_size is not None else bench.batch_size,
        "lr": args.lr if args.lr is not None else bench.lr,
        "width": args.width if args.width is not None else bench.width,
        "rho": 0.0,
        "gamma": 0.0,
    }
    if args.sage or args.sam:
        cfg["rho"] = args.rho if args.rho is not None else bench.rho
    if args.sage:
        cfg["gamma"] = args.gamma if args.gamma is not None else bench.gamma
    for key in ("epochs", "batch_size", "width"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {cfg[key]!r}")
    for key in ("n_train", "n_test"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
    if not (cfg["lr"] > 0 and math.isfinite(cfg["lr"])):
        raise ValueError(f"--lr must be a positive number, got {cfg['lr']!r}")
    for key in ("rho", "gamma"):
        if not (cfg[key] >= 0 and math.isfinite(cfg[key])):
            raise ValueError(f"--{key} must be a number >= 0, got {cfg[key]!r}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"device {device!r} is not usable here: {error}") from None
    cfg["solver"] = solver
    cfg["device"] = device
    return bench, cfg


# -- pieces of the run --------------------------------------------------------------------------


def _make_optimizer(
    params: Any, solver: Any, method: str, cfg: dict[str, Any], seed: int, model: nn.Module
) -> torch.optim.Optimizer:
    import torchsage

    if method == "sage":
        return torchsage.SAGE(
            params,
            torch.optim.Adam,
            rho=cfg["rho"],
            gamma=cfg["gamma"],
            solver=solver,
            seed=seed,
            model=model,
            lr=cfg["lr"],
        )
    rho = cfg["rho"] if method == "sam" else 0.0
    return torchsage.SAM(params, torch.optim.Adam, rho=rho, solver=solver, model=model, lr=cfg["lr"])


class _Loader:
    """Seeded shuffled minibatches of a data set, a new order every epoch (tensors sliced directly)."""

    def __init__(
        self, data: Dataset, batch_size: int, seed: int, shuffle: bool, num_workers: int = 0
    ) -> None:
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.num_workers = num_workers
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.data) / self.batch_size))

    def __iter__(self):
        n = len(self.data)
        if isinstance(self.data, TensorDataset):
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield tuple(t[idx] for t in self.data.tensors)
            return
        yield from DataLoader(
            self.data,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator,
            num_workers=self.num_workers,
            persistent_workers=False,
        )


def _to(x: Any, device: torch.device | str) -> Any:
    """Moves a tensor, or the tensors of a dict, to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def _evaluate(
    bench: Benchmark,
    models: Mapping[str, nn.Module],
    data: Dataset,
    batch_size: int,
    device: str = "cpu",
    num_workers: int = 0,
) -> dict[str, float]:
    """Test metrics ``task/metric``; ``models[task]`` is the model that answers for ``task``."""
    accumulators = bench.metrics()
    distinct = {id(m): m for m in models.values()}
    for m in distinct.values():
        m.eval()
    for raw in _Loader(data, batch_size, 0, shuffle=False, num_workers=num_workers):
        x, targets = _to(bench.batch(raw), device)
        outputs = {i: m(x) for i, m in distinct.items()}
        for task in bench.tasks:
            accumulators[task].update(outputs[id(models[task])][task], targets[task])
    for m in distinct.values():
        m.train()
    out: dict[str, float] = {}
    for task in bench.tasks:
        for metric, value in accumulators[task].compute().items():
            out[f"{task}/{metric}"] = float(value)
    return out


def _baseline(bench: Benchmark, stl_dir: str | None) -> dict[str, float] | None:
    if bench.published_baseline is not None:
        from torchsage.mtl.metrics import BASELINES

        return dict(BASELINES[bench.published_baseline])
    if stl_dir is None:
        return None
    from torchsage.mtl.report import stl_baseline

    return stl_baseline(stl_dir, bench.name)


def _delta_m(metrics: Mapping[str, float], baseline: Mapping[str, float] | None) -> float | None:
    if baseline is None:
        return None
    from torchsage.mtl.metrics import HIGHER_IS_BETTER, delta_m

    return float(delta_m(dict(metrics), dict(baseline), HIGHER_IS_BETTER))


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _step(
    optimizer: Any,
    model: nn.Module,
    tasks: tuple[str, ...],
    losses: Mapping[str, LossFn],
    x: Tensor,
    targets: Mapping[str, Any],
) -> Any:
    """One optimizer step on one batch; the closure runs one shared forward for every task."""

    def closure() -> dict[str, Tensor]:
        output = model(x)
        return {t: losses[t](output[t], targets[t]) for t in tasks}

    return optimizer.step(closure)


# -- the run ------------------------------------------------------------------------------------


def train(args: MTLArgs) -> Path:
    """Runs one training job; returns its output directory (``results.jsonl``, ``done``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains data-parallel on a gloo group: every process
    reads the same batches and keeps its slice of each, the optimizers average the gradients
    (docs/distributed.md), and rank 0 alone evaluates (the replicas are identical) and writes.

    Raises:
        ValueError: unknown benchmark or solver, bad settings, missing ``--data-dir``, or an
            output directory that already holds a finished run.
        FileNotFoundError: the data directory or a file in it is missing.
        ImportError: the solver's optional dependency is missing.
    """
    from torchsage.optim._distributed import torchrun_session

    with torchrun_session() as comm:
        return _train(args, (comm.rank, comm.world_size) if comm is not None else (0, 1))


def _slice(x: Any, rank: int, world: int) -> Any:
    """This process's part of a batch (a tensor or a dict of tensors), split as evenly as possible."""
    if isinstance(x, Tensor):
        return x.tensor_split(world)[rank]
    if isinstance(x, dict):
        return {k: _slice(v, rank, world) for k, v in x.items()}
    return x


def _train(args: MTLArgs, shard: tuple[int, int]) -> Path:
    rank, world = shard
    bench, cfg = _resolved(args)
    out = Path(args.output_dir)
    if (out / "done").exists():
        raise ValueError(f"{out} already holds a finished run (delete it or choose another --output-dir)")
    stl = cfg["solver"] == STL
    spec = None if stl else solver_spec(cfg["solver"])
    train_set, test_set = bench.load(args)
    if len(train_set) == 0 or len(test_set) == 0:
        raise ValueError(f"benchmark {bench.name!r}: empty train or test split")
    baseline = _baseline(bench, args.stl_dir)

    torch.manual_seed(args.seed)
    solver = None
    if stl:  # one model per task, each trained on its own loss
        models = {task: bench.build(cfg["width"]).to(cfg["device"]) for task in bench.tasks}
        optimizers = {
            task: _make_optimizer(models[task].parameters(), None, args.method, cfg, args.seed, models[task])
            for task in bench.tasks
        }
    else:
        model = bench.build(cfg["width"]).to(cfg["device"])
        solver = spec(len(bench.tasks), **args.solver_options)
        if isinstance(solver, nn.Module):  # UW's log-variances, FAMO's logits and bounds
            solver.to(cfg["device"])
        params: Any = model.parameters()
        if spec.needs_parameters:  # UW's log-variances are learned with the model
            params = [{"params": list(model.parameters())}, {"params": list(solver.parameters())}]
        models = dict.fromkeys(bench.tasks, model)
        optimizers = {"all": _make_optimizer(params, solver, args.method, cfg, args.seed, model)}
    schedulers = []
    if bench.step_lr is not None:
        schedulers = [torch.optim.lr_scheduler.StepLR(o, *bench.step_lr) for o in optimizers.values()]
    losses = bench.losses()
    loader = _Loader(train_set, cfg["batch_size"], args.seed, shuffle=True, num_workers=args.num_workers)

    results = out / "results.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)  # an unfinished earlier attempt restarts from scratch
    record_args = {
        k: v
        for k, v in asdict(args).items()
        if k not in ("progress", "output_dir", "stl_dir", "save_model", "device", "num_workers")
    }
    record_args.update(cfg, method=args.method, tasks=list(bench.tasks))
    start = time.perf_counter()
    label = f"{cfg['solver']}{'+' + args.method if args.method != 'plain' else ''} on {bench.name}"
    progress = args.progress and rank == 0
    for epoch in tqdm(range(1, cfg["epochs"] + 1), disable=not progress, desc=label, leave=False):
        task_losses: dict[str, list[float]] = {t: [] for t in bench.tasks}
        logged: dict[str, list[float]] = {"disagreement": [], "noise_std": []}
        for raw in tqdm(loader, disable=not progress, desc=f"epoch {epoch}", leave=False):
            x, targets = _to(bench.batch(raw), cfg["device"])
            if world > 1:
                if len(x) < world:  # too small to give every process a part (same on all)
                    continue
                x, targets = _slice(x, rank, world), _slice(targets, rank, world)
            if stl:
                for task in bench.tasks:
                    info = _step(optimizers[task], models[task], (task,), losses, x, targets)
                    task_losses[task].append(info.losses[0])
                continue
            info = _step(optimizers["all"], model, bench.tasks, losses, x, targets)
            by_name = dict(zip(info.names, info.losses))
            for i, task in enumerate(bench.tasks):
                task_losses[task].append(float(by_name.get(task, info.losses[i])))
            logged["disagreement"].append(float(info.disagreement))
            logged["noise_std"].append(float(info.noise_std))
        if spec is not None and spec.epoch_step:
            solver.step()  # DWA: close the epoch's loss average
        for s in schedulers:
            s.step()
        if rank != 0:  # replicas are identical: rank 0 evaluates and writes
            continue
        metrics = _evaluate(
            bench,
            models,
            test_set,
            bench.eval_batch_size or cfg["batch_size"],
            cfg["device"],
            args.num_workers,
        )
        record: dict[str, Any] = {"epoch": epoch}
        record.update({f"loss/{t}": _mean(v) for t, v in task_losses.items()})
        record.update(metrics)
        record["delta_m"] = _delta_m(metrics, baseline)
        if args.method == "sage":
            record["disagreement"] = _mean(logged["disagreement"])
            record["noise_std"] = _mean(logged["noise_std"])
        record["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]
        record["wall_time"] = time.perf_counter() - start
        record["args"] = record_args
        _append_line(results, record)
    if rank != 0:
        return out
    if args.save_model:
        _save_model(out, bench, cfg, record_args, models, stl)
    (out / "done").write_text("done\n")
    return out


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _save_model(
    out: Path,
    bench: Benchmark,
    cfg: dict[str, Any],
    record_args: dict[str, Any],
    models: Mapping[str, nn.Module],
    stl: bool,
) -> None:
    payload: dict[str, Any] = {
        "benchmark": bench.name,
        "tasks": list(bench.tasks),
        "width": cfg["width"],
        "args": record_args,
    }
    if stl:
        payload["models"] = {t: _cpu_state(m) for t, m in models.items()}
    else:
        payload["model"] = _cpu_state(next(iter(models.values())))
    tmp = out / "model.pt.tmp"
    torch.save(payload, tmp)
    tmp.replace(out / "model.pt")


# -- diagnostics --------------------------------------------------------------------------------


def load_for_diagnostics(
    path: str | os.PathLike,
    n_batches: int = 1,
    batch_size: int | None = None,
    *,
    data_dir: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, list[Any], list[Callable[[Any, Any], Tensor]]]:
    """Rebuilds a model saved by ``train(..., save_model=True)`` with per-task batches and losses.

    Args:
        path: the run directory or its ``model.pt``.
        n_batches: batches per task, drawn from the training split in a seeded order.
        batch_size: default: the run's batch size.
        data_dir: overrides the run's data directory (NYUv2, Cityscapes).
        seed: seeds the order of the drawn examples.

    Returns:
        ``(model, batches, loss_fns)``: the model (eval mode); one entry per task in
        ``batches``: an ``(inputs, target)`` pair when ``n_batches == 1``, else a list of such
        pairs; one ``loss_fn(output, target)`` per task, ``output`` being the model's output dict.
        This is the layout of :func:`torchsage.diagnostics.decompose` (with a loss function per
        distribution). Every task sees the same inputs: tasks differ only in their targets.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "model.pt"
    if not file.is_file():
        raise FileNotFoundError(f"no saved model at {file} (train with --save-model)")
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    payload = torch.load(file, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "benchmark" not in payload:
        raise ValueError(f"{file} is not a multi-task model saved by torchsage mtl train")
    if "model" not in payload:
        raise ValueError(
            f"{file} holds single-task (stl) models, one per task: diagnostics need one shared model"
        )
    bench = get_benchmark(payload["benchmark"])
    saved = payload["args"]
    model = bench.build(int(payload["width"]))
    model.load_state_dict(payload["model"])
    model.eval()
    fields = {f for f in MTLArgs.__dataclass_fields__}
    kwargs = {k: v for k, v in saved.items() if k in fields}
    kwargs.update(output_dir=str(file.parent), augment=False, device="cpu")
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    train_set, _ = bench.load(MTLArgs(**kwargs))
    size = batch_size if batch_size is not None else int(saved.get("batch_size", bench.batch_size))
    drawn = []
    for raw in _Loader(train_set, size, seed, shuffle=True):
        drawn.append(bench.batch(raw))
        if len(drawn) == n_batches:
            break
    losses = bench.losses()
    batches: list[Any] = []
    loss_fns: list[Callable[[Any, Any], Tensor]] = []
    for task in bench.tasks:
        pairs = [(x, targets[task]) for x, targets in drawn]
        batches.append(pairs[0] if n_batches == 1 else pairs)

        def loss_fn(output: Any, target: Any, task: str = task) -> Tensor:
            return losses[task](output[task], target)

        loss_fns.append(loss_fn)
    return model, batches, loss_fns


# -- sweep --------------------------------------------------------------------------------------


def run_dir(root: str | Path, benchmark: str, solver: str, method: str, seed: int) -> Path:
    """Where a sweep puts one run: ``root/benchmark/solver/method/seed{seed}``."""
    return Path(root) / benchmark / solver / method / f"seed{seed}"


def sweep(
    *,
    benchmark: str,
    solvers: list[str],
    methods: list[str],
    seeds: list[int],
    output_dir: str,
    processes: int = 1,
    train_options: list[str] | None = None,
    progress: bool = True,
    dry_run: bool = False,
) -> list[Path]:
    """Runs solvers x methods x seeds of one benchmark, ``processes`` at a time, each run a
    ``torchsage mtl train`` command with one thread, in a pool of ``processes`` worker processes.

    Finished runs (a ``done`` file) are skipped; unfinished ones restart. ``stl`` runs (plain
    only) go first so that every other run records Delta-m% against them (``--stl-dir``).
    ``train_options`` are extra ``mtl train`` options (e.g. ``["--epochs", "3"]``). Each run's
    output goes to ``log.txt`` in its directory. Returns the run directories that failed.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    bench = get_benchmark(benchmark)
    for s in solvers:
        if s not in SOLVER_NAMES:
            raise ValueError(f"unknown solver {s!r}: use one of {', '.join(SOLVER_NAMES)}")
        if s != STL:
            solver_spec(s)
    for m in methods:
        if m not in ("plain", "sage", "sam"):
            raise ValueError(f"unknown method {m!r}: use plain, sage or sam")
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    stl_root = Path(output_dir) / bench.name / STL
    jobs: list[tuple[int, Path, list[str]]] = []  # (stage, dir, argv)
    for s in solvers:
        for m in ["plain"] if s == STL else methods:
            for seed in seeds:
                d = run_dir(output_dir, bench.name, s, m, seed)
                argv = [
                    "mtl", "train", "--benchmark", bench.name, "--solver", s, "--seed", str(seed),
                    "--output-dir", str(d), "--threads", "1", "--no-progress",
                    *_method_options(train_options or [], m),
                ]  # fmt: skip
                if m != "plain":
                    argv.append(f"--{m}")
                if s != STL and STL in solvers and bench.published_baseline is None:
                    argv += ["--stl-dir", str(stl_root)]
                jobs.append((0 if s == STL else 1, d, argv))
    todo = [j for j in jobs if not (j[1] / "done").exists()]
    if dry_run:
        for _, _d, argv in todo:
            print("torchsage " + " ".join(argv))
        return []
    failed: list[Path] = []
    bar = tqdm(total=len(todo), disable=not progress, desc=f"mtl sweep {bench.name}")
    # worker processes import torch once and run many jobs (a fresh interpreter per run costs
    # seconds of imports); each job runs with one thread and writes its output to log.txt
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        for stage in (0, 1):  # stl runs first: the others read their metrics
            futures = {}
            for _, d, argv in (j for j in todo if j[0] == stage):
                d.mkdir(parents=True, exist_ok=True)
                futures[pool.submit(_sweep_job, argv, str(d / "log.txt"))] = d
            for future in as_completed(futures):
                if future.result() != 0:
                    failed.append(futures[future])
                bar.update(1)
    bar.close()
    return failed


def _sweep_job(argv: list[str], log: str) -> int:
    """Runs ``torchsage <argv>`` in this (worker) process with its output in ``log``."""
    import contextlib
    import traceback

    from torchsage.cli import main

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return main(argv)
        except BaseException:  # a crashed run is reported as failed, the sweep goes on
            traceback.print_exc()
            return 1


# -- command line -------------------------------------------------------------------------------

#: solvers drawn by ``torchsage mtl toy`` by default
TOY_SOLVERS = ("ls", "mgda", "pcgrad", "cagrad", "imtlg", "nashmtl", "upgrad", "famo")


def add_mtl_commands(sub: Any, parser_class: Any) -> None:
    """Adds ``mtl train|sweep|report|toy`` to the ``torchsage`` parser's subcommands."""
    mtl = sub.add_parser("mtl", help="multi-task learning: base solvers with and without SAGE")
    mtl_sub = mtl.add_subparsers(dest="mtl_command", required=True, parser_class=parser_class)

    def common(p: Any) -> None:
        p.add_argument("--rho", type=float, default=None, help="ascent radius (default: the benchmark's)")
        p.add_argument(
            "--gamma", type=float, default=None, help="SAGE noise scale (default: the benchmark's)"
        )
        p.add_argument("--epochs", type=int, default=None)
        p.add_argument("--data-dir", default=None, help="preprocessed NYUv2 / Cityscapes numpy folder")
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--lr", type=float, default=None)
        p.add_argument("--width", type=int, default=None, help="channel width of the network")
        p.add_argument("--n-train", type=int, default=None, help="MultiDigits training pairs")
        p.add_argument("--n-test", type=int, default=None, help="MultiDigits test pairs")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
        p.add_argument("--num-workers", type=int, default=None, help="data loader processes")
        p.add_argument("--no-progress", action="store_true")

    train_p = mtl_sub.add_parser("train", help="one training run")
    train_p.add_argument("--benchmark", required=True, help=", ".join(BENCHMARKS))
    train_p.add_argument("--solver", required=True, help=", ".join(SOLVER_NAMES))
    train_p.add_argument("--sage", action="store_true", help="SAGE on top of the solver")
    train_p.add_argument("--sam", action="store_true", help="SAM on top of the solver")
    train_p.add_argument("--seed", type=int, default=0)
    train_p.add_argument("--output-dir", required=True)
    train_p.add_argument("--stl-dir", default=None, help="folder of finished stl runs (Delta-m%% baseline)")
    train_p.add_argument("--save-model", action="store_true", help="write model.pt for diagnostics")
    train_p.add_argument("--no-augment", action="store_true", help="NYUv2/Cityscapes: no scale-crop/flip")
    train_p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    common(train_p)

    sweep_p = mtl_sub.add_parser("sweep", help="solvers x {plain, sage} x seeds, resumable")
    sweep_p.add_argument("--benchmark", required=True, help=", ".join(BENCHMARKS))
    sweep_p.add_argument("--solvers", nargs="+", default=list(SOLVER_NAMES))
    sweep_p.add_argument("--methods", nargs="+", default=["plain", "sage"], help="plain, sage, sam")
    sweep_p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sweep_p.add_argument("--output-dir", required=True)
    sweep_p.add_argument("--processes", type=int, default=1)
    sweep_p.add_argument("--dry-run", action="store_true", help="print the commands left to run")
    common(sweep_p)

    report_p = mtl_sub.add_parser("report", help="tables of solvers with and without SAGE")
    report_p.add_argument("dir", help="a folder of runs (searched recursively)")
    report_p.add_argument("--latex", action="store_true", help="LaTeX tables instead of markdown")
    report_p.add_argument("--plot", default=None, help="PNG path (default: DIR/report.png)")

    toy_p = mtl_sub.add_parser("toy", help="two-task toy problem: trajectories with and without SAGE")
    toy_p.add_argument("--output", required=True, help="folder for mtl_toy.png")
    toy_p.add_argument("--solvers", nargs="+", default=None, help=f"default: {' '.join(TOY_SOLVERS)}")
    toy_p.add_argument("--steps", type=int, default=20000, help="Adam steps per trajectory")
    toy_p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    toy_p.add_argument("--rho", type=float, default=0.05)
    toy_p.add_argument("--gamma", type=float, default=1e-3)
    toy_p.add_argument("--seed", type=int, default=0)
    toy_p.add_argument("--no-progress", action="store_true")


def _train_from_cli(args: Any) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = train(
        MTLArgs(
            benchmark=args.benchmark,
            solver=args.solver,
            output_dir=args.output_dir,
            sage=args.sage,
            sam=args.sam,
            rho=args.rho,
            gamma=args.gamma,
            epochs=args.epochs,
            seed=args.seed,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            lr=args.lr,
            width=args.width,
            n_train=args.n_train,
            n_test=args.n_test,
            augment=not args.no_augment,
            stl_dir=args.stl_dir,
            save_model=args.save_model,
            progress=not args.no_progress,
            device=args.device,
            num_workers=args.num_workers or 0,
        )
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
        print(f"results written to {out / 'results.jsonl'}")
    return 0


def _sweep_from_cli(args: Any) -> int:
    options: list[str] = []
    names = ("rho", "gamma", "epochs", "data_dir", "batch_size", "lr", "width", "n_train", "n_test", "device")
    for name in (*names, "num_workers"):
        value = getattr(args, name)
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    failed = sweep(
        benchmark=args.benchmark,
        solvers=[s.lower() for s in args.solvers],
        methods=args.methods,
        seeds=args.seeds,
        output_dir=args.output_dir,
        processes=args.processes,
        train_options=options,
        progress=not args.no_progress,
        dry_run=args.dry_run,
    )
    if failed:
        print(f"torchsage: error: {len(failed)} runs failed (see log.txt): {', '.join(map(str, failed))}")
        return 1
    return 0


def _toy_from_cli(args: Any) -> int:
    import functools

    from torchsage.mtl import toy
    from torchsage.mtl.solvers import make_solver

    names = [n.lower() for n in (args.solvers or TOY_SOLVERS)]
    for name in names:
        solver_spec(name)  # unknown names fail before anything runs
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mtl_toy.png"
    toy.run_toy(
        {name: functools.partial(make_solver, name, 2) for name in names},
        path,
        steps=args.steps,
        lr=args.lr,
        rho=args.rho,
        gamma=args.gamma,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"figure: {path}")
    return 0


def run_mtl(args: Any) -> int:
    """Runs an ``mtl`` subcommand; bad input prints one line on stderr and returns 2."""
    import sys

    try:
        if args.mtl_command == "train":
            return _train_from_cli(args)
        if args.mtl_command == "sweep":
            return _sweep_from_cli(args)
        if args.mtl_command == "toy":
            return _toy_from_cli(args)
        from torchsage.mtl.report import report

        print(report(args.dir, latex=args.latex, plot_path=args.plot))
        return 0
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"torchsage: error: {error}", file=sys.stderr)
        return 2
