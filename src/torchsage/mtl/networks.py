"""Networks of the multi-task harness.

* :class:`MultiLeNet`: the small LeNet used for MultiMNIST (shared convolutional encoder, one
  classifier head per digit).
* :class:`SegNetMTAN`: SegNet with the Multi-Task Attention Network of Liu, Johns and Davison
  (CVPR 2019), the standard network of the NYUv2 and Cityscapes benchmarks.
* :class:`SegNetSplit`: the same SegNet shared by all tasks, split only in the prediction heads.

Every network returns a dict ``task -> output`` so that a closure can build one loss per task.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiLeNet", "SegNet", "SegNetMTAN", "SegNetSplit", "max_unpool"]


class MultiLeNet(nn.Module):
    """Shared LeNet encoder on ``1 x 28 x 28`` images with two 10-way heads ``"left"``/``"right"``.

    Encoder: conv5x5 (10w) -> maxpool 2 -> ReLU -> conv5x5 (20w) -> maxpool 2 -> ReLU -> linear
    to 50w -> ReLU; each head: linear 50w -> 50w -> ReLU -> linear to 10. ``width`` (``w``)
    multiplies every hidden size.

    Example:
        >>> net = MultiLeNet()
        >>> {k: tuple(v.shape) for k, v in net(torch.zeros(2, 1, 28, 28)).items()}
        {'left': (2, 10), 'right': (2, 10)}
    """

    TASKS = ("left", "right")

    def __init__(self, width: int = 1) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        c1, c2, hidden = 10 * width, 20 * width, 50 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 4 * 4, hidden),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict(
            {
                task: nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
                for task in self.TASKS
            }
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.shape[-3:] != (1, 28, 28):
            raise ValueError(f"MultiLeNet expects B x 1 x 28 x 28 images, got {tuple(x.shape)}")
        features = self.encoder(x)
        return {task: head(features) for task, head in self.heads.items()}


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _stage(c_in: int, c_out: int, depth: int) -> nn.Sequential:
    """``depth`` conv3x3-BN-ReLU layers, the first mapping ``c_in`` to ``c_out`` channels."""
    return nn.Sequential(*[_conv_bn_relu(c_in if i == 0 else c_out, c_out) for i in range(depth)])


def _attention_mask(c_in: int, c_out: int) -> nn.Sequential:
    """MTAN's attention mask: two 1x1 conv-BN layers, ReLU between, sigmoid at the end."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 1),
        nn.BatchNorm2d(c_out),
        nn.Sigmoid(),
    )


def _head(channels: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, outputs, 1))


def _check_tasks(tasks: Mapping[str, int], width: int) -> dict[str, int]:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for name, channels in tasks.items():
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"task {name!r} needs a positive int of output channels, got {channels!r}")
    return dict(tasks)


def _finish(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Surface normals are unit vectors: the ``"normal"`` output is L2-normalised over channels."""
    if "normal" in outputs:
        outputs["normal"] = F.normalize(outputs["normal"], p=2, dim=1)
    return outputs


def max_unpool(x: Tensor, indices: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Inverse of 2x2, stride-2 max pooling: each value returns to the position its window's
    maximum came from (``indices`` as returned by ``max_pool2d(..., return_indices=True)``), zeros
    elsewhere, on a ``size`` grid.

    Equals ``F.max_unpool2d(x, indices, 2, 2, output_size=size)`` but, the windows being
    disjoint, is written as a mask product, which torch's deterministic mode accepts.
    """
    h, w = x.shape[-2:]
    height, width = int(size[0]), int(size[1])
    up = x.repeat_interleave(2, -2).repeat_interleave(2, -1)
    source = indices.repeat_interleave(2, -2).repeat_interleave(2, -1)
    position = torch.arange(height * width, device=x.device).view(height, width)[: 2 * h, : 2 * w]
    out = up * (source == position)
    return F.pad(out, (0, width - 2 * w, 0, height - 2 * h))


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegNet(nn.Module):
    """The SegNet encoder-decoder shared by :class:`SegNetMTAN` and :class:`SegNetSplit`.

    Five encoder stages with ``w, 2w, 4w, 8w, 8w`` channels (``w = width``), each a conv3x3-BN-ReLU
    layer followed by one (stages 1-2) or two (stages 3-5) more, then 2x2 max pooling that keeps its
    indices; five mirrored decoder stages unpool with those indices. Inputs of any size of at least
    32x32 work (unpooling restores the exact pre-pooling sizes).

    :meth:`features` returns, per stage ``j``, the encoder's first and last activations
    (``enc_first[j]``, ``enc_last[j]``), the unpooled decoder inputs (``dec_in[j]``) and the
    decoder's first and last activations, decoder stage 0 being the deepest.
    """

    def __init__(self, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        f = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.filters = f
        self.enc_first = nn.ModuleList([_conv_bn_relu(in_channels, f[0])])
        self.enc_rest = nn.ModuleList()
        self.dec_first = nn.ModuleList()
        self.dec_rest = nn.ModuleList()
        for j in range(5):
            if j > 0:
                self.enc_first.append(_conv_bn_relu(f[j - 1], f[j]))
            self.enc_rest.append(_stage(f[j], f[j], 1 if j < 2 else 2))
        # Decoder stage k undoes encoder stage j = 4 - k: maps f[j] channels to f[j - 1] (f[0] last).
        for k in range(5):
            j = 4 - k
            c_out = f[max(j - 1, 0)]
            self.dec_first.append(_conv_bn_relu(f[j], c_out))
            self.dec_rest.append(_stage(c_out, c_out, 1 if j < 2 else 2))

    def features(self, x: Tensor) -> dict[str, list[Tensor]]:
        if x.shape[-2] < 32 or x.shape[-1] < 32:
            raise ValueError(f"SegNet needs inputs of at least 32x32 pixels, got {tuple(x.shape)}")
        enc_first, enc_last, indices, sizes = [], [], [], []
        h = x
        for j in range(5):
            a = self.enc_first[j](h)
            b = self.enc_rest[j](a)
            enc_first.append(a)
            enc_last.append(b)
            sizes.append(b.shape[-2:])
            h, idx = F.max_pool2d(b, 2, 2, return_indices=True)
            indices.append(idx)
        dec_in, dec_first, dec_last = [], [], []
        for k in range(5):
            j = 4 - k
            u = max_unpool(h, indices[j], sizes[j])
            a = self.dec_first[k](u)
            h = self.dec_rest[k](a)
            dec_in.append(u)
            dec_first.append(a)
            dec_last.append(h)
        return {
            "enc_first": enc_first,
            "enc_last": enc_last,
            "dec_in": dec_in,
            "dec_first": dec_first,
            "dec_last": dec_last,
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)["dec_last"][-1]


class SegNetSplit(nn.Module):
    """SegNet shared by every task, with one conv3x3 + conv1x1 prediction head per task.

    Args:
        tasks: task name -> output channels, e.g. ``{"segmentation": 13, "depth": 1, "normal": 3}``.
        width: channels of the first stage (64 in the benchmarks).
    """

    def __init__(self, tasks: Mapping[str, int], width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks, width)
        self.backbone = SegNet(width, in_channels)
        self.heads = nn.ModuleDict({t: _head(width, c) for t, c in self.tasks.items()})
        _init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.backbone(x)
        return _finish({task: head(shared) for task, head in self.heads.items()})


class SegNetMTAN(nn.Module):
    """SegNet with Multi-Task Attention (MTAN; Liu, Johns and Davison, CVPR 2019).

    The SegNet (:class:`SegNet`) is shared. Each task owns a soft attention mask per encoder and
    decoder stage (:func:`_attention_mask`, sigmoid outputs) that selects features of that stage
    for the task; the task's attended features pass through a shared conv3x3 block to the next
    stage (max-pooled going down, bilinearly upsampled going up), where they are concatenated
    with the shared features that feed the next mask. The last attended decoder features feed the
    task's prediction head (conv3x3, conv1x1). Normals are L2-normalised over channels.

    Args:
        tasks: task name -> output channels (NYUv2: ``{"segmentation": 13, "depth": 1,
            "normal": 3}``; Cityscapes: ``{"segmentation": 7, "depth": 1}``).
        width: channels of the first stage (64 in the paper; the stages have ``w, 2w, 4w, 8w,
            8w``).

    Example:
        >>> net = SegNetMTAN({"segmentation": 7, "depth": 1}, width=4)
        >>> {k: tuple(v.shape) for k, v in net(torch.zeros(1, 3, 32, 48)).items()}
        {'segmentation': (1, 7, 32, 48), 'depth': (1, 1, 32, 48)}
    """

    def __init__(self, tasks: Mapping[str, int], width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.tasks = _check_tasks(tasks, width)
        self.backbone = SegNet(width, in_channels)
        f = self.backbone.filters
        # Encoder stage j: the mask reads the stage's first activation (stage 0) or that activation
        # concatenated with the task's attended features from stage j - 1.
        enc_in = [f[0], *(2 * f[j] for j in range(1, 5))]
        # Decoder stage k (deepest first): the mask reads the unpooled shared input (f[j] channels)
        # concatenated with the task's features brought to the mask's output width.
        dec_out = [f[max(4 - k - 1, 0)] for k in range(5)]
        dec_in = [f[4 - k] + dec_out[k] for k in range(5)]
        self.encoder_attention = nn.ModuleDict(
            {t: nn.ModuleList([_attention_mask(enc_in[j], f[j]) for j in range(5)]) for t in self.tasks}
        )
        self.decoder_attention = nn.ModuleDict(
            {t: nn.ModuleList([_attention_mask(dec_in[k], dec_out[k]) for k in range(5)]) for t in self.tasks}
        )
        # Shared conv blocks carrying attended features between stages.
        self.encoder_transfer = nn.ModuleList([_conv_bn_relu(f[j], f[min(j + 1, 4)]) for j in range(5)])
        dec_transfer_in = [f[4], *dec_out[:4]]
        self.decoder_transfer = nn.ModuleList(
            [_conv_bn_relu(dec_transfer_in[k], dec_out[k]) for k in range(5)]
        )
        self.heads = nn.ModuleDict({t: _head(f[0], c) for t, c in self.tasks.items()})
        _init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        s = self.backbone.features(x)
        outputs = {}
        for task in self.tasks:
            enc_masks, dec_masks = self.encoder_attention[task], self.decoder_attention[task]
            carried: Tensor | None = None
            for j in range(5):
                mask_in = s["enc_first"][j] if carried is None else torch.cat((s["enc_first"][j], carried), 1)
                attended = enc_masks[j](mask_in) * s["enc_last"][j]
                carried = F.max_pool2d(self.encoder_transfer[j](attended), 2, 2)
            for k in range(5):
                target = s["dec_in"][k].shape[-2:]
                up = F.interpolate(carried, size=target, mode="bilinear", align_corners=True)
                up = self.decoder_transfer[k](up)
                mask = dec_masks[k](torch.cat((s["dec_in"][k], up), 1))
                carried = mask * s["dec_last"][k]
            outputs[task] = self.heads[task](carried)
        return _finish(outputs)
