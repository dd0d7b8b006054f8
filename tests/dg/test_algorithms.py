"""The penalties of CORAL and Fishr against brute-force references."""

import numpy as np
import torch
import torch.nn.functional as F

from torchsage.dg.algorithms import coral_distance, head_gradients


def test_coral_distance_matches_numpy():
    a, b = torch.randn(20, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64) * 2 + 1
    na, nb = a.numpy(), b.numpy()
    expected = np.mean((na.mean(0) - nb.mean(0)) ** 2) + np.mean((np.cov(na.T) - np.cov(nb.T)) ** 2)
    assert np.isclose(coral_distance(a, b).item(), expected, rtol=1e-12)
    assert coral_distance(a, a).item() == 0.0


def test_head_gradients_equal_per_sample_autograd():
    head = torch.nn.Linear(6, 4).double()
    features = torch.randn(7, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (7,))
    logits = head(features)
    closed_form = head_gradients(features, logits, labels)
    for i in range(7):
        head.zero_grad()
        F.cross_entropy(head(features[i : i + 1]), labels[i : i + 1]).backward()
        expected = torch.cat([head.weight.grad.flatten(), head.bias.grad])
        torch.testing.assert_close(closed_form[i], expected, rtol=1e-12, atol=1e-12)
