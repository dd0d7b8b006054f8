"""MultiDigits against a brute-force construction; NYUv2/Cityscapes loaders on generated arrays."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from torchsage.mtl import data as D


@pytest.fixture(scope="module")
def sklearn_digits():
    digits = load_digits()
    return digits.images / 16.0, digits.target


# ---------------------------------------------------------------------------------------------
# MultiDigits
# ---------------------------------------------------------------------------------------------


def test_multi_digits_shapes_and_default_sizes():
    train = D.multi_digits("train")
    x, yl, yr = train.tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert yl.shape == yr.shape == (10000,) and yl.dtype == yr.dtype == torch.int64
    assert set(yl.tolist()) == set(range(10)) and set(yr.tolist()) == set(range(10))
    assert len(D.multi_digits("test")) == 2000
    assert len(D.multi_digits("val", n=17)) == 17
    # normalised: the training pixels have mean about 0 and standard deviation about 1
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05


def test_multi_digits_is_deterministic_and_seeded():
    a = D.multi_digits("test", n=50, seed=3).tensors
    b = D.multi_digits("test", n=50, seed=3).tensors
    c = D.multi_digits("test", n=50, seed=4).tensors
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_digit_sources_index_the_sklearn_digits(sklearn_digits):
    images, target = sklearn_digits
    frames, labels = D.digit_sources()
    assert frames.shape == (1797, 28, 28)
    assert torch.equal(labels, torch.as_tensor(target))
    # MNIST-like frame: a 20x20 box with a 4-pixel empty border
    border = frames.clone()
    border[:, 4:24, 4:24] = 0
    assert border.abs().max() == 0 and 0 <= frames.min() and frames.max() <= 1
    # the 20x20 box is the sklearn digit of the same index, bilinearly upsampled (half-pixel
    # centres, edges clamped): a separable interpolation matrix applied on both sides
    scale = np.zeros((20, 8))
    for i in range(20):
        src = max((i + 0.5) * 8 / 20 - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1, w = min(i0 + 1, 7), src - i0
        scale[i, i0] += 1 - w
        scale[i, i1] += w
    expected = np.einsum("ik,nkl,jl->nij", scale, images, scale)
    np.testing.assert_allclose(frames[:, 4:24, 4:24].numpy(), expected, atol=1e-6)


def test_overlay_matches_brute_force_placement():
    gen = torch.Generator().manual_seed(1)
    left, right = torch.rand(3, 28, 28, generator=gen), torch.rand(3, 28, 28, generator=gen)
    canvas = D.overlay(left, right).numpy()
    expected = np.zeros((3, 36, 36), dtype=np.float32)
    for b in range(3):
        for r in range(36):
            for c in range(36):
                values = [0.0]
                if r < 28 and c < 28:
                    values.append(float(left[b, r, c]))
                if 6 <= r < 34 and 6 <= c < 34:
                    values.append(float(right[b, r - 6, c - 6]))
                expected[b, r, c] = max(values)
    np.testing.assert_array_equal(canvas, expected)


def test_multi_digits_images_are_the_two_labelled_digits_overlaid(sklearn_digits):
    _, target = sklearn_digits
    n = 40
    x, yl, yr = D.multi_digits("train", seed=2, n=n).tensors
    left, right = D.multi_digits_pairs("train", seed=2, n=n)
    assert torch.equal(yl, torch.as_tensor(target)[left]) and torch.equal(yr, torch.as_tensor(target)[right])
    frames, _ = D.digit_sources()
    for i in range(n):
        canvas = torch.zeros(36, 36)
        canvas[0:28, 0:28] = frames[left[i]]
        canvas[6:34, 6:34] = torch.maximum(canvas[6:34, 6:34], frames[right[i]])
        resized = F.interpolate(canvas[None, None], size=(28, 28), mode="bilinear", antialias=True)[0]
        restored = x[i] * D.MULTI_DIGITS_STD + D.MULTI_DIGITS_MEAN
        torch.testing.assert_close(restored, resized.clamp(0, 1), atol=1e-5, rtol=0)


def test_splits_draw_disjoint_source_digits():
    used = {}
    for split in ("train", "val", "test"):
        left, right = D.multi_digits_pairs(split, n=20000)
        used[split] = set(left.tolist()) | set(right.tolist())
    assert not used["train"] & used["test"]
    assert not used["train"] & used["val"]
    assert not used["val"] & used["test"]
    # with 20000 draws every reserved digit is used: the three parts cover the 1797 digits
    assert len(used["train"] | used["val"] | used["test"]) == 1797
    assert len(used["test"]) == round(0.2 * 1797)


def test_multi_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        D.multi_digits("validation")
    with pytest.raises(ValueError, match="n must"):
        D.multi_digits("train", n=0)


# ---------------------------------------------------------------------------------------------
# NYUv2 / Cityscapes
# ---------------------------------------------------------------------------------------------


def test_nyuv2_items_match_the_arrays(tmp_path):
    root = D.write_fake_nyuv2(tmp_path / "nyu", n=3, size=(32, 48))
    ds = D.NYUv2(root, "train")
    assert len(ds) == 3
    image, targets = ds[1]
    assert set(targets) == {"segmentation", "depth", "normal"}
    assert image.shape == (3, 32, 48) and image.dtype == torch.float32
    seg, depth, normal = targets["segmentation"], targets["depth"], targets["normal"]
    assert seg.shape == (32, 48) and seg.dtype == torch.int64
    assert depth.shape == (1, 32, 48) and normal.shape == (3, 32, 48)
    raw = {k: np.load(root / "train" / k / "1.npy") for k in ("image", "label", "depth", "normal")}
    np.testing.assert_array_equal(image.numpy(), raw["image"].transpose(2, 0, 1))
    np.testing.assert_array_equal(seg.numpy(), raw["label"].astype(np.int64))
    np.testing.assert_array_equal(depth.numpy(), raw["depth"].transpose(2, 0, 1))
    np.testing.assert_array_equal(normal.numpy(), raw["normal"].transpose(2, 0, 1))
    assert (seg == -1).any() and seg.min() >= -1 and seg.max() < 13
    assert (depth == 0).any()
    assert len(D.NYUv2(root, "val")) == 3 and len(D.NYUv2(root, "test")) == 3


def test_loader_batches_dict_targets(tmp_path):
    root = D.write_fake_nyuv2(tmp_path, n=4)
    image, targets = next(iter(DataLoader(D.NYUv2(root, augment=True), batch_size=2)))
    assert image.shape == (2, 3, 32, 48)
    assert targets["segmentation"].shape == (2, 32, 48) and targets["normal"].shape == (2, 3, 32, 48)


def test_cityscapes_uses_label_7_and_has_no_normals(tmp_path):
    root = D.write_fake_cityscapes(tmp_path / "cs", n=2, size=(32, 64))
    assert (root / "train" / "label_7").is_dir()
    image, targets = D.Cityscapes(root)[0]
    assert set(targets) == {"segmentation", "depth"} and image.shape == (3, 32, 64)
    assert targets["segmentation"].max() < 7
    # the plain label/ folder is accepted as well
    (root / "train" / "label_7").rename(root / "train" / "label")
    assert D.Cityscapes(root)[0][1]["segmentation"].shape == (32, 64)
    for path in (root / "val" / "label_7").iterdir():
        path.unlink()
    (root / "val" / "label_7").rmdir()
    with pytest.raises(FileNotFoundError, match=r"label_7 or .*val.label\b"):
        D.Cityscapes(root, "val")


def test_depth_without_channel_axis(tmp_path):
    root = D.write_fake_cityscapes(tmp_path, n=1)
    path = root / "train" / "depth" / "0.npy"
    np.save(path, np.load(path)[..., 0])
    assert D.Cityscapes(root)[0][1]["depth"].shape == (1, 32, 48)


def test_missing_data_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.NYUv2(tmp_path / "nowhere")
    root = D.write_fake_nyuv2(tmp_path / "nyu", n=3)
    with pytest.raises(FileNotFoundError, match=r"split folder not found: .*nyu.*train"):
        D.NYUv2(root / "val")  # a root without train/
    for path in (root / "train" / "normal").iterdir():
        path.unlink()
    (root / "train" / "normal").rmdir()
    with pytest.raises(FileNotFoundError, match=r"train.normal"):
        D.NYUv2(root, "train")
    (root / "val" / "label" / "2.npy").unlink()
    ds = D.NYUv2(root, "val")
    ds[1]
    with pytest.raises(FileNotFoundError, match=r"val.label.2\.npy"):
        ds[2]
    for path in (root / "val" / "image").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="empty"):
        D.NYUv2(root, "val")
    with pytest.raises(ValueError, match="split"):
        D.NYUv2(root, "dev")


def test_random_scale_crop_is_a_zoomed_window():
    h, w = 32, 48
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=gen)
    label = torch.randint(-1, 13, (h, w), generator=gen)
    depth = torch.rand(1, h, w, generator=gen) + 0.5
    normal = F.normalize(torch.randn(3, h, w, generator=gen), dim=0)
    targets = {"segmentation": label, "depth": depth, "normal": normal}
    same_image, same = D.random_scale_crop(image, targets, scales=(1.0,))
    torch.testing.assert_close(same_image, image)
    assert torch.equal(same["segmentation"], label) and torch.equal(same["depth"], depth)
    # scale 2: a 16x24 window, every pixel repeated 2x2 by nearest resizing, depth halved
    _, out = D.random_scale_crop(image, targets, scales=(2.0,))
    sub_label, sub_depth = out["segmentation"][::2, ::2], out["depth"][:, ::2, ::2]
    matches = [
        (top, left)
        for top in range(h - 16 + 1)
        for left in range(w - 24 + 1)
        if torch.equal(sub_label, label[top : top + 16, left : left + 24])
    ]
    assert len(matches) == 1
    top, left = matches[0]
    torch.testing.assert_close(sub_depth, depth[:, top : top + 16, left : left + 24] / 2)
    assert torch.equal(out["segmentation"][1::2, 1::2], sub_label)


def test_horizontal_flip_negates_normal_x():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    normal = torch.randn(3, 3, 4)
    before = normal.clone()
    flipped_image, out = D.horizontal_flip(image, {"normal": normal, "segmentation": torch.ones(3, 4)})
    assert torch.equal(flipped_image[:, :, 0], image[:, :, 3])
    assert torch.equal(out["normal"][0, :, 0], -normal[0, :, 3])
    assert torch.equal(out["normal"][1:, :, 0], normal[1:, :, 3])
    assert torch.equal(normal, before)  # the input is left alone
