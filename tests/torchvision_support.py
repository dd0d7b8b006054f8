"""What the tests marked ``torchvision`` share: the import of the real torchvision, which skips them
where it does not import (``make test``'s CPU build of torch cannot load PyPI's torchvision) and
fails them under ``make test-vision``, which sets ``TORCHSAGE_REQUIRE_TORCHVISION=1`` so that a
broken install cannot pass as a run of skips."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

REQUIRED = "TORCHSAGE_REQUIRE_TORCHVISION"
# torchvision's IMAGENET1K_V1 files (what DomainBed's pretrained=True loads), named in torch's cache
# after their URL: written here independently of the code under test
IMAGENET_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}


def torchvision_error() -> BaseException | None:
    """Why torchvision does not import here, or None when it does. A torchvision built for
    another torch raises RuntimeError (``operator torchvision::nms does not exist``), not ImportError."""
    try:
        importlib.import_module("torchvision")
    except Exception as error:
        return error
    return None


def require_torchvision() -> ModuleType:
    """The real torchvision; skips the calling module where it does not import, or raises under
    ``TORCHSAGE_REQUIRE_TORCHVISION=1``."""
    error = torchvision_error()
    if error is not None:
        if os.environ.get(REQUIRED) == "1":
            raise RuntimeError(f"{REQUIRED}=1 but torchvision does not import: {error}") from error
        pytest.skip(
            f"torchvision does not import here ({type(error).__name__}: {error}); "
            "make test-vision runs these",
            allow_module_level=True,
        )
    return importlib.import_module("torchvision")


def imagenet_like_state(torchvision: ModuleType, arch: str) -> dict[str, torch.Tensor]:
    """A state dict laid out as torchvision's ImageNet file: every tensor of the network, the
    1000-class ``fc`` included, but no BatchNorm ``num_batches_tracked`` (those files are re-saved
    copies of 2017 files, older than the counter). Values are random, the running statistics
    included, so that reading them back proves they were read."""
    gen = torch.Generator().manual_seed(len(arch))
    network = getattr(torchvision.models, arch)(weights=None)
    state = {}
    for key, value in network.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        noise = torch.rand(value.shape, generator=gen)
        if key.endswith("running_mean"):
            state[key] = 0.2 * noise - 0.1
        elif key.endswith("running_var"):
            state[key] = noise + 0.5
        else:  # within 10% of torchvision's initialisation, which keeps 50 layers' activations finite
            state[key] = value * (0.9 + 0.2 * noise)
    return state
