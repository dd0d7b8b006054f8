"""ResNet feature extractors for the DomainBed image data sets (torchvision's ResNet-18 / ResNet-50).

torchvision is optional (``pip install 'torchsage[vision]'``); it is imported only when a
:class:`ResNetFeaturizer` is built. Backbones start from ImageNet weights when asked
(``pretrained="imagenet"``, the default hyperparameter of the image data sets, as in DomainBed and
the SAGE paper): torchvision's published ``IMAGENET1K_V1`` weights (the ones DomainBed's
``pretrained=True`` loads), read from torch's cache (``torch.hub.get_dir()/checkpoints``) and
fetched into it on first use where a network is reachable. A local state dict
(``weights_path``, the hyperparameter ``pretrained_path``) takes precedence. Where neither is
available, building the backbone fails with one line naming the URL, the file to put in the cache
and the hyperparameter for a local file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchsage.files import load_weights, safe_torch_load

__all__ = ["PRETRAINED", "RESNET_ARCHS", "ResNetFeaturizer", "imagenet_weights_file", "load_backbone_weights"]

#: Supported architectures and the width of their pooled features.
RESNET_ARCHS: dict[str, int] = {"resnet18": 512, "resnet50": 2048}

#: Values of ``pretrained``: ImageNet weights, or ``None`` for a random initialisation.
PRETRAINED: tuple[str | None, ...] = ("imagenet", None)

_TORCHVISION_MESSAGE = "ResNet backbones need torchvision: pip install 'torchsage[vision]'"


def _torchvision_models() -> Any:
    try:
        import torchvision.models
    except ImportError as error:
        raise ImportError(_TORCHVISION_MESSAGE) from error
    except RuntimeError as error:  # a build for another torch: "operator torchvision::nms does not exist"
        raise ImportError(
            f"torchvision is installed but does not import beside torch {torch.__version__} ({error}): "
            "install the torchvision release made for this torch, from the same index as torch"
        ) from error
    return torchvision.models


def imagenet_weights_file(arch: str) -> Path:
    """The file of torchvision's ImageNet weights (``IMAGENET1K_V1``) of ``arch`` in torch's cache
    (``torch.hub.get_dir()/checkpoints/<file name of the URL>``), downloaded there first (hash
    checked, written whole) when it is missing.

    Raises:
        FileNotFoundError: the file is not in the cache and cannot be downloaded; the one-line
            message names the URL, where to put the file, and the ``pretrained_path``
            hyperparameter for a file kept elsewhere.
        ValueError: unknown ``arch``.

    Example:
        >>> imagenet_weights_file("resnet50")  # doctest: +SKIP
        PosixPath('/home/me/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth')
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet {arch!r}: use one of {', '.join(RESNET_ARCHS)}")
    models = _torchvision_models()
    enum = getattr(models, f"ResNet{arch.removeprefix('resnet')}_Weights")
    url = str(enum.IMAGENET1K_V1.url)
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    match = re.search(r"-([a-f0-9]+)\.", target.name)  # torchvision names carry a hash prefix
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # to a temporary file, moved into place only when whole and matching the hash
        torch.hub.download_url_to_file(url, str(target), match.group(1) if match else None, progress=False)
    except Exception as error:  # no network, refused, proxy, hash mismatch, read-only cache
        target.unlink(missing_ok=True)
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        raise FileNotFoundError(
            f"ImageNet weights of {arch} are not in torch's cache and could not be downloaded ({reason}); "
            f"download {url} to {target} on a machine with network access, or set the hyperparameter "
            f'pretrained_path to a local copy ({{"pretrained_path": "/path/{target.name}"}}); '
            f'{{"pretrained": null}} trains from a random initialisation'
        ) from None
    return target


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
    BatchNorm's batch counters (``num_batches_tracked``) alone may be absent, as in torchvision's
    ``IMAGENET1K_V1`` ResNet files (re-saved copies of files older than the counter, pytorch/vision
    issue 2068): they keep the network's value, as ``torch.nn.Module.load_state_dict`` does.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing, unexpected or mis-shaped keys (the message names a few of them).
    """
    path = Path(weights_path).expanduser()
    loaded = safe_torch_load(
        path,
        what="pretrained weights file",
        hint=" (set the hyperparameter pretrained_path to an existing state_dict file saved with torch.save)",
    )
    if not isinstance(loaded, dict):
        raise ValueError(f"pretrained weights file {path} holds a {type(loaded).__name__}, not a state_dict")
    state = _backbone_state(loaded)
    expected = network.state_dict()
    for key in set(expected) - set(state):
        if key.endswith(".num_batches_tracked"):  # absent from files saved before PyTorch 0.4
            state[key] = expected[key]
    load_weights(network, state, what=f"weights in {path}")


class ResNetFeaturizer(nn.Module):
    """A torchvision ResNet without its classifier: images ``(N, 3, H, W)`` to pooled features
    ``(N, n_outputs)``, as DomainBed's ResNet featurizer.

    Args:
        arch: ``"resnet18"`` (512 features) or ``"resnet50"`` (2048 features).
        weights_path: a local file with the network's state dict (``fc.*`` is ignored; a
            ``module.`` prefix is removed); it takes precedence over ``pretrained``.
        pretrained: ``"imagenet"``: torchvision's ImageNet weights (:func:`imagenet_weights_file`)
            when no ``weights_path`` is given; ``None``: the random initialisation unless
            ``weights_path`` is given.
        freeze_bn: keep every BatchNorm layer in evaluation mode, even under ``train()``, so their
            running statistics stay those of the pretrained weights (DomainBed's default). Their
            affine parameters still train.
        dropout: dropout probability applied to the features.

    Attributes:
        n_outputs: the feature width.
        network: the torchvision ResNet, ``fc`` replaced by ``nn.Identity``.

    Raises:
        ValueError: unknown ``arch`` or ``pretrained``, ``dropout`` outside [0, 1), weights that
            do not fit.
        ImportError: torchvision is not installed, or is a build for another torch.
        FileNotFoundError: ``weights_path`` does not exist, or the ImageNet weights are neither
            cached nor downloadable (the message says how to provide them).

    Example:
        >>> model = ResNetFeaturizer("resnet18", pretrained=None)  # doctest: +SKIP
        >>> model(torch.randn(2, 3, 64, 64)).shape  # doctest: +SKIP
        torch.Size([2, 512])
    """

    def __init__(
        self,
        arch: str = "resnet50",
        weights_path: str | os.PathLike | None = None,
        freeze_bn: bool = True,
        dropout: float = 0.0,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"unknown ResNet {arch!r}: use one of {', '.join(RESNET_ARCHS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if pretrained not in PRETRAINED:
            raise ValueError(
                f'pretrained must be "imagenet" or null (random initialisation), got {pretrained!r}'
            )
        network = getattr(_torchvision_models(), arch)(weights=None)
        self.n_outputs = int(network.fc.in_features)
        network.fc = nn.Identity()
        if weights_path is None and pretrained == "imagenet":
            weights_path = imagenet_weights_file(arch)
        if weights_path is not None:
            load_backbone_weights(network, weights_path)
        self.weights_path = None if weights_path is None else str(weights_path)
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
