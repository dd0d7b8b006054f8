"""Multi-domain data sets built from scikit-learn's bundled handwritten digits (no download)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["ROTATED_DIGITS_ANGLES", "load_digits_tensor", "rotate", "rotated_digits"]

ROTATED_DIGITS_ANGLES: tuple[int, ...] = (0, 15, 30, 45, 60, 75)


def load_digits_tensor(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits of scikit-learn as ``(N, 1, size, size)`` floats in [0, 1] and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the embedded digits data sets need scikit-learn: pip install 'torchsage[data]'"
        ) from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp_(0.0, 1.0), torch.tensor(digits.target, dtype=torch.long)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotates a batch of images counter-clockwise about their centre (zero padding)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    matrix = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotated_digits(
    angles: Sequence[float] = ROTATED_DIGITS_ANGLES, size: int = 16, seed: int = 0
) -> list[TensorDataset]:
    """RotatedDigits: the digits shuffled, dealt round-robin to the environments, each rotated by
    its angle (the analogue of DomainBed's RotatedMNIST). Deterministic given ``seed``."""
    images, labels = load_digits_tensor(size)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    n = len(angles)
    return [TensorDataset(rotate(images[i::n], angle), labels[i::n]) for i, angle in enumerate(angles)]
