"""ImageNet-pretrained backbones (``pretrained: "imagenet"``, the image sets' default): read from
torch's cache, fetched into it when missing, a local file first; one clear line when neither works.

Nothing here downloads: torch's cache is a temporary folder, torchvision is a small stand-in with
the same names (the installed one need not import), and the download is replaced by a function
that writes a state dict the test made, or raises as a machine without network does.
"""

from __future__ import annotations

import json
import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from torchsage.cli import main
from torchsage.dg.hparams import default_hparams
from torchsage.dg.resnet import ResNetFeaturizer, imagenet_weights_file

URLS = {  # torchvision's published IMAGENET1K_V1 files, which the stand-in names as torchvision does
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


class _TinyResNet(nn.Module):
    def __init__(self, weights: object = None) -> None:
        super().__init__()
        assert weights is None  # torchsage loads the weights itself
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


def _weights_enum(url: str) -> type:
    return type("Weights", (), {"IMAGENET1K_V1": types.SimpleNamespace(url=url)})


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A stand-in torchvision, an empty torch cache under tmp_path, and a download that fails
    unless a test gives it a file to deliver. Returns the download's log and settings."""
    package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.resnet18 = models.resnet50 = _TinyResNet  # type: ignore[attr-defined]
    models.ResNet18_Weights = _weights_enum(URLS["resnet18"])  # type: ignore[attr-defined]
    models.ResNet50_Weights = _weights_enum(URLS["resnet50"])  # type: ignore[attr-defined]
    package.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    state: dict = {"calls": [], "deliver": None}

    def download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        state["calls"].append((url, dst, hash_prefix))
        if state["deliver"] is None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        torch.save(state["deliver"], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return state


def _source() -> _TinyResNet:
    source = _TinyResNet()
    nn.init.normal_(source.conv1.weight)
    nn.init.normal_(source.bn1.running_mean)
    return source


def _cache(tmp_path: Path, arch: str) -> Path:
    return tmp_path / "torch_home" / "hub" / "checkpoints" / URLS[arch].rsplit("/", 1)[-1]


def test_weights_in_torch_cache_are_read_without_a_download(hub, tmp_path):
    source = _source()
    cached = _cache(tmp_path, "resnet50")
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    model = ResNetFeaturizer("resnet50", pretrained="imagenet")
    assert hub["calls"] == [] and model.weights_path == str(cached)
    torch.testing.assert_close(model.network.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.network.bn1.running_mean, source.bn1.running_mean)


def test_missing_weights_are_fetched_into_torch_cache_once(hub, tmp_path):
    source = _source()
    hub["deliver"] = source.state_dict()
    model = ResNetFeaturizer("resnet18", pretrained="imagenet")
    target = _cache(tmp_path, "resnet18")
    # torchvision's URL, into torch's cache, checked against the hash prefix in the file name
    assert hub["calls"] == [(URLS["resnet18"], str(target), "f37072fd")]
    assert target.is_file()
    torch.testing.assert_close(model.network.conv1.weight, source.conv1.weight)
    ResNetFeaturizer("resnet18", pretrained="imagenet")
    assert len(hub["calls"]) == 1  # the second backbone reads the cache


def test_without_network_one_line_says_how_to_provide_the_file(hub, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ResNetFeaturizer("resnet50", pretrained="imagenet")
    message = str(info.value)
    target = _cache(tmp_path, "resnet50")
    assert "\n" not in message
    assert "Temporary failure in name resolution" in message
    assert f"download {URLS['resnet50']} to {target}" in message
    assert '"pretrained_path": "/path/resnet50-0676ba61.pth"' in message
    assert not target.exists()  # nothing half-written in the cache


def test_a_local_file_comes_first_and_null_trains_from_scratch(hub, tmp_path):
    source = _source()
    path = tmp_path / "mine.pt"
    torch.save(source.state_dict(), path)
    model = ResNetFeaturizer("resnet18", weights_path=path, pretrained="imagenet")
    torch.testing.assert_close(model.network.conv1.weight, source.conv1.weight)
    scratch = ResNetFeaturizer("resnet18", pretrained=None)
    assert hub["calls"] == [] and scratch.weights_path is None
    assert not torch.equal(scratch.network.conv1.weight, source.conv1.weight)
    with pytest.raises(ValueError, match='pretrained must be "imagenet" or null'):
        ResNetFeaturizer("resnet18", pretrained="imagenet21k")
    with pytest.raises(ValueError, match="unknown ResNet"):
        imagenet_weights_file("resnet34")


def test_image_sets_default_to_imagenet_weights():
    assert default_hparams("ERM", "PACS")["pretrained"] == "imagenet"
    assert default_hparams("SAGE", "DomainNet")["pretrained"] == "imagenet"
    assert "pretrained" not in default_hparams("ERM", "RotatedDigits")  # DomainBed's MNIST CNN: scratch


def test_dg_train_without_network_or_file_stops_with_one_line(hub, tmp_path, capsys):
    from test_train import tiny_pacs  # tests/dg is on the path (a dependency ships a package named tests)

    tiny_pacs(tmp_path / "data")
    out = tmp_path / "run"
    hparams = {"backbone": "resnet18", "batch_size": 4, "image_size": 12}
    argv = ["dg", "train", "--dataset", "PACS", "--algorithm", "ERM", "--test-envs", "0"]
    argv += ["--data-dir", str(tmp_path / "data"), "--output-dir", str(out), "--no-progress"]
    assert main([*argv, "--hparams", json.dumps(hparams)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ImageNet weights of resnet18" in lines[0] and "pretrained_path" in lines[0]
    assert not (out / "results.jsonl").exists()
    # with the file delivered, the same command trains from it
    hub["deliver"] = _source().state_dict()
    code = main([*argv, "--steps", "1", "--num-workers", "0", "--hparams", json.dumps(hparams)])
    assert code == 0 and (out / "done").exists()
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["hparams"]["pretrained"] == "imagenet"
