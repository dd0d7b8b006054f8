"""docs/finetuning.md's example where torchvision is not installed: the docs test skips that page
then, so this runs its code with a small stand-in for ``torchvision.models`` (a ResNet-shaped module
with a ``fc`` head). Where torchvision is installed this test skips and the docs test runs the page
with the real ResNet-18."""

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="the docs test runs it")
def test_finetuning_example_runs_with_a_stand_in_backbone(monkeypatch, tmp_path, capsys):
    models = types.SimpleNamespace(
        resnet18=_resnet18, ResNet18_Weights=types.SimpleNamespace(DEFAULT="imagenet")
    )
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), re.S | re.M):
        exec(compile(block, PAGE.name, "exec"), namespace)
    info, backbone = namespace["info"], namespace["backbone"]
    assert set(info.names) == {"photo", "painting", "sketch"} and info.disagreement > 0
    bn = backbone.body[1]
    assert int(bn.num_batches_tracked) == 5  # 5 batches: running statistics updated on the clean pass only
    assert "photo" in capsys.readouterr().out
