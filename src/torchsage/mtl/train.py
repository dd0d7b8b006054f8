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
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from torchsage.harness.progress import progress
from torchsage.harness.records import append_json_line as _append_line
from torchsage.harness.records import mark_done
from torchsage.harness.session import shard_batch, torchrun_session
from torchsage.mtl.args import MTLArgs
from torchsage.mtl.benchmarks import BENCHMARKS, Benchmark, LossFn, get_benchmark
from torchsage.mtl.data import Loader
from torchsage.mtl.sage_settings import check_sage_settings, optimizer_options, sage_settings, solver_options
from torchsage.mtl.solvers import STL, canonical_solver, solver_spec

__all__ = ["BENCHMARKS", "Benchmark", "Loader", "MTLArgs", "check", "make_optimizer", "resolve", "train"]


# -- arguments ----------------------------------------------------------------------------------


def _check_method_options(args: MTLArgs) -> None:
    """An option the chosen method does not use is refused rather than silently ignored."""
    if args.rho is not None and args.method == "plain":
        raise ValueError("--rho is the ascent radius of --sage or --sam: add one of them, or drop --rho")
    if args.gamma is not None and args.method != "sage":
        raise ValueError("--gamma is SAGE's noise scale: add --sage, or drop --gamma")


def resolve(args: MTLArgs) -> tuple[Benchmark, dict[str, Any]]:
    """Checks the arguments (before any data is read) and fills in the benchmark's defaults: the
    benchmark and the run's settings (``epochs``, ``batch_size``, ``lr``, ``width``, ``rho``,
    ``gamma``, SAGE's settings with ``--sage``, the canonical ``solver`` name and the ``device``).

    Example:
        >>> bench, cfg = resolve(MTLArgs("MultiDigits", "UPGrad", "out", sam=True, device="cpu"))
        >>> bench.name, cfg["solver"], cfg["rho"] > 0, cfg["gamma"]
        ('multidigits', 'upgrad', True, 0.0)
    """
    bench = get_benchmark(args.benchmark)
    solver = canonical_solver(args.solver)
    if args.sage and args.sam:
        raise ValueError("--sage and --sam exclude each other: choose one")
    _check_method_options(args)
    check_sage_settings(args, solver, STL)
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
    if args.method != "plain":
        cfg["rho"] = args.rho if args.rho is not None else bench.rho
    if args.method == "sage":
        cfg["gamma"] = args.gamma if args.gamma is not None else bench.gamma
        cfg.update(sage_settings(args, bench.name, cfg["lr"], cfg["rho"], cfg["gamma"]))
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


def make_optimizer(
    params: Any, solver: Any, method: str, cfg: dict[str, Any], seed: int, model: nn.Module
) -> torch.optim.Optimizer:
    """The run's optimizer around Adam (see the module docstring), from the settings of
    :func:`resolve`: SAGE for ``method="sage"``, else SAM (``rho=0`` for ``"plain"``).

    Example:
        >>> _, cfg = resolve(MTLArgs("multidigits", "ls", "out", sage=True, device="cpu"))
        >>> model = nn.Linear(3, 2)
        >>> type(make_optimizer(model.parameters(), "mean", "sage", cfg, 0, model)).__name__
        'SAGE'
    """
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
            **optimizer_options(cfg),
        )
    rho = cfg["rho"] if method == "sam" else 0.0
    return torchsage.SAM(params, torch.optim.Adam, rho=rho, solver=solver, model=model, lr=cfg["lr"])


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
    for raw in Loader(data, batch_size, 0, shuffle=False, num_workers=num_workers):
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
    with torchrun_session() as comm:
        return _train(args, (comm.rank, comm.world_size) if comm is not None else (0, 1))


def check(args: MTLArgs) -> None:
    """Checks a run without training it: the arguments, the benchmark's data folder, the network
    and the solver (its optional dependencies), as :func:`train` builds them. A sweep calls it on
    its first run of every solver and method before launching anything.

    Raises:
        ValueError, FileNotFoundError, ImportError: as :func:`train` would.
    """
    bench, cfg = resolve(args)
    if bench.needs_data_dir and not Path(str(args.data_dir)).is_dir():
        raise FileNotFoundError(f"data directory {args.data_dir} does not exist")
    bench.build(cfg["width"])
    if cfg["solver"] != STL:
        solver_spec(cfg["solver"])(len(bench.tasks), **args.solver_options)


def _train(args: MTLArgs, shard: tuple[int, int]) -> Path:
    rank, world = shard
    bench, cfg = resolve(args)
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
            task: make_optimizer(models[task].parameters(), None, args.method, cfg, args.seed, models[task])
            for task in bench.tasks
        }
    else:
        model = bench.build(cfg["width"]).to(cfg["device"])
        solver = spec(len(bench.tasks), **solver_options(args, cfg["solver"]))
        if isinstance(solver, nn.Module):  # UW's log-variances, FAMO's logits and bounds
            solver.to(cfg["device"])
        params: Any = model.parameters()
        if spec.needs_parameters:  # UW's log-variances are learned with the model
            params = [{"params": list(model.parameters())}, {"params": list(solver.parameters())}]
        models = dict.fromkeys(bench.tasks, model)
        optimizers = {"all": make_optimizer(params, solver, args.method, cfg, args.seed, model)}
    schedulers = []
    if bench.step_lr is not None:
        schedulers = [torch.optim.lr_scheduler.StepLR(o, *bench.step_lr) for o in optimizers.values()]
    losses = bench.losses()
    loader = Loader(train_set, cfg["batch_size"], args.seed, shuffle=True, num_workers=args.num_workers)

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
    show = args.progress and rank == 0
    for epoch in progress(range(1, cfg["epochs"] + 1), label, unit="epoch", enabled=show, leave=False):
        task_losses: dict[str, list[float]] = {t: [] for t in bench.tasks}
        logged: dict[str, list[float]] = {"disagreement": [], "noise_std": []}
        for raw in progress(loader, f"epoch {epoch}", unit="batch", enabled=show, leave=False, tty_only=True):
            x, targets = _to(bench.batch(raw), cfg["device"])
            if world > 1:
                if len(x) < world:  # too small to give every process a part (same on all)
                    continue
                x, targets = shard_batch(x, rank, world), shard_batch(targets, rank, world)
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
        from torchsage.mtl.checkpoint import save_model

        save_model(out, bench, cfg, record_args, models, stl)
    mark_done(out)
    return out
