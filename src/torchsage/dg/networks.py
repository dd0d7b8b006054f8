"""Networks for the domain-generalization harness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["MNISTCNN", "classifier", "featurizer"]


class MNISTCNN(nn.Module):
    """DomainBed's MNIST network: four 3x3 convolutions (the second with stride 2), each followed
    by ReLU and GroupNorm(8), global average pooling and a linear head. Works at any input size.

    Args:
        in_channels: image channels.
        num_classes: outputs of the head (``None`` for a featurizer without head).
        widths: channels of the four convolutions (DomainBed: 64, 128, 128, 128).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int | None = 10, widths: Sequence[int] = (64, 128, 128, 128)
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"widths must list 4 channel counts, got {list(widths)}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(channels, width, 3, stride=2 if i == 1 else 1, padding=1),
                nn.ReLU(),
                nn.GroupNorm(8, width),
            ]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.n_outputs = channels
        self.head = nn.Linear(channels, num_classes) if num_classes is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def featurizer(input_shape: Sequence[int], hparams: dict[str, Any]) -> nn.Module:
    """The feature extractor named by ``hparams["backbone"]``; it exposes ``n_outputs``."""
    backbone = hparams["backbone"]
    if backbone == "mnist_cnn":
        w = hparams.get("cnn_width", 64)
        if isinstance(w, bool) or not isinstance(w, int) or w < 8 or w % 8:
            raise ValueError(
                f"hparam cnn_width must be a positive multiple of 8 (GroupNorm(8) splits the channels "
                f"into 8 groups), got {w!r}"
            )
        return MNISTCNN(input_shape[0], None, widths=(w, 2 * w, 2 * w, 2 * w))
    if backbone in ("resnet18", "resnet50"):
        from torchsage.dg.resnet import ResNetFeaturizer

        return ResNetFeaturizer(
            backbone,
            weights_path=hparams.get("pretrained_path"),
            freeze_bn=hparams.get("freeze_bn", True),
            dropout=hparams.get("dropout", 0.0),
            pretrained=hparams.get("pretrained"),
        )
    if backbone in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        from torchsage.dg.finetune import LiteFeaturizer

        return LiteFeaturizer(
            pretrained=hparams.get("pretrained", "imagenet"),
            weights_path=hparams.get("pretrained_path"),
            freeze_bn=hparams.get("freeze_bn", True),
            train_from_block=hparams.get("train_from_block", 0),
            from_trunk=bool(hparams.get("cache_trunk", False)),
            dropout=hparams.get("dropout", 0.0),
            variant=backbone.removeprefix("efficientnet_"),
        )
    raise ValueError(
        f"unknown backbone {backbone!r}: use mnist_cnn, resnet18, resnet50 or efficientnet_lite0/1/2"
    )


def classifier(n_features: int, num_classes: int, nonlinear: bool = False) -> nn.Module:
    """A linear head, or a two-hidden-layer MLP head when ``nonlinear``."""
    if not nonlinear:
        return nn.Linear(n_features, num_classes)
    hidden = max(n_features // 2, num_classes)
    return nn.Sequential(
        nn.Linear(n_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
