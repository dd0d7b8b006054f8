"""The multi-task checkpoint: ``model.pt`` written by ``torchsage mtl train --save-model`` and read
back for the diagnostics, save and load beside each other.

The file is a dict: ``benchmark``, ``tasks``, ``width``, ``args`` (the run's recorded
arguments) and either ``model`` (the state dict of the shared model) or ``models`` (one per task,
single-task learning).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from torchsage.files import load_weights, safe_torch_load
from torchsage.harness.records import atomic_torch_save
from torchsage.mtl.args import MTLArgs
from torchsage.mtl.benchmarks import Benchmark, get_benchmark
from torchsage.mtl.data import Loader

__all__ = ["is_mtl_checkpoint", "load_for_diagnostics", "save_model"]


def is_mtl_checkpoint(checkpoint: Any) -> bool:
    """Whether a loaded checkpoint dict was written by :func:`save_model`."""
    return isinstance(checkpoint, dict) and "benchmark" in checkpoint


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_model(
    out: Path,
    bench: Benchmark,
    cfg: dict[str, Any],
    record_args: dict[str, Any],
    models: Mapping[str, nn.Module],
    stl: bool,
) -> None:
    """Writes ``model.pt``: the benchmark, its tasks, the width, the run's arguments and the
    weights (CPU tensors), ``model`` for one shared model or ``models`` (per task) for ``stl``."""
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
    atomic_torch_save(payload, out / "model.pt")


def load_for_diagnostics(
    path: str | os.PathLike,
    n_batches: int = 1,
    batch_size: int | None = None,
    *,
    data_dir: str | None = None,
    seed: int = 0,
) -> tuple[nn.Module, list[Any], list[Callable[[Any, Any], Tensor]]]:
    """Rebuilds a model saved by ``train(..., save_model=True)`` with per-task batches and losses.

    The file is read with ``weights_only=True`` (tensors and plain values only), so a crafted file
    cannot run code; a missing, damaged or foreign file raises one clear error before anything else.

    Args:
        path: the run directory or its ``model.pt``.
        n_batches: batches per task, drawn from the training split in a seeded order.
        batch_size: default: the run's batch size.
        data_dir: overrides the run's data directory (NYUv2, Cityscapes).
        seed: seeds the order of the drawn examples.

    Raises:
        FileNotFoundError: no ``model.pt`` there.
        ValueError: a file that is truncated, corrupt, of another format, holds other Python
            objects (:class:`torchsage.files.UnreadableFileError`) or was not written by ``mtl train``.

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
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive integer, got {n_batches!r}")
    payload = safe_torch_load(file, what="saved multi-task model", hint=" (train with --save-model)")
    if not isinstance(payload, dict) or "benchmark" not in payload:
        raise ValueError(f"{file} is not a multi-task model saved by torchsage mtl train")
    if "model" not in payload:
        raise ValueError(
            f"{file} holds single-task (stl) models, one per task: diagnostics need one shared model"
        )
    missing = [k for k in ("width", "args") if k not in payload]
    if missing or not isinstance(payload["args"], dict):
        lacks = ", ".join(missing) or "a dict of args"
        raise ValueError(f"{file} lacks {lacks}: not written by torchsage mtl train")
    bench = get_benchmark(payload["benchmark"])
    saved = payload["args"]
    model = bench.build(int(payload["width"]))
    load_weights(model, payload["model"], what=f"the weights in {file} (benchmark {bench.name})")
    model.eval()
    fields = {f for f in MTLArgs.__dataclass_fields__}
    kwargs = {k: v for k, v in saved.items() if k in fields}
    kwargs.update(output_dir=str(file.parent), augment=False, device="cpu")
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    train_set, _ = bench.load(MTLArgs(**kwargs))
    size = batch_size if batch_size is not None else int(saved.get("batch_size", bench.batch_size))
    drawn = []
    for raw in Loader(train_set, size, seed, shuffle=True):
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
