"""A tiny EmojiStylesPip for the tests (the ``tiny_emoji`` fixture of tests/conftest.py): three
sources drawn here (a folder of PNGs and two fonts of boxes and triangles), 2 classes x 5 emoji
in each of the three styles at 32 px, so no test needs the real emoji packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from _tiny_font import outline_font


def _png_folder(folder: Path, sizes: dict[int, tuple[int, int]]) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for point, (w, h) in sizes.items():
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        ImageDraw.Draw(image).ellipse(
            ((64 - w) // 2, (64 - h) // 2, (64 + w) // 2, (64 + h) // 2), fill="teal"
        )
        image.save(folder / f"{point:x}.png")
    return folder


def _font(path: Path, points: list[int], shape: str) -> Path:
    """Each emoji a box or a triangle of a different height."""
    outlines = {}
    for i, p in enumerate(points, start=1):
        top = 300 + 60 * i
        box = [(100, 0), (700, 0), (700, top), (100, top)]
        outlines[p] = box if shape == "box" else [(100, 0), (700, 0), (400, top)]
    return outline_font(path, outlines, family=f"Tiny{shape}")


def use_tiny_emoji(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Makes ``EmojiStylesPip`` the tiny set (for the test's duration) and returns the data directory
    to pass as ``data_dir``."""
    pytest.importorskip("fontTools")
    from torchsage.dg import datasets
    from torchsage.dg.emoji import build_emoji_styles, load_emoji_styles

    points = list(range(0x1F400, 0x1F40A))
    catalogue = [(p, "animal-mammal" if i % 2 else "animal-bird", f"emoji {i}") for i, p in enumerate(points)]
    sources = {
        "twemoji": _png_folder(tmp_path / "png", {p: (20 + 4 * i, 60 - 3 * i) for i, p in enumerate(points)}),
        "openmoji": _font(tmp_path / "box.ttf", points, "box"),
        "notoemoji": _font(tmp_path / "tri.ttf", points, "triangle"),
    }
    cache = tmp_path / "cache"

    def emoji_data(styles: tuple[str, ...], data_dir: str | None):
        assert data_dir == str(cache)
        path = build_emoji_styles(
            styles, data_dir, sources=sources, catalogue=catalogue, num_classes=2, min_per_class=2, size=32
        )
        return load_emoji_styles(path)

    monkeypatch.setattr(datasets, "_emoji_data", emoji_data)
    return str(cache)
