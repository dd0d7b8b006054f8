"""The embedded RotatedDigits data and the DomainBed MNIST network."""

import torch

from torchsage.dg import MNISTCNN, rotated_digits
from torchsage.dg.datasets import load_digits_tensor, rotate


def test_rotating_by_90_degrees_is_an_exact_quarter_turn():
    images = torch.rand(3, 1, 8, 8)
    # Counter-clockwise on screen (row 0 at the top) is torch.rot90 over (H, W) with k = 1.
    torch.testing.assert_close(rotate(images, 90), torch.rot90(images, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(images, 0), images, atol=1e-6, rtol=0)


def test_rotated_digits_deals_every_digit_once_and_is_deterministic():
    envs = rotated_digits()
    assert len(envs) == 6
    assert sum(len(e) for e in envs) == 1797  # scikit-learn's digits
    images, labels = load_digits_tensor()
    assert sorted(torch.cat([e.tensors[1] for e in envs]).tolist()) == sorted(labels.tolist())
    # environment 0 is unrotated: its images are digits of the bundled set
    flat = images.flatten(1)
    for x in envs[0].tensors[0][:5]:
        assert (flat - x.flatten()).abs().amax(1).min() < 1e-6
    again = rotated_digits()
    assert all(torch.equal(a.tensors[0], b.tensors[0]) for a, b in zip(envs, again))
    assert not torch.equal(rotated_digits(seed=1)[0].tensors[1], envs[0].tensors[1])


def test_mnist_cnn_has_domainbeds_layout_and_any_input_size():
    model = MNISTCNN(1, 10)
    # 4 convs (9 in x out + out), 4 GroupNorms (2 x width), head 128 x 10 + 10
    convs = (1 * 64 * 9 + 64) + (64 * 128 * 9 + 128) + 2 * (128 * 128 * 9 + 128)
    norms = 2 * (64 + 3 * 128)
    assert sum(p.numel() for p in model.parameters()) == convs + norms + 128 * 10 + 10
    for size in (8, 16, 28):
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert MNISTCNN(2, None).n_outputs == 128
