"""The DomainBed image data sets read from disk (tiny folders made with Pillow) and the ResNet
featurizer (its logic on a stand-in torchvision; the real one where it is installed)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

Image = pytest.importorskip("PIL.Image")

from torchsage.dg.images import (  # noqa: E402
    IMAGE_DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    ImageDataset,
    ImageFolderEnvironment,
    _adjust_hue,
    color_jitter,
    eval_transform,
    train_transform,
    verify,
)
from torchsage.dg.resnet import ResNetFeaturizer  # noqa: E402

CLASSES = ("dog", "guitar")
SIZE = 16


def make_dataset(
    data_dir: Path,
    name: str = "PACS",
    folder: str | None = None,
    domain_folders: dict[str, str] | None = None,
    images: int = 3,
    seed: int = 0,
) -> Path:
    """Writes ``data_dir/<folder>/<domain>/<class>/img{k}.{png,jpg}``: 12x12 RGB noise, PNG and JPEG
    alternating. Domains are written in reverse order, so nothing relies on the listing order."""
    rng = np.random.default_rng(seed)
    root = data_dir / (folder or name)
    for domain in reversed(IMAGE_DATASETS[name]):
        for c in CLASSES:
            target = root / (domain_folders or {}).get(domain, domain) / c
            target.mkdir(parents=True)
            for k in range(images):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(target / f"img{k}.{'jpg' if k % 2 else 'png'}")
    return root


@pytest.fixture
def pacs(tmp_path: Path) -> Path:
    make_dataset(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def test_pacs_loads_in_canonical_order_with_labels_of_the_class_folders(pacs: Path) -> None:
    (pacs / "PACS" / "extra_domain" / "dog").mkdir(parents=True)  # not a PACS domain: ignored
    data = ImageDataset("PACS", pacs, augment=False, image_size=SIZE)
    assert data.env_names == ["art_painting", "cartoon", "photo", "sketch"]
    assert [env.root.name for env in data.environments] == data.env_names
    assert data.classes == list(CLASSES) and data.num_classes == 2
    assert data.input_shape == (3, SIZE, SIZE)
    assert len(data) == 4
    for env in data.environments:
        assert len(env) == 6
        assert [label for _, label in env.samples] == [0, 0, 0, 1, 1, 1]
        assert [path.parent.name for path, _ in env.samples] == ["dog"] * 3 + ["guitar"] * 3
        assert [path.suffix for path, _ in env.samples[:3]] == [".png", ".jpg", ".png"]
        for i in range(len(env)):
            x, y = env[i]
            assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
            assert y == env.samples[i][1] and CLASSES[y] == env.samples[i][0].parent.name
    assert verify(data) == 24


def test_eval_transform_of_a_constant_colour_is_the_normalised_colour(pacs: Path) -> None:
    colour = (200, 100, 50)
    path = pacs / "PACS" / "photo" / "guitar" / "img0.png"
    Image.new("RGB", (12, 12), colour).save(path)
    env = ImageDataset("PACS", pacs, augment=True, image_size=SIZE).environments[2]
    index = [p for p, _ in env.samples].index(path)
    x, y = env[index]
    assert y == 1
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(x, expected.view(3, 1, 1).expand(3, SIZE, SIZE), atol=1e-6, rtol=0)
    # e.g. red: (200/255 - 0.485) / 0.229 = 1.3070...
    assert x[0, 0, 0].item() == pytest.approx(1.30702, abs=1e-4)
    # a non-square image is stretched to a square, as DomainBed's Resize((224, 224))
    assert eval_transform(Image.new("RGB", (30, 7), colour), SIZE).shape == (3, SIZE, SIZE)


def test_augmentation_applies_to_training_views_only_and_is_reproducible(pacs: Path) -> None:
    data = ImageDataset("PACS", pacs, augment=True, image_size=SIZE)
    env = data.environments[0]
    view = data.training_environment(0)
    assert not env.train and view.train and view.samples is env.samples
    assert view.with_transform(train=False).train is False and env.with_transform(train=False) is env
    clean, label = env[1]
    torch.manual_seed(0)
    first = [view[i][0] for i in range(len(view))]
    torch.manual_seed(0)
    again = [view[i][0] for i in range(len(view))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[1].shape == clean.shape == (3, SIZE, SIZE)
    assert view[1][1] == label
    assert not torch.allclose(first[1], clean, atol=1e-3)
    torch.manual_seed(1)
    assert not all(torch.equal(a, view[i][0]) for i, a in enumerate(first))
    # without augment the training view is the evaluation one
    plain = ImageDataset("PACS", pacs, augment=False, image_size=SIZE)
    assert plain.training_environment(0) is plain.environments[0]


def test_augmentation_is_reproducible_through_dataloader_workers(pacs: Path) -> None:
    view = ImageDataset("PACS", pacs, augment=True, image_size=SIZE).training_environment(3)

    def epoch() -> torch.Tensor:
        torch.manual_seed(5)
        return torch.cat([x for x, _ in DataLoader(view, batch_size=3, num_workers=2)])

    torch.testing.assert_close(epoch(), epoch(), atol=0, rtol=0)


def test_transform_pieces() -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8), "RGB")
    # no jitter at all is the identity
    assert np.array_equal(np.array(color_jitter(image, 0, 0, 0, 0)), np.array(image))
    # hue shifts turn the colour wheel (up to Pillow's 8-bit HSV rounding): red to green and cyan
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert np.array(_adjust_hue(red, 1 / 3))[0, 0].tolist() == [0, 255, 0]
    assert np.abs(np.array(_adjust_hue(red, 0.5))[0, 0].astype(int) - [0, 255, 255]).max() <= 3
    assert np.array(_adjust_hue(red, 0.0))[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match="hue"):
        color_jitter(image, hue=0.6)
    a = train_transform(image, 8, generator=torch.Generator().manual_seed(3))
    b = train_transform(image, 8, generator=torch.Generator().manual_seed(3))
    assert a.shape == (3, 8, 8) and torch.equal(a, b)


@pytest.mark.parametrize(
    ("folder", "real_world"), [("office_home", "Real World"), ("OfficeHome", "Real_World")]
)
def test_office_home_accepts_domainbeds_and_the_canonical_folder_names(
    tmp_path: Path, folder: str, real_world: str
) -> None:
    make_dataset(tmp_path, "OfficeHome", folder=folder, domain_folders={"Real_World": real_world}, images=1)
    data = ImageDataset("OfficeHome", tmp_path, image_size=SIZE)
    assert data.root == tmp_path / folder
    assert data.env_names == ["Art", "Clipart", "Product", "Real_World"]
    assert data.environments[3].root.name == real_world
    assert data.environments[3][0][0].shape == (3, SIZE, SIZE)


def test_standalone_environment_takes_its_own_class_folders(pacs: Path) -> None:
    env = ImageFolderEnvironment(pacs / "PACS" / "sketch", image_size=8)
    assert env.classes == list(CLASSES) and len(env) == 6 and env[5][0].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="zebra"):
        ImageFolderEnvironment(pacs / "PACS" / "sketch", classes=["dog", "zebra"])


# ---------------------------------------------------------------------------------------------------
# Errors: one DatasetError naming the problem
# ---------------------------------------------------------------------------------------------------


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def test_missing_data_dir_and_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"data directory .*nowhere"):
        ImageDataset("PACS", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=str(tmp_path / "PACS")):
        ImageDataset("PACS", tmp_path)
    with pytest.raises(DatasetError) as info:
        ImageDataset("DomainNet", tmp_path)
    assert str(tmp_path / "domain_net") in str(info.value) and str(tmp_path / "DomainNet") in str(info.value)
    make_dataset(tmp_path, images=1)
    with pytest.raises(DatasetError, match="not PACS itself"):
        ImageDataset("PACS", tmp_path / "PACS")
    with pytest.raises(DatasetError, match="unknown image data set"):
        ImageDataset("MNIST", tmp_path)
    assert issubclass(DatasetError, ValueError)


def test_missing_domain_folder(pacs: Path) -> None:
    _remove_tree(pacs / "PACS" / "sketch")
    with pytest.raises(DatasetError, match=r"missing domain folder.*sketch"):
        ImageDataset("PACS", pacs)


def test_missing_class_folder(pacs: Path) -> None:
    _remove_tree(pacs / "PACS" / "cartoon" / "guitar")
    with pytest.raises(DatasetError, match=r"cartoon lacks the class folder\(s\) guitar"):
        ImageDataset("PACS", pacs)


def test_domain_or_class_without_images(pacs: Path) -> None:
    for f in (pacs / "PACS" / "photo" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"photo/dog hold no images"):
        ImageDataset("PACS", pacs)
    for f in (pacs / "PACS" / "photo" / "guitar").iterdir():
        f.unlink()
    (pacs / "PACS" / "photo" / "guitar" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"domain folder .*photo holds no images"):
        ImageDataset("PACS", pacs)


def test_corrupt_image_is_found_by_verify_and_by_getitem(pacs: Path) -> None:
    bad = pacs / "PACS" / "cartoon" / "guitar" / "img1.jpg"
    bad.write_bytes(b"this is not a JPEG file at all" * 10)
    data = ImageDataset("PACS", pacs, image_size=SIZE)
    for decode in (False, True):
        with pytest.raises(DatasetError, match=f"corrupt image file {bad}"):
            verify(data, decode=decode)
    with pytest.raises(DatasetError, match=str(bad)):
        verify(data.environments[1], num_threads=1)
    assert verify(data.environments[0]) == 6  # the other domains are fine
    env = data.environments[1]
    index = [p for p, _ in env.samples].index(bad)
    env[index - 1]  # its neighbours still load
    with pytest.raises(DatasetError, match=f"cannot decode image {bad}"):
        env[index]
    with pytest.raises(DatasetError, match=str(bad)):
        data.training_environment(1)[index]


def test_truncated_image_is_found_when_decoding(pacs: Path) -> None:
    path = pacs / "PACS" / "art_painting" / "dog" / "img0.png"
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    data = ImageDataset("PACS", pacs, image_size=SIZE)
    with pytest.raises(DatasetError, match=str(path)):
        verify(data, decode=True)
    with pytest.raises(DatasetError, match=str(path)):
        data.environments[0][0]


# ---------------------------------------------------------------------------------------------------
# ResNet featurizer
# ---------------------------------------------------------------------------------------------------


def test_resnet_without_torchvision_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ImportError) as info:
        ResNetFeaturizer("resnet18")
    assert str(info.value) == "ResNet backbones need torchvision: pip install 'torchsage[vision]'"
    with pytest.raises(ValueError, match="unknown ResNet"):
        ResNetFeaturizer("resnet34")
    with pytest.raises(ValueError, match="dropout"):
        ResNetFeaturizer("resnet18", dropout=1.0)


def test_resnet_with_a_torchvision_for_another_torch_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # what PyPI's torchvision does beside the CPU build of torch: it raises RuntimeError on import
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"does not import beside torch .*torchvision::nms.*same index"):
        ResNetFeaturizer("resnet18")


class _TinyResNet(nn.Module):
    """Stands in for a torchvision ResNet: conv, BatchNorm, pooling and an ``fc``."""

    def __init__(self, weights: object = None) -> None:
        super().__init__()
        assert weights is None
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.resnet18 = models.resnet50 = _TinyResNet  # type: ignore[attr-defined]
    package.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)


def test_resnet_logic_on_a_stand_in_torchvision(fake_torchvision: None, tmp_path: Path) -> None:
    model = ResNetFeaturizer("resnet18", freeze_bn=True, dropout=0.5)
    assert model.n_outputs == 4 and isinstance(model.network.fc, nn.Identity)
    assert model.training and not model.network.bn1.training and model.dropout.training
    before = model.network.bn1.running_mean.clone()
    model(torch.randn(4, 3, 8, 8))
    assert torch.equal(model.network.bn1.running_mean, before)  # frozen statistics
    model.eval()
    assert not model.dropout.training
    torch.testing.assert_close(model(torch.ones(2, 3, 8, 8)), model(torch.ones(2, 3, 8, 8)))
    model.train()
    assert not model.network.bn1.training
    assert ResNetFeaturizer("resnet18", freeze_bn=False).network.bn1.training

    # weights: fc ignored, DDP's "module." prefix removed, keys checked strictly
    source = _TinyResNet()
    nn.init.normal_(source.conv1.weight)
    path = tmp_path / "weights.pt"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    loaded = ResNetFeaturizer("resnet50", weights_path=path)
    torch.testing.assert_close(loaded.network.conv1.weight, source.conv1.weight)
    # without BatchNorm's counter, as torchvision's ImageNet files: the network keeps its own
    torch.save({k: v for k, v in source.state_dict().items() if "num_batches" not in k}, path)
    assert int(ResNetFeaturizer("resnet18", weights_path=path).network.bn1.num_batches_tracked) == 0
    incomplete = {k: v for k, v in source.state_dict().items() if k != "bn1.running_var"}
    torch.save({"state_dict": {**incomplete, "layer9.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=r"missing: bn1.running_var; unexpected: layer9.weight"):
        ResNetFeaturizer("resnet18", weights_path=path)
    torch.save({**source.state_dict(), "conv1.weight": torch.zeros(2, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match=r"wrong shape: conv1.weight"):
        ResNetFeaturizer("resnet18", weights_path=path)
    with pytest.raises(FileNotFoundError, match="pretrained_path to an existing state_dict file"):
        ResNetFeaturizer("resnet18", weights_path=tmp_path / "absent.pt")


@pytest.mark.torchvision
def test_resnet18_with_torchvision(tmp_path: Path, real_torchvision) -> None:
    models = real_torchvision.models
    source = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)  # with fc, as torchvision ships it
    model = ResNetFeaturizer("resnet18", weights_path=path, freeze_bn=True)
    assert model.n_outputs == 512
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    source.fc = nn.Identity()
    source.eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source(x))


@pytest.mark.torchvision
def test_transforms_match_torchvisions_under_the_same_seed(real_torchvision) -> None:
    transforms = real_torchvision.transforms
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    reference_eval = transforms.Compose([transforms.Resize((SIZE, SIZE)), *normalize])
    reference_train = transforms.Compose(
        [
            transforms.RandomResizedCrop(SIZE, scale=(0.7, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.3, 0.3, 0.3, 0.3),
            transforms.RandomGrayscale(),
            *normalize,
        ]
    )
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    torch.testing.assert_close(eval_transform(image, SIZE), reference_eval(image), atol=1e-6, rtol=0)
    for seed in range(20):
        torch.manual_seed(seed)
        ours = train_transform(image, SIZE)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, reference_train(image), atol=1e-6, rtol=0)
