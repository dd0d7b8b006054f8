"""docs/finetuning.md's example. Where torchvision does not import (``make test``: the docs test
skips the page then) it runs with a small stand-in for ``torchvision.models`` (a ResNet-shaped
module with a ``fc`` head); with the real torchvision (``make test-vision``) it runs as written,
with torchvision's ResNet-18, and once more with ``PRETRAINED = True``, the ImageNet weights being
a file the test writes into torch's cache where torchvision looks for them."""

import re
import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torch

from torchvision_support import IMAGENET_FILES, imagenet_like_state, require_torchvision, torchvision_error

PAGE = Path(__file__).resolve().parents[2] / "docs" / "finetuning.md"


class _TinyResNet(torch.nn.Module):
    """What the example uses of a torchvision ResNet: BatchNorm layers, ``fc`` with in_features."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(8, 1000)

    def forward(self, x):
        return self.fc(self.body(x))


def _resnet18(weights=None):
    assert weights is None, "the example must not ask for downloaded weights in tests"
    return _TinyResNet()


def run_page(tmp_path, monkeypatch, edit=lambda code: code) -> dict:
    """Runs the page's python blocks in one namespace (``edit`` may change the code first)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M):
        exec(compile(edit(block), PAGE.name, "exec"), namespace)
    return namespace


@pytest.mark.skipif(torchvision_error() is None, reason="torchvision imports: the tests below run the page")
def test_finetuning_example_runs_with_a_stand_in_backbone(monkeypatch, tmp_path, capsys):
    models = types.SimpleNamespace(
        resnet18=_resnet18, ResNet18_Weights=types.SimpleNamespace(DEFAULT="imagenet")
    )
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
    namespace = run_page(tmp_path, monkeypatch)
    info, backbone = namespace["info"], namespace["backbone"]
    assert set(info.names) == {"photo", "painting", "sketch"} and info.disagreement > 0
    bn = backbone.body[1]
    assert int(bn.num_batches_tracked) == 5  # 5 batches: running statistics updated on the clean pass only
    assert "photo" in capsys.readouterr().out


@pytest.mark.torchvision
def test_finetuning_example_runs_as_written_with_torchvisions_resnet18(monkeypatch, tmp_path, capsys):
    torchvision = require_torchvision()
    namespace = run_page(tmp_path, monkeypatch)
    info, backbone = namespace["info"], namespace["backbone"]
    assert isinstance(backbone, torchvision.models.ResNet) and backbone.fc.out_features == 4
    assert set(info.names) == {"photo", "painting", "sketch"} and info.disagreement > 0
    # 5 batches of 12 from 60 images: every BatchNorm counted the clean passes only
    counters = {int(m.num_batches_tracked) for m in backbone.modules() if hasattr(m, "num_batches_tracked")}
    assert counters == {5}
    assert "photo" in capsys.readouterr().out


@pytest.mark.torchvision
def test_finetuning_example_starts_from_imagenet_weights_in_torchs_cache(monkeypatch, tmp_path):
    torchvision = require_torchvision()
    state = imagenet_like_state(torchvision, "resnet18")
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / IMAGENET_FILES["resnet18"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in the tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    built = []  # the backbone's weights as torchvision's resnet18 returns it, before fine-tuning
    resnet18 = torchvision.models.resnet18

    def recording_resnet18(*args, **kwargs):
        network = resnet18(*args, **kwargs)
        built.append({k: v.clone() for k, v in network.state_dict().items()})
        return network

    monkeypatch.setattr(torchvision.models, "resnet18", recording_resnet18)
    code = "PRETRAINED = False\n"
    assert code in PAGE.read_text()
    run_page(tmp_path, monkeypatch, lambda block: block.replace(code, "PRETRAINED = True\n"))
    (weights,) = built
    for key, value in state.items():
        assert torch.equal(weights[key], value), key
