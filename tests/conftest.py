"""Seeds every generator and forces deterministic CPU kernels for every test."""

import os
import random

import numpy as np
import pytest
import torch

torch.use_deterministic_algorithms(True)
torch.set_num_threads(int(os.environ.get("TORCHSAGE_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
