"""The real DomainBed image data sets (VLCS, PACS, OfficeHome, TerraIncognita, DomainNet), read from a
local directory and decoded with Pillow; nothing is downloaded and torchvision is not needed.

Layout on disk: ``<data_dir>/<dataset>/<domain>/<class>/<image files>``, as DomainBed's download
script leaves it. Both spellings of the folders are accepted:

============== ========================= ==========================================
data set       dataset folder            domain folders
============== ========================= ==========================================
VLCS           ``VLCS``                  Caltech101, LabelMe, SUN09, VOC2007
PACS           ``PACS``                  art_painting, cartoon, photo, sketch
OfficeHome     ``office_home`` or        Art, Clipart, Product, ``Real World`` or
               ``OfficeHome``            ``Real_World``
TerraIncognita ``terra_incognita`` or    location_100, location_38, location_43,
               ``TerraIncognita``        location_46
DomainNet      ``domain_net`` or         clipart, infograph, painting, quickdraw,
               ``DomainNet``             real, sketch
============== ========================= ==========================================

Where both spellings exist, DomainBed's (the first listed) wins. Image files are found recursively
below each class folder (extensions ``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``, any case;
names starting with ``.`` are skipped) in the order torchvision's ``ImageFolder`` uses, so sample
``i`` of an environment is the same file as in DomainBed.

Transforms (pure Pillow + torch, the ones DomainBed uses):

* evaluation: resize to ``(size, size)`` (bilinear), to a float tensor in [0, 1], normalise with the
  ImageNet mean and standard deviation;
* training augmentation: random resized crop (scale 0.7 to 1, aspect ratio 3/4 to 4/3), random
  horizontal flip, colour jitter (brightness, contrast, saturation and hue 0.3, in random order),
  random grayscale (probability 0.1), then to tensor and normalise.

DomainBed augments only the in-splits of the training environments (when the hyperparameter
``data_augmentation`` is true). Here every environment reads images with the evaluation transform;
:meth:`ImageFolderEnvironment.with_transform` returns a view of the same files with the other
transform, and :meth:`ImageDataset.training_environment` returns the view to train on (augmented
when the data set was built with ``augment=True``). Because the views share the sample list, the
in/out split indices of an environment apply to both.

Randomness of the augmentation comes from torch's global generator (or an explicit
``torch.Generator``): in the main process it is fixed by ``torch.manual_seed``, and a
``DataLoader`` seeds each worker's generator from the main process's, so runs are reproducible.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

try:
    from PIL import Image, ImageEnhance, UnidentifiedImageError
except ImportError:  # pragma: no cover - exercised only without Pillow
    Image = ImageEnhance = None  # type: ignore[assignment]
    UnidentifiedImageError = OSError  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_DATASETS",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageDataset",
    "ImageFolderEnvironment",
    "color_jitter",
    "eval_transform",
    "random_resized_crop",
    "to_normalized_tensor",
    "train_transform",
    "verify",
]

#: Data set name -> its domains, in DomainBed's (canonical) order.
IMAGE_DATASETS: dict[str, list[str]] = {
    "VLCS": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
    "PACS": ["art_painting", "cartoon", "photo", "sketch"],
    "OfficeHome": ["Art", "Clipart", "Product", "Real_World"],
    "TerraIncognita": ["location_100", "location_38", "location_43", "location_46"],
    "DomainNet": ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
}

# DomainBed's folder names where they differ from the data set and domain names.
_DATASET_FOLDERS: dict[str, str] = {
    "OfficeHome": "office_home",
    "TerraIncognita": "terra_incognita",
    "DomainNet": "domain_net",
}
_DOMAIN_FOLDERS: dict[tuple[str, str], str] = {("OfficeHome", "Real_World"): "Real World"}

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# DomainBed's augmentation parameters.
_CROP_SCALE = (0.7, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_JITTER = 0.3
_GRAYSCALE_P = 0.1


class DatasetError(ValueError):
    """A data set on disk is missing, incomplete or holds an unreadable image; the message names
    the path at fault."""


def _require_pillow() -> None:
    if Image is None:  # pragma: no cover - exercised only without Pillow
        raise ImportError("the DomainBed image data sets need Pillow: pip install Pillow")


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def _bilinear() -> Any:
    return getattr(Image, "Resampling", Image).BILINEAR


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in ``[low, high)``."""
    return int(torch.randint(low, high, (1,), generator=generator))


def to_normalized_tensor(image: PILImage) -> Tensor:
    """An RGB image as a ``3 x H x W`` float tensor, scaled to [0, 1] and normalised with the
    ImageNet mean and standard deviation."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # H x W x 3, a writable copy
    tensor = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return tensor.sub_(mean).div_(std)


def eval_transform(image: PILImage, size: int) -> Tensor:
    """DomainBed's evaluation transform: bilinear resize to ``(size, size)``, then
    :func:`to_normalized_tensor`."""
    return to_normalized_tensor(image.convert("RGB").resize((size, size), _bilinear()))


def random_resized_crop(
    image: PILImage,
    size: int,
    scale: tuple[float, float] = _CROP_SCALE,
    ratio: tuple[float, float] = _CROP_RATIO,
    generator: torch.Generator | None = None,
) -> PILImage:
    """Crops a random region of ``scale`` times the area and aspect ratio (width / height) within
    ``ratio`` (log-uniform), and resizes it to ``(size, size)`` (bilinear). After 10 failed draws
    it falls back to the largest centred crop whose ratio lies within ``ratio``."""
    width, height = image.size
    area = width * height
    log_low, log_high = torch.log(torch.tensor(ratio)).tolist()
    box = None
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_low, log_high, generator))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(0, height - h + 1, generator)
            left = _randint(0, width - w + 1, generator)
            box = (left, top, left + w, top + h)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    return image.crop(box).resize((size, size), _bilinear())


def _adjust_hue(image: PILImage, shift: float) -> PILImage:
    """Rotates the hue by ``shift`` turns (in [-0.5, 0.5]) in Pillow's 8-bit HSV space."""
    hue, saturation, value = image.convert("HSV").split()
    channel = np.array(hue, dtype=np.uint8)
    channel += np.uint8(math.trunc(shift * 255) % 256)  # wraps around modulo 256, like the hue circle
    hue = Image.fromarray(channel, "L")
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def color_jitter(
    image: PILImage,
    brightness: float = _JITTER,
    contrast: float = _JITTER,
    saturation: float = _JITTER,
    hue: float = _JITTER,
    generator: torch.Generator | None = None,
) -> PILImage:
    """Changes brightness, contrast and saturation by factors drawn uniformly from
    ``[max(0, 1 - x), 1 + x]`` and shifts the hue by a fraction of a turn drawn from
    ``[-hue, hue]``, the four applied in a random order. Draws random numbers as torchvision's
    ``ColorJitter`` does, so a seeded generator gives torchvision's result."""
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must lie in [0, 0.5], got {hue}")
    order = torch.randperm(4, generator=generator).tolist()
    # all factors are drawn first, in a fixed order, whatever the order of application
    factors = [
        _uniform(max(0.0, 1 - x), 1 + x, generator) if x > 0 else None
        for x in (brightness, contrast, saturation)
    ]
    shift = _uniform(-hue, hue, generator) if hue > 0 else None
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    image = image.convert("RGB")
    for op in order:
        if op < 3 and factors[op] is not None:
            image = enhancers[op](image).enhance(factors[op])
        elif op == 3 and shift is not None:
            image = _adjust_hue(image, shift)
    return image


def train_transform(image: PILImage, size: int, generator: torch.Generator | None = None) -> Tensor:
    """DomainBed's training augmentation: :func:`random_resized_crop` (scale 0.7 to 1), horizontal
    flip with probability 1/2, :func:`color_jitter` (0.3, 0.3, 0.3, 0.3), grayscale with probability
    0.1, then :func:`to_normalized_tensor`. Random numbers come from ``generator`` (torch's global
    generator when ``None``)."""
    image = random_resized_crop(image.convert("RGB"), size, generator=generator)
    if float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT)
    image = color_jitter(image, generator=generator)
    if float(torch.rand(1, generator=generator)) < _GRAYSCALE_P:
        image = image.convert("L").convert("RGB")
    return to_normalized_tensor(image)


# --------------------------------------------------------------------------------------------------
# Environments
# --------------------------------------------------------------------------------------------------


def _visible_subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files below ``folder``, recursively, in torchvision ``ImageFolder``'s order."""
    files = []
    for root, _, names in sorted(os.walk(folder, followlinks=True)):
        files.extend(
            Path(root, name)
            for name in sorted(names)
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        )
    return files


def _open_rgb(path: Path) -> PILImage:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"cannot decode image {path}: {error}") from error


class ImageFolderEnvironment(Dataset):
    """One domain: the images of ``root/<class>/...``, yielding ``(3 x size x size float tensor,
    label)``, the label being the index of the class folder in ``classes``.

    Args:
        root: the domain folder.
        classes: the class folders, in label order; every one must exist in ``root``. ``None``
            takes the sorted subfolders of ``root``.
        image_size: side of the square output images.
        train: read with the training augmentation (:func:`train_transform`) instead of the
            evaluation transform (:func:`eval_transform`).

    Attributes:
        samples: ``(path, label)`` pairs, in ``ImageFolder``'s order.
        targets: the labels of ``samples``.

    Raises:
        DatasetError: ``root`` is missing, or lacks a class folder of ``classes``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        image_size: int = 224,
        train: bool = False,
    ) -> None:
        _require_pillow()
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"domain folder {self.root} does not exist")
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        present = _visible_subfolders(self.root)
        self.classes = list(present if classes is None else classes)
        missing = [c for c in self.classes if c not in present]
        if missing:
            raise DatasetError(f"domain folder {self.root} lacks the class folder(s) {', '.join(missing)}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.samples: list[tuple[Path, int]] = [
            (path, label) for label, c in enumerate(self.classes) for path in _image_files(self.root / c)
        ]
        self.targets = [label for _, label in self.samples]

    def with_transform(self, train: bool) -> ImageFolderEnvironment:
        """A view of the same samples read with the training augmentation (``train=True``) or the
        evaluation transform; no files are scanned again. Returns ``self`` when nothing changes."""
        if bool(train) == self.train:
            return self
        view = copy.copy(self)
        view.train = bool(train)
        return view

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> PILImage:
        """The decoded RGB image of sample ``index``, untransformed.

        Raises:
            DatasetError: the file cannot be decoded (the message names it).
        """
        return _open_rgb(self.samples[index][0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        image = _open_rgb(path)
        if self.train:
            return train_transform(image, self.image_size), label
        return eval_transform(image, self.image_size), label

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (
            f"ImageFolderEnvironment({str(self.root)!r}, {len(self)} images, "
            f"{len(self.classes)} classes, {mode})"
        )


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------


def _first_existing(parent: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    return None


def _dataset_folder_names(name: str) -> list[str]:
    return [_DATASET_FOLDERS[name], name] if name in _DATASET_FOLDERS else [name]


def _domain_folder_names(name: str, domain: str) -> list[str]:
    alias = _DOMAIN_FOLDERS.get((name, domain))
    return [alias, domain] if alias is not None else [domain]


class ImageDataset:
    """A DomainBed image data set read from ``data_dir`` (see the module docstring for the layout).

    Every environment reads with the evaluation transform; :meth:`training_environment` gives the
    view to train on. The constructor checks the whole layout and raises one :class:`DatasetError`
    naming the first problem; :func:`verify` then checks that every image decodes.

    Args:
        name: one of :data:`IMAGE_DATASETS`.
        data_dir: the folder that holds the data set's folder (``PACS/``, ``office_home/``, ...).
        augment: whether :meth:`training_environment` applies DomainBed's augmentation.
        image_size: side of the square images (DomainBed: 224).

    Attributes:
        root: the data set's folder.
        environments: one :class:`ImageFolderEnvironment` per domain (evaluation transform), in the
            canonical order of :data:`IMAGE_DATASETS`.
        env_names: the canonical domain names.
        classes: the class folder names, in label order (sorted).
        num_classes: ``len(classes)``.
        input_shape: ``(3, image_size, image_size)``.

    Raises:
        DatasetError: unknown name, missing data directory, data set folder, domain folder or class
            folder, or a domain or class folder without images.
    """

    def __init__(
        self, name: str, data_dir: str | os.PathLike, augment: bool = False, image_size: int = 224
    ) -> None:
        _require_pillow()
        if name not in IMAGE_DATASETS:
            raise DatasetError(f"unknown image data set {name!r}: use one of {', '.join(IMAGE_DATASETS)}")
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        self.name = name
        self.augment = bool(augment)
        self.image_size = int(image_size)
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DatasetError(f"data directory {data_dir} does not exist (it should hold {name}'s folder)")

        folder_names = _dataset_folder_names(name)
        root = _first_existing(data_dir, folder_names)
        if root is None:
            expected = " or ".join(str(data_dir / n) for n in folder_names)
            hint = ""
            if data_dir.name in folder_names:
                hint = f"; pass the folder that holds {data_dir.name}/, not {data_dir.name} itself"
            raise DatasetError(f"{name} not found: expected the folder {expected}{hint}")
        self.root = root

        domain_dirs: list[Path] = []
        missing_domains = []
        for domain in IMAGE_DATASETS[name]:
            found = _first_existing(root, _domain_folder_names(name, domain))
            if found is None:
                missing_domains.append(" or ".join(str(root / n) for n in _domain_folder_names(name, domain)))
            else:
                domain_dirs.append(found)
        if missing_domains:
            present = ", ".join(_visible_subfolders(root)) or "nothing"
            raise DatasetError(
                f"{name} is incomplete: missing domain folder(s) {'; '.join(missing_domains)} "
                f"({root} holds {present})"
            )

        class_sets = {d: _visible_subfolders(d) for d in domain_dirs}
        classes = sorted(set().union(*class_sets.values()))
        if not classes:
            raise DatasetError(f"{name} has no class folders in its domain folders under {root}")
        for d, present_classes in class_sets.items():
            lacking = [c for c in classes if c not in present_classes]
            if lacking:
                raise DatasetError(
                    f"domain folder {d} lacks the class folder(s) {', '.join(lacking)} that other domains of "
                    f"{name} have"
                )
        self.classes = classes

        self.environments: list[ImageFolderEnvironment] = []
        for d in domain_dirs:
            env = ImageFolderEnvironment(d, classes, self.image_size)
            if len(env) == 0:
                raise DatasetError(
                    f"domain folder {d} holds no images (extensions {' '.join(IMAGE_EXTENSIONS)})"
                )
            counts = np.bincount(env.targets, minlength=len(classes))
            empty = [c for c, n in zip(classes, counts) if n == 0]
            if empty:
                raise DatasetError(f"class folder(s) {', '.join(str(d / c) for c in empty)} hold no images")
            self.environments.append(env)
        self.env_names: list[str] = list(IMAGE_DATASETS[name])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def training_environment(self, i: int) -> ImageFolderEnvironment:
        """The view of environment ``i`` to train on: augmented when the data set was built with
        ``augment=True``, else the environment itself. It shares the sample order, so split indices
        computed on ``environments[i]`` select the same files."""
        return self.environments[i].with_transform(train=self.augment)

    def __len__(self) -> int:
        return len(self.environments)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(e)}" for n, e in zip(self.env_names, self.environments))
        return f"ImageDataset({self.name!r}, root={str(self.root)!r}, {self.num_classes} classes, {sizes})"


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _check_file(path: Path, decode: bool) -> str | None:
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
            else:
                image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        # Pillow reports some broken PNG chunks as SyntaxError.
        return f"{type(error).__name__}: {error}"
    return None


def verify(
    dataset: ImageDataset | ImageFolderEnvironment | Iterable[ImageFolderEnvironment],
    decode: bool = False,
    num_threads: int = 8,
) -> int:
    """Checks that every image of ``dataset`` opens, and raises on the first one (in sample order)
    that does not, so a corrupt file stops a run before it writes any result.

    Args:
        dataset: an :class:`ImageDataset`, one environment, or several.
        decode: decode every image fully (slow; finds truncated files too). By default only the
            header is read and checked with Pillow's ``verify``, which finds files that are not
            images at all and, for PNG, broken chunks.
        num_threads: files checked concurrently (file reading dominates).

    Returns:
        The number of files checked.

    Raises:
        DatasetError: naming the first unreadable file.
    """
    _require_pillow()
    if isinstance(dataset, ImageDataset):
        environments: list[ImageFolderEnvironment] = list(dataset.environments)
    elif isinstance(dataset, ImageFolderEnvironment):
        environments = [dataset]
    else:
        environments = list(dataset)
    paths = [path for env in environments for path, _ in env.samples]
    chunk = 4096  # bounds the number of pending checks
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            problems = (
                pool.map(_check_file, part, [decode] * len(part))
                if num_threads > 1
                else (_check_file(p, decode) for p in part)
            )
            for path, problem in zip(part, problems):  # in sample order
                if problem is not None:
                    raise DatasetError(f"corrupt image file {path}: {problem}")
    return len(paths)
