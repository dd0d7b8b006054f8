"""Shapes, parameter counts (closed forms and the published SegNet sizes) and task separation."""

import pytest
import torch
import torch.nn.functional as F

from torchsage.mtl.networks import MultiLeNet, SegNet, SegNetMTAN, SegNetSplit, max_unpool

NYUV2 = {"segmentation": 13, "depth": 1, "normal": 3}
CITYSCAPES = {"segmentation": 7, "depth": 1}


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("width", [1, 2])
def test_multilenet_shapes_and_size(width):
    net = MultiLeNet(width)
    out = net(torch.randn(5, 1, 28, 28))
    assert set(out) == {"left", "right"} and set(net.heads) == {"left", "right"}
    assert out["left"].shape == out["right"].shape == (5, 10)
    c1, c2, h = 10 * width, 20 * width, 50 * width
    encoder = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (16 * c2 * h + h)
    head = (h * h + h) + (h * 10 + 10)
    assert _count(net.encoder) == encoder and _count(net) == encoder + 2 * head


def test_multilenet_heads_are_task_specific():
    net = MultiLeNet()
    net(torch.randn(3, 1, 28, 28))["left"].sum().backward()
    assert all(p.grad is None for p in net.heads["right"].parameters())
    assert all(p.grad is not None for p in net.encoder.parameters())
    with pytest.raises(ValueError, match="28 x 28"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="width"):
        MultiLeNet(0)


@pytest.mark.parametrize("size", [(8, 12), (9, 13), (7, 7)])
def test_max_unpool_matches_torch(size):
    x = torch.randn(2, 3, *size, requires_grad=True)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    ours = max_unpool(pooled, indices, size)
    torch.use_deterministic_algorithms(False)  # torch flags max_unpool2d as non-deterministic
    try:
        reference = F.max_unpool2d(pooled, indices, 2, 2, output_size=size)
    finally:
        torch.use_deterministic_algorithms(True)
    assert torch.equal(ours, reference)
    weights = torch.randn_like(ours)
    (grad,) = torch.autograd.grad((ours * weights).sum(), pooled)
    torch.testing.assert_close(grad, weights.flatten(2).gather(2, indices.flatten(2)).view_as(pooled))


@pytest.mark.parametrize("cls", [SegNetMTAN, SegNetSplit])
def test_segnet_output_shapes(cls):
    net = cls(NYUV2, width=4).eval()
    out = net(torch.randn(2, 3, 32, 48))
    assert list(out) == list(NYUV2)
    for task, channels in NYUV2.items():
        assert out[task].shape == (2, channels, 32, 48)
    torch.testing.assert_close(out["normal"].norm(dim=1), torch.ones(2, 32, 48))
    # sizes that 2x2 pooling does not divide come back whole
    out = cls(CITYSCAPES, width=4)(torch.randn(1, 3, 33, 70))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "segmentation": (1, 7, 33, 70),
        "depth": (1, 1, 33, 70),
    }


def test_segnet_sizes_match_the_published_networks():
    # The single-task SegNet of the MTAN/CAGrad code (13-class segmentation) has 24,981,069
    # parameters, and the MTAN paper reports SegNet-MTAN on NYUv2 at 1.77 times that size.
    with torch.device("meta"):
        single = _count(SegNetSplit({"segmentation": 13}))
        mtan = _count(SegNetMTAN(NYUV2))
    assert single == 24_981_069
    assert round(mtan / single, 2) == 1.77


def test_mtan_attention_is_task_specific():
    net = SegNetMTAN(CITYSCAPES, width=4)
    out = net(torch.randn(2, 3, 32, 32))
    out["depth"].sum().backward()
    seg_owned = [*net.encoder_attention["segmentation"].parameters(), *net.heads["segmentation"].parameters()]
    assert all(p.grad is None for p in seg_owned)
    assert all(p.grad is not None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.encoder_attention["depth"].parameters())


def test_segnet_bad_arguments():
    with pytest.raises(ValueError, match="32x32"):
        SegNet(width=4)(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match="'depth'"):
        SegNetMTAN({"depth": 0}, width=4)
    with pytest.raises(ValueError, match="at least one task"):
        SegNetSplit({}, width=4)
