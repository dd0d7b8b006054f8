"""ResNet feature extractors for the DomainBed image data sets (torchvision's ResNet-18 / ResNet-50).

torchvision is optional (``pip install 'torchsage[vision]'``); it is imported only when a
:class:`ResNetFeaturizer` is built. Pretrained weights are read from a local file only, never
downloaded: save them once where a network is reachable, e.g.
``torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict(), "resnet50.pt")``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RESNET_ARCHS", "ResNetFeaturizer", "load_backbone_weights"]

#: Supported architectures and the width of their pooled features.
RESNET_ARCHS: dict[str, int] = {"resnet18": 512, "resnet50": 2048}

_TORCHVISION_MESSAGE = "ResNet backbones need torchvision: pip install 'torchsage[vision]'"


def _backbone_state(checkpoint: Any) -> dict[str, Tensor]:
    """The state dict inside ``checkpoint`` (a state dict, or a dict holding one under
    ``state_dict`` or ``model``), without the ``module.`` prefix of DataParallel/DDP and without
    the classifier ``fc.*``."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict, got {type(checkpoint).__name__}")
    state = {}
    for key, value in checkpoint.items():
        key = str(key)
        key = key.removeprefix("module.")
        if key.startswith("fc."):
            continue
        state[key] = value
    return state


def load_backbone_weights(network: nn.Module, weights_path: str | os.PathLike) -> None:
    """Loads the backbone weights of a torchvision ResNet from a local file into ``network`` (whose
    ``fc`` was replaced by ``nn.Identity``), checking the keys strictly: every backbone parameter and
    buffer must be in the file, with its shape, and the file may hold nothing else but ``fc.*``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing, unexpected or mis-shaped keys (the message names a few of them).
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {path} does not exist (weights are never downloaded)"
        )
    state = _backbone_state(torch.load(path, map_location="cpu", weights_only=True))
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        k
        for k in set(expected) & set(state)
        if not isinstance(state[k], Tensor) or tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"weights in {path} do not fit the backbone ({'; '.join(problems)})")
    network.load_state_dict(state, strict=True)


class ResNetFeaturizer(nn.Module):
    """A torchvision ResNet without its classifier: images ``(N, 3, H, W)`` to pooled features
    ``(N, n_outputs)``, as DomainBed's ResNet featurizer.

    Args:
        arch: ``"resnet18"`` (512 features) or ``"resnet50"`` (2048 features).
        weights_path: a local file with the network's state dict (``fc.*`` is ignored; a
            ``module.`` prefix is removed); ``None`` leaves the random initialisation.
        freeze_bn: keep every BatchNorm layer in evaluation mode, even under ``train()``, so their
            running statistics stay those of the pretrained weights (DomainBed's default). Their
            affine parameters still train.
        dropout: dropout probability applied to the features.

    Attributes:
        n_outputs: the feature width.
        network: the torchvision ResNet, ``fc`` replaced by ``nn.Identity``.

    Raises:
        ValueError: unknown ``arch``, ``dropout`` outside [0, 1), weights that do not fit.
        ImportError: torchvision is not installed.
        FileNotFoundError: ``weights_path`` does not exist.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        weights_path: str | os.PathLike | None = None,
        freeze_bn: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"unknown ResNet {arch!r}: use one of {', '.join(RESNET_ARCHS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        try:
            import torchvision.models
        except ImportError as error:
            raise ImportError(_TORCHVISION_MESSAGE) from error
        network = getattr(torchvision.models, arch)(weights=None)
        self.n_outputs = int(network.fc.in_features)
        network.fc = nn.Identity()
        if weights_path is not None:
            load_backbone_weights(network, weights_path)
        self.network = network
        self.arch = arch
        self.freeze_bn = bool(freeze_bn)
        self.dropout = nn.Dropout(dropout)
        self.train()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.network(x))

    def train(self, mode: bool = True) -> ResNetFeaturizer:
        """Sets the training mode; with ``freeze_bn`` the BatchNorm layers stay in evaluation mode."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
