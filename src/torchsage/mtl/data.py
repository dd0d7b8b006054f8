"""Data sets of the multi-task harness.

* :func:`multi_digits`: MultiDigits, the MultiMNIST construction on scikit-learn's bundled digits
  (no download). Tasks ``"left"`` and ``"right"``: classify the digit at the top left and the one
  at the bottom right of an overlaid pair.
* :class:`NYUv2` and :class:`Cityscapes`: the dense-prediction benchmarks, read from the
  preprocessed numpy layout used by the MTAN, CAGrad, Nash-MTL and FAMO experiments::

      {root}/{train,val}/image/{i}.npy    H x W x 3 float
      {root}/{train,val}/label/{i}.npy    H x W float class ids, -1 = ignore
                                          (Cityscapes: label_7/, with label/ as a fallback)
      {root}/{train,val}/depth/{i}.npy    H x W x 1 (or H x W) float, 0 = no measurement
      {root}/{train,val}/normal/{i}.npy   H x W x 3 float unit vectors, 0 = invalid (NYUv2 only)

  :func:`write_fake_nyuv2` and :func:`write_fake_cityscapes` write tiny random folders in that
  layout for tests.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchsage.files import safe_numpy_load

__all__ = [
    "CITYSCAPES_TASKS",
    "MULTI_DIGITS_CANVAS",
    "MULTI_DIGITS_DIGIT_SIZE",
    "MULTI_DIGITS_MEAN",
    "MULTI_DIGITS_OFFSETS",
    "MULTI_DIGITS_PAIRS",
    "MULTI_DIGITS_SIZE",
    "MULTI_DIGITS_STD",
    "NYUV2_TASKS",
    "Cityscapes",
    "DenseDataset",
    "Loader",
    "NYUv2",
    "digit_sources",
    "horizontal_flip",
    "multi_digits",
    "multi_digits_pairs",
    "overlay",
    "random_scale_crop",
    "write_fake_cityscapes",
    "write_fake_nyuv2",
]

# ---------------------------------------------------------------------------------------------
# MultiDigits
# ---------------------------------------------------------------------------------------------

MULTI_DIGITS_CANVAS = 36
MULTI_DIGITS_OFFSETS: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (6, 6))
MULTI_DIGITS_SIZE = 28
# An MNIST digit fills a 20x20 box centred in its 28x28 frame; the 8x8 digits are upsampled to
# the box and padded the same way, so the two digits overlap as much as in MultiMNIST.
MULTI_DIGITS_DIGIT_SIZE = 20
MULTI_DIGITS_PAIRS = {"train": 10000, "val": 2000, "test": 2000}
# Fractions of the 1797 source digits reserved for the test and validation splits.
_SOURCE_FRACTIONS = {"test": 0.2, "val": 0.1}
_SOURCE_SEED = 0  # fixed: the split of the source digits never depends on ``seed``
# Pixel statistics of the 28x28 MultiDigits training images (seed 0), in [0, 1] units.
MULTI_DIGITS_MEAN = 0.165
MULTI_DIGITS_STD = 0.280


def digit_sources() -> tuple[Tensor, Tensor]:
    """The 1797 bundled digits as MNIST-like ``(N, 28, 28)`` frames in [0, 1], with their labels.

    Each 8x8 digit is upsampled (bilinear) to 20x20 and padded by 4 pixels on every side.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError("MultiDigits needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    size = MULTI_DIGITS_DIGIT_SIZE
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    pad = (MULTI_DIGITS_SIZE - size) // 2
    images = F.pad(images.clamp(0.0, 1.0), (pad, pad, pad, pad))
    return images.squeeze(1), torch.tensor(digits.target, dtype=torch.long)


def _source_indices(split: str, n_sources: int) -> Tensor:
    """Indices of the source digits that a split may use (disjoint between splits)."""
    order = torch.randperm(n_sources, generator=torch.Generator().manual_seed(_SOURCE_SEED))
    n_test = round(_SOURCE_FRACTIONS["test"] * n_sources)
    n_val = round(_SOURCE_FRACTIONS["val"] * n_sources)
    parts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return parts[split].sort().values


def multi_digits_pairs(split: str, *, seed: int = 0, n: int | None = None) -> tuple[Tensor, Tensor]:
    """Indices into :func:`digit_sources` of the left and the right digit of every pair of a split.

    Both digits of a pair are drawn uniformly (with replacement) from the source digits reserved
    for ``split``; the draw is seeded by ``seed`` and the split.
    """
    if split not in MULTI_DIGITS_PAIRS:
        raise ValueError(f"split must be one of {sorted(MULTI_DIGITS_PAIRS)}, got {split!r}")
    if n is None:
        n = MULTI_DIGITS_PAIRS[split]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    pool = _source_indices(split, 1797)
    split_code = sorted(MULTI_DIGITS_PAIRS).index(split)
    generator = torch.Generator().manual_seed(1_000_003 * int(seed) + split_code)
    picks = torch.randint(len(pool), (2, n), generator=generator)
    return pool[picks[0]], pool[picks[1]]


def overlay(left: Tensor, right: Tensor) -> Tensor:
    """The MultiMNIST canvas: ``left`` at offset (0, 0) and ``right`` at (6, 6) of a 36x36 canvas,
    overlapping pixels taking the element-wise maximum. Batched: ``(B, 28, 28)`` -> ``(B, 36, 36)``.
    """
    if left.shape != right.shape or left.shape[-2:] != (MULTI_DIGITS_SIZE, MULTI_DIGITS_SIZE):
        raise ValueError(
            f"overlay needs two (..., 28, 28) stacks, got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    pad_total = MULTI_DIGITS_CANVAS - MULTI_DIGITS_SIZE
    placed = []
    for image, (top, lft) in zip((left, right), MULTI_DIGITS_OFFSETS, strict=True):
        placed.append(F.pad(image, (lft, pad_total - lft, top, pad_total - top)))
    return torch.maximum(placed[0], placed[1])


def multi_digits(split: str, *, seed: int = 0, n: int | None = None) -> TensorDataset:
    """MultiDigits: pairs of bundled digits overlaid as in MultiMNIST and resized to 28x28.

    Items are ``(x, y_left, y_right)``: ``x`` a ``[1, 28, 28]`` float32 image normalised by
    :data:`MULTI_DIGITS_MEAN` and :data:`MULTI_DIGITS_STD`, the labels int64. The splits
    ``"train"`` (10000 pairs), ``"val"`` and ``"test"`` (2000 each; ``n`` overrides) draw their
    digits from disjoint 70/10/20 parts of the 1797 source images, so test digits are unseen.
    Deterministic given ``split``, ``seed`` and ``n``.
    """
    left, right = multi_digits_pairs(split, seed=seed, n=n)
    images, labels = digit_sources()
    canvas = overlay(images[left], images[right]).unsqueeze(1)
    size = MULTI_DIGITS_SIZE
    x = F.interpolate(canvas, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = (x.clamp_(0.0, 1.0) - MULTI_DIGITS_MEAN) / MULTI_DIGITS_STD
    return TensorDataset(x.contiguous(), labels[left], labels[right])


# ---------------------------------------------------------------------------------------------
# NYUv2 and Cityscapes
# ---------------------------------------------------------------------------------------------

NYUV2_TASKS: dict[str, int] = {"segmentation": 13, "depth": 1, "normal": 3}
CITYSCAPES_TASKS: dict[str, int] = {"segmentation": 7, "depth": 1}
_SPLIT_FOLDERS = {"train": "train", "val": "val", "test": "val"}
_SCALES = (1.0, 1.2, 1.5)


def random_scale_crop(
    image: Tensor, targets: dict[str, Tensor], scales: tuple[float, ...] = _SCALES
) -> tuple[Tensor, dict[str, Tensor]]:
    """Zooms into a random crop: picks a scale ``s`` from ``scales``, crops an ``H/s x W/s``
    window at a random position and resizes it back to ``H x W``; depth is divided by ``s`` (the
    scene looks ``s`` times closer). Image and normals are resized bilinearly, labels and depth by
    nearest neighbour (no blending of class ids or of valid and missing depth)."""
    height, width = image.shape[-2:]
    scale = scales[random.randrange(len(scales))]
    h, w = int(height / scale), int(width / scale)
    top, left = random.randint(0, height - h), random.randint(0, width - w)

    def resize(t: Tensor, mode: str) -> Tensor:
        window = t[None, :, top : top + h, left : left + w]
        if mode == "nearest":
            return F.interpolate(window, size=(height, width), mode="nearest")[0]
        return F.interpolate(window, size=(height, width), mode="bilinear", align_corners=True)[0]

    out = {}
    for task, target in targets.items():
        if task == "segmentation":
            out[task] = resize(target[None].float(), "nearest")[0].round().long()
        elif task == "depth":
            out[task] = resize(target, "nearest") / scale
        else:
            out[task] = resize(target, "bilinear")
    return resize(image, "bilinear"), out


def horizontal_flip(image: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirrors left-right; the x component of a surface normal changes sign."""
    out = {task: target.flip(-1) for task, target in targets.items()}
    if "normal" in out:
        out["normal"] = out["normal"].clone()
        out["normal"][0] = -out["normal"][0]
    return image.flip(-1), out


class DenseDataset(Dataset):
    """A split of a preprocessed dense-prediction benchmark (see the module docstring).

    Items are ``(image, targets)``: ``image`` a ``3 x H x W`` float tensor, ``targets`` a dict
    with ``"segmentation"`` (``H x W`` int64, -1 = ignore), ``"depth"`` (``1 x H x W``) and, for
    NYUv2, ``"normal"`` (``3 x H x W``).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"`` (``"test"`` reads ``val/``, the published test split).
        augment: random scale-crop (scales 1, 1.2, 1.5) and horizontal flip with probability
            1/2, drawn from Python's ``random`` and torch's global generator.
    """

    TASKS: ClassVar[dict[str, int]] = {}
    LABEL_FOLDERS: ClassVar[tuple[str, ...]] = ("label",)
    NAME: ClassVar[str] = ""

    def __init__(self, root: str | os.PathLike[str], split: str = "train", augment: bool = False) -> None:
        if split not in _SPLIT_FOLDERS:
            raise ValueError(f"split must be 'train' or 'val' (or 'test' for val), got {split!r}")
        self.root = Path(root).expanduser()
        self.split = split
        self.augment = bool(augment)
        self.path = self.root / _SPLIT_FOLDERS[split]
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.NAME} data directory not found: {self.root}")
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.NAME} split folder not found: {self.path}")
        self.folders = {"image": self.path / "image"}
        for task in self.TASKS:
            if task == "segmentation":
                candidates = [self.path / name for name in self.LABEL_FOLDERS]
                found = next((c for c in candidates if c.is_dir()), None)
                if found is None:
                    raise FileNotFoundError(
                        f"{self.NAME} label folder not found: " + " or ".join(str(c) for c in candidates)
                    )
                self.folders[task] = found
            else:
                self.folders[task] = self.path / task
        for folder in self.folders.values():
            if not folder.is_dir():
                raise FileNotFoundError(f"{self.NAME} folder not found: {folder}")
        names = [name for name in os.listdir(self.folders["image"]) if name.endswith(".npy")]
        if not names:
            raise FileNotFoundError(f"{self.NAME} split is empty: no .npy files in {self.folders['image']}")
        self.length = len(names)

    def __len__(self) -> int:
        return self.length

    def _load(self, folder: str, index: int) -> np.ndarray:
        return safe_numpy_load(self.folders[folder] / f"{index}.npy", what=f"{self.NAME} {folder} array")

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        index %= self.length
        image = _channels_first(self._load("image", index), 3, "image")
        targets: dict[str, Tensor] = {}
        for task, channels in self.TASKS.items():
            array = self._load(task, index)
            if task == "segmentation":
                label = torch.from_numpy(np.asarray(array, dtype=np.float32))
                if label.ndim == 3 and label.shape[-1] == 1:
                    label = label[..., 0]
                targets[task] = label.round().long().clamp_(min=-1)
            else:
                targets[task] = _channels_first(array, channels, task)
        if self.augment:
            image, targets = random_scale_crop(image, targets)
            if torch.rand(()) < 0.5:
                image, targets = horizontal_flip(image, targets)
        return image, targets


def _channels_first(array: np.ndarray, channels: int, what: str) -> Tensor:
    tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))
    if tensor.ndim == 2 and channels == 1:
        tensor = tensor[..., None]
    if tensor.ndim != 3 or tensor.shape[-1] != channels:
        raise ValueError(f"{what} array must be H x W x {channels}, got shape {tuple(array.shape)}")
    return tensor.permute(2, 0, 1).contiguous()


class NYUv2(DenseDataset):
    """NYUv2 (795 train / 654 val images, 288x384 in the preprocessed layout): 13-class semantic
    segmentation, depth and surface normals. See :class:`DenseDataset`."""

    TASKS: ClassVar[dict[str, int]] = NYUV2_TASKS
    NAME = "NYUv2"


class Cityscapes(DenseDataset):
    """Cityscapes (2975 train / 500 val images, 128x256 in the preprocessed layout): 7-class
    semantic segmentation (labels in ``label_7/``, ``label/`` also accepted) and depth. See
    :class:`DenseDataset`."""

    TASKS: ClassVar[dict[str, int]] = CITYSCAPES_TASKS
    LABEL_FOLDERS: ClassVar[tuple[str, ...]] = ("label_7", "label")
    NAME = "Cityscapes"


def _write_fake(
    root: str | os.PathLike[str],
    tasks: dict[str, int],
    label_folder: str,
    n: int,
    size: tuple[int, int],
    seed: int,
) -> Path:
    rng = np.random.default_rng(seed)
    root = Path(root)
    h, w = size
    for split in ("train", "val"):
        folders = {"image": root / split / "image"}
        folders.update(
            {task: root / split / (label_folder if task == "segmentation" else task) for task in tasks}
        )
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(folders["image"] / f"{i}.npy", rng.random((h, w, 3), dtype=np.float32))
            label = rng.integers(0, tasks["segmentation"], (h, w)).astype(np.float32)
            label[rng.random((h, w)) < 0.1] = -1.0
            np.save(folders["segmentation"] / f"{i}.npy", label)
            depth = rng.uniform(0.5, 10.0, (h, w, 1)).astype(np.float32)
            depth[rng.random((h, w, 1)) < 0.1] = 0.0
            np.save(folders["depth"] / f"{i}.npy", depth)
            if "normal" in tasks:
                normal = rng.normal(size=(h, w, 3)).astype(np.float32)
                normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
                normal[rng.random((h, w)) < 0.1] = 0.0
                np.save(folders["normal"] / f"{i}.npy", normal)
    return root


def write_fake_nyuv2(
    root: str | os.PathLike[str], n: int = 4, size: tuple[int, int] = (32, 48), seed: int = 0
) -> Path:
    """Writes a tiny random NYUv2 folder (``n`` items per split, ``size`` pixels) and returns it.

    About 10% of the labels are -1, of the depths 0 and of the normals zero vectors (invalid).
    """
    return _write_fake(root, NYUV2_TASKS, "label", n, size, seed)


def write_fake_cityscapes(
    root: str | os.PathLike[str], n: int = 4, size: tuple[int, int] = (32, 48), seed: int = 0
) -> Path:
    """Writes a tiny random Cityscapes folder (labels in ``label_7/``) and returns it."""
    return _write_fake(root, CITYSCAPES_TASKS, "label_7", n, size, seed)


class Loader:
    """Seeded shuffled minibatches of a data set, a new order every epoch (tensors sliced directly)."""

    def __init__(
        self, data: Dataset, batch_size: int, seed: int, shuffle: bool, num_workers: int = 0
    ) -> None:
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle
        self.num_workers = num_workers
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.data) / self.batch_size))

    def __iter__(self):
        n = len(self.data)
        if isinstance(self.data, TensorDataset):
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield tuple(t[idx] for t in self.data.tensors)
            return
        yield from DataLoader(
            self.data,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
