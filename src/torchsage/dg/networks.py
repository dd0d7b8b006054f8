"""Networks for the domain-generalization harness."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MNISTCNN"]


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
