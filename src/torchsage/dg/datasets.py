"""Data sets of the domain-generalization harness and their registry.

The embedded ones are built from scikit-learn's bundled handwritten digits (no download):

* ``RotatedDigits``: 6 environments rotated by 0, 15, 30, 45, 60 and 75 degrees, 10 classes, 1x16x16
  (the analogue of DomainBed's RotatedMNIST);
* ``ColoredDigits``: 3 environments, label ``digit < 5`` flipped with probability 0.25, the digit
  drawn in one of 2 channels chosen by the label and flipped with probability 0.1, 0.2 and 0.9,
  2 classes, 2x8x8 (the analogue of ColoredMNIST).

The real DomainBed image data sets (VLCS, PACS, OfficeHome, TerraIncognita, DomainNet) load from
``--data-dir`` (see :mod:`torchsage.dg.images`). ``EmojiStyles`` (six artists' emoji designs) and
``EmojiStylesPip`` (the three that pip alone installs) are built from installed packages into a
cache (``--data-dir`` names its folder; see :mod:`torchsage.dg.emoji`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from torchsage.dg.emoji import ALL_STYLES, PIP_STYLES

__all__ = [
    "COLORED_DIGITS_FLIPS",
    "DATASETS",
    "ROTATED_DIGITS_ANGLES",
    "DGDataset",
    "canonical_dataset",
    "colored_digits",
    "environment_names",
    "environment_splits",
    "get_dataset",
    "load_digits_tensor",
    "rotate",
    "rotated_digits",
    "seed_hash",
    "split_environment",
]

ROTATED_DIGITS_ANGLES: tuple[int, ...] = (0, 15, 30, 45, 60, 75)
COLORED_DIGITS_FLIPS: tuple[float, ...] = (0.1, 0.2, 0.9)


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


def colored_digits(flips: Sequence[float] = COLORED_DIGITS_FLIPS, seed: int = 0) -> list[TensorDataset]:
    """ColoredDigits: binary label ``digit < 5`` with 25% label noise; the digit is drawn in the
    channel given by the label, flipped with each environment's probability, so colour predicts
    the label well in the first two environments and badly in the last (DomainBed's ColoredMNIST
    construction on the 8x8 digits). Deterministic given ``seed``."""
    images, digits = load_digits_tensor(8)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    images, digits = images[order], digits[order]
    envs = []
    for i, flip in enumerate(flips):
        x, d = images[i :: len(flips)], digits[i :: len(flips)]
        labels = (d < 5).long() ^ (torch.rand(len(d), generator=gen) < 0.25).long()
        colors = labels ^ (torch.rand(len(d), generator=gen) < flip).long()
        two = torch.cat([x, x], dim=1)
        two[torch.arange(len(x)), 1 - colors] = 0.0  # keep only the channel of the colour
        envs.append(TensorDataset(two, labels))
    return envs


def seed_hash(*args: object) -> int:
    """A stable integer in [0, 2**31) from the arguments (unlike ``hash``, not salted per process)."""
    return int(hashlib.md5(repr(args).encode()).hexdigest(), 16) % (2**31)


@dataclass
class DGDataset:
    """A multi-environment data set.

    Attributes:
        name: registry name.
        environments: one map-style data set per environment, yielding ``(image, label)``.
        env_names: display names of the environments.
        num_classes: number of labels.
        input_shape: ``(channels, height, width)``.
        train_environment: returns the training-time view of environment ``i`` (with data
            augmentation where the data set has one); identity for the embedded sets.
        checkpoint_freq, steps: DomainBed's defaults for this data set.
        groups: per environment, each sample's group (EmojiStyles: the emoji it draws); the in/out
            split then keeps every group whole and on the same side in every environment.
    """

    name: str
    environments: list[Dataset]
    env_names: list[str]
    num_classes: int
    input_shape: tuple[int, int, int]
    train_environment: Callable[[int], Dataset] | None = None
    checkpoint_freq: int = 100
    steps: int = 5001
    extra: dict = field(default_factory=dict)
    groups: list[list[int]] | None = None

    def training_view(self, i: int) -> Dataset:
        return self.environments[i] if self.train_environment is None else self.train_environment(i)


@functools.cache
def _embedded(name: str) -> tuple[TensorDataset, ...]:
    """The environments of an embedded data set, built once per process (a sweep's worker
    processes run many jobs; the tensors are only read)."""
    return tuple(rotated_digits() if name == "RotatedDigits" else colored_digits())


def _rotated(data_dir: str | None, augment: bool, image_size: int) -> DGDataset:
    envs = list(_embedded("RotatedDigits"))
    return DGDataset(
        "RotatedDigits", envs, [f"{a}deg" for a in ROTATED_DIGITS_ANGLES], 10, (1, 16, 16), steps=1001
    )


def _colored(data_dir: str | None, augment: bool, image_size: int) -> DGDataset:
    envs = list(_embedded("ColoredDigits"))
    names = [f"{'+' if f < 0.5 else '-'}{round(100 * max(f, 1 - f))}%" for f in COLORED_DIGITS_FLIPS]
    return DGDataset("ColoredDigits", envs, names, 2, (2, 8, 8), steps=1001)


def _image_dataset(name: str) -> Callable[[str | None, bool, int], DGDataset]:
    def build(data_dir: str | None, augment: bool, image_size: int) -> DGDataset:
        from torchsage.dg.images import ImageDataset

        if data_dir is None:
            raise ValueError(f"{name} loads from a directory: pass --data-dir (the folder holding {name}/)")
        data = ImageDataset(name, Path(data_dir), augment=augment, image_size=image_size)
        return DGDataset(
            name,
            list(data.environments),
            list(data.env_names),
            data.num_classes,
            tuple(data.input_shape),
            train_environment=data.training_environment,
            checkpoint_freq=1000 if name == "DomainNet" else 300,
            extra={"images": data},
        )

    return build


def _emoji(styles: tuple[str, ...], name: str) -> Callable[[str | None, bool, int], DGDataset]:
    def build(data_dir: str | None, augment: bool, image_size: int) -> DGDataset:
        data = _emoji_data(styles, data_dir)
        envs = [data.environment(i, image_size) for i in range(len(styles))]
        return DGDataset(
            name,
            list(envs),
            list(styles),
            len(data.classes),
            (3, image_size, image_size),
            train_environment=(lambda i: data.environment(i, image_size, train=True)) if augment else None,
            checkpoint_freq=50,
            steps=601,
            extra={"classes": data.classes, "manifest": data.manifest},
            groups=[e.groups for e in envs],
        )

    return build


@functools.cache
def _emoji_data(styles: tuple[str, ...], data_dir: str | None):
    from torchsage.dg.emoji import build_emoji_styles, load_emoji_styles

    return load_emoji_styles(build_emoji_styles(styles, data_dir))


#: name -> (environment names, builder(data_dir, augment, image_size)). Adding a data set is one entry.
DATASETS: dict[str, tuple[tuple[str, ...], Callable[[str | None, bool, int], DGDataset]]] = {
    "RotatedDigits": (tuple(f"{a}deg" for a in ROTATED_DIGITS_ANGLES), _rotated),
    "ColoredDigits": (("+90%", "+80%", "-90%"), _colored),
    "VLCS": (("Caltech101", "LabelMe", "SUN09", "VOC2007"), _image_dataset("VLCS")),
    "PACS": (("art_painting", "cartoon", "photo", "sketch"), _image_dataset("PACS")),
    "OfficeHome": (("Art", "Clipart", "Product", "Real_World"), _image_dataset("OfficeHome")),
    "TerraIncognita": (
        ("location_100", "location_38", "location_43", "location_46"),
        _image_dataset("TerraIncognita"),
    ),
    "DomainNet": (
        ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        _image_dataset("DomainNet"),
    ),
    "EmojiStyles": (ALL_STYLES, _emoji(ALL_STYLES, "EmojiStyles")),
    "EmojiStylesPip": (PIP_STYLES, _emoji(PIP_STYLES, "EmojiStylesPip")),
}


def canonical_dataset(name: str) -> str:
    """The registered name of a data set, matched without regard to case and punctuation
    (``rotateddigits`` -> ``RotatedDigits``); ValueError listing the known ones otherwise."""
    from torchsage.registry import resolve

    return resolve(name, DATASETS, "dataset")


def environment_names(name: str) -> list[str]:
    """The environments of a registered data set (any spelling), without loading it."""
    return list(DATASETS[canonical_dataset(name)][0])


def get_dataset(
    name: str, data_dir: str | None = None, augment: bool = False, image_size: int = 224
) -> DGDataset:
    """Builds a registered data set. ``augment`` (training views) and ``image_size`` apply to the
    image sets; the embedded digit sets have fixed sizes."""
    return DATASETS[canonical_dataset(name)][1](data_dir, augment, image_size)


def split_environment(
    env: Dataset, holdout_fraction: float, seed: int, groups: Sequence[int] | None = None
) -> tuple[Subset, Subset]:
    """Splits an environment into (in, out) parts, ``out`` holding ``holdout_fraction`` of it,
    with a permutation seeded by ``seed`` (the harness passes a hash of the trial seed and the
    environment index, so each trial gets its own split).

    With ``groups`` (one per sample), the permutation is over the distinct groups instead and
    ``out`` takes ``int(holdout_fraction * number of groups)`` whole groups: the same seed and group
    set give the same groups out in every environment (the harness then seeds by the trial alone).

    Example:
        >>> a, b = split_environment(list(range(6)), 0.5, seed=0, groups=[0, 0, 1, 1, 2, 2])
        >>> sorted({i // 2 for i in b.indices}) in ([0], [1], [2])
        True
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    generator = torch.Generator().manual_seed(seed)
    if groups is None:
        n = len(env)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=generator).tolist()
        n_out = int(n * holdout_fraction)
        return Subset(env, order[n_out:]), Subset(env, order[:n_out])
    distinct = sorted(set(groups))
    shuffled = [distinct[i] for i in torch.randperm(len(distinct), generator=generator).tolist()]
    out = set(shuffled[: int(len(distinct) * holdout_fraction)])
    return (
        Subset(env, [i for i, g in enumerate(groups) if g not in out]),
        Subset(env, [i for i, g in enumerate(groups) if g in out]),
    )


def environment_splits(
    dataset: DGDataset,
    holdout_fraction: float,
    trial_seed: int,
    test_envs: Sequence[int] = (),
    novel_fraction: float = 0.0,
) -> list[tuple[Subset, Subset]]:
    """The (in, out) split of every environment for a trial, as training and the checkpoint tools
    make it: seeded by the trial and the environment, or by the trial alone where the data set has
    groups (so a group is held out in every environment together).

    With ``novel_fraction > 0`` (data sets with groups only), that fraction of the groups, drawn per
    trial, is novel: left out of every training environment and the only part of the test
    environments, so the test asks for concepts no design showed in training (EmojiStyles' harder
    variant; the plain one tests other artists' drawings of concepts seen in training).

    Example:
        >>> data = DGDataset("toy", [list(range(8))] * 2, ["a", "b"], 2, (1, 1, 1),
        ...                  groups=[[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
        >>> (a_in, a_out), (b_in, b_out) = environment_splits(data, 0.25, 0, [1], novel_fraction=0.25)
        >>> novel = {i // 2 for i in b_in.indices + b_out.indices}
        >>> len(novel), novel.isdisjoint(i // 2 for i in a_in.indices + a_out.indices)
        (1, True)
    """
    if dataset.groups is None:
        if novel_fraction:
            raise ValueError(
                f"novel_fraction needs a data set with groups (EmojiStyles); {dataset.name} has none"
            )
        return [
            split_environment(env, holdout_fraction, seed_hash(trial_seed, i))
            for i, env in enumerate(dataset.environments)
        ]
    splits = [
        split_environment(env, holdout_fraction, seed_hash(trial_seed, "groups"), dataset.groups[i])
        for i, env in enumerate(dataset.environments)
    ]
    if not novel_fraction:
        return splits
    if not 0.0 < novel_fraction < 1.0 or not test_envs:
        raise ValueError(
            f"novel_fraction must lie in (0, 1) and needs test environments, got {novel_fraction}"
        )
    distinct = sorted(set(dataset.groups[0]))
    order = torch.randperm(
        len(distinct), generator=torch.Generator().manual_seed(seed_hash(trial_seed, "novel"))
    )
    novel = {distinct[i] for i in order[: max(1, int(len(distinct) * novel_fraction))].tolist()}
    out = []
    for i, parts in enumerate(splits):
        keep = (lambda g: g in novel) if i in test_envs else (lambda g: g not in novel)
        out.append(
            tuple(Subset(p.dataset, [j for j in p.indices if keep(dataset.groups[i][j])]) for p in parts)
        )
    return out  # type: ignore[return-value]
