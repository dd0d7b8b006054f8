"""SAGE in training frameworks: PyTorch Lightning (:mod:`torchsage.integrations.lightning`) and the
Hugging Face Trainer (:mod:`torchsage.integrations.hf`).

Each module imports its framework only when used, so ``import torchsage`` never needs them. See
docs/integrations.md.
"""

from __future__ import annotations

from torchsage.optim import StepInfo

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
