"""SAGE in training frameworks: PyTorch Lightning (:mod:`torchsage.integrations.lightning`) and the
Hugging Face Trainer (:mod:`torchsage.integrations.hf`).

Each module imports its framework only when used, so ``import torchsage`` never needs them. See
docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchsage.optim import SharpnessAware, StepInfo, is_sharded

__all__ = ["step_info_metrics"]


def step_info_metrics(info: StepInfo, prefix: str = "sage/") -> dict[str, float]:
    """The numbers of a :class:`~torchsage.StepInfo` as a flat dict of floats for a logger.

    ``loss``, ``perturbed_loss``, ``disagreement``, ``noise_std``, ``perturbation_norm``,
    ``grad_norm`` and ``skipped`` (0 or 1) under ``prefix``, and each distribution's clean loss as
    ``{prefix}loss/{name}``. Values not measured in a step are ``nan``.

    Example:
        >>> from torchsage import StepInfo
        >>> step_info_metrics(StepInfo(loss=0.5, losses=(0.4, 0.6), names=("a", "b")))["sage/loss/b"]
        0.6
    """
    metrics = {
        f"{prefix}{key}": float(getattr(info, key))
        for key in ("loss", "perturbed_loss", "disagreement", "noise_std", "perturbation_norm", "grad_norm")
    }
    metrics[f"{prefix}skipped"] = float(info.skipped)
    names = info.names or tuple(str(k) for k in range(len(info.losses)))
    metrics.update({f"{prefix}loss/{name}": float(v) for name, v in zip(names, info.losses)})
    return metrics


def data_parallel(
    optimizer: SharpnessAware, world_size: int, wrapper: Any, where: str, module: nn.Module | None = None
) -> None:
    """Readies ``optimizer`` for a data-parallel run of ``world_size`` processes (nothing to do in one).

    The optimizer must average the gradients itself (``process_group="auto"``, built once the
    group exists): refused otherwise, as each process would step on its own batch. ``wrapper`` is
    the framework's ``DistributedDataParallel`` module when the closures run through it (the
    Hugging Face Trainer's model): it becomes the optimizer's ``model=``, so the clean pass runs
    under ``no_sync`` (the optimizer averages the per-distribution gradients) and DDP reduces the
    perturbed pass, once. ``None``: the closures run the bare module (Lightning), DDP never sees
    their backward passes, and the optimizer reduces both; a DDP ``model=`` given to the optimizer
    is then refused, since it would leave the perturbed pass to a reduction that never comes.

    FSDP2 (``fully_shard``): the optimizer must have been built on the shards (DTensors), which
    reduce themselves. Refused: one built before the model was sharded, whether it still holds the
    unsharded tensors or its parameter groups were switched to the shards afterwards (accelerate
    does so under FSDP2), as it would neither see the gradients nor take the global norms over the
    shards. ``module``: the model whose parameters the closures train (Lightning's module).
    """
    if not optimizer.passes.sharded:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(map(is_sharded, params)) or any(map(is_sharded, module.parameters() if module else ())):
            raise ValueError(
                f"{where}: the model was sharded with fully_shard (FSDP2) after the optimizer was built "
                "on its unsharded parameters: build the optimizer after fully_shard (the Hugging Face "
                "Trainer cannot: it builds it before accelerate shards the model; train with DDP there)"
            )
    if world_size <= 1 or optimizer.passes.sharded:  # FSDP2 shards reduce themselves
        return
    parallel = optimizer._parallel
    if parallel is None:
        raise ValueError(
            f"{where} runs on {world_size} processes but the optimizer does not average the gradients: "
            "build it with process_group='auto' (the default) after torch.distributed is initialized"
        )
    if isinstance(wrapper, nn.parallel.DistributedDataParallel):
        parallel.model, parallel.ddp = wrapper, True
    elif parallel.ddp:
        raise ValueError(
            f"{where}'s closures run the module, not its DistributedDataParallel wrapper: build the "
            "optimizer without model=<the wrapper> (model=self or none); it then averages the gradients"
        )
