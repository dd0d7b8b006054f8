"""Seeds every generator and forces deterministic CPU kernels for every test."""

import os
import random

import numpy as np
import pytest
import torch

torch.use_deterministic_algorithms(True)
# One intra-op thread by default: the tests' problems are small, and on a busy 2-core machine a
# second thread made a tiny SegNet epoch 60x slower (36 s instead of 0.6 s).
torch.set_num_threads(int(os.environ.get("TORCHSAGE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def real_torchvision():
    """The real torchvision module, for tests marked ``torchvision`` (tests/torchvision_support.py)."""
    from torchvision_support import require_torchvision

    return require_torchvision()


@pytest.fixture
def tiny_emoji(tmp_path, monkeypatch):
    """EmojiStylesPip from three tiny sources (tests/tiny_emoji.py); the value is its ``data_dir``."""
    from tiny_emoji import use_tiny_emoji

    return use_tiny_emoji(tmp_path, monkeypatch)
