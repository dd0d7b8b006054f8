"""Metrics, losses and Delta-m% against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from torchsage.mtl import metrics as M


def _one_hot_logits(pred, classes):
    """Logits whose argmax over dim 1 is ``pred`` (B x H x W)."""
    return torch.nn.functional.one_hot(pred, classes).permute(0, 3, 1, 2).float()


def test_segmentation_metric_by_hand():
    # labels / predictions of 8 pixels, 3 classes, two pixels unlabelled (-1)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, -1, -1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 2]]])
    # labelled pixels: (0->0) (0->1) (1->1) (1->1) (2->2) (2->0)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> IoU 1/3
    # class 1: TP 2, FP 1, FN 0 -> IoU 2/3;  class 2: TP 1, FP 0, FN 1 -> IoU 1/2
    m = M.SegmentationMetric(3)
    m.update(_one_hot_logits(pred, 3), target)
    out = m.compute()
    assert out["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["pixAcc"] == pytest.approx(4 / 6)
    # two half batches pool to the same confusion matrix; predicted ids work too
    pooled = M.SegmentationMetric(3)
    pooled.update(pred[:, :1], target[:, :1])
    pooled.update(pred[:, 1:], target[:, 1:])
    assert pooled.compute() == pytest.approx(out)


def test_segmentation_metric_skips_absent_classes():
    m = M.SegmentationMetric(4)  # class 3 never labelled nor predicted
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
    # IoU: class 0 -> 1, class 1 -> 0 (FP), class 2 -> 0 (FN)
    assert m.compute() == pytest.approx({"mIoU": 1 / 3, "pixAcc": 1 / 2})
    m.reset()
    with pytest.raises(ValueError, match="no labelled pixel"):
        m.compute()


def test_depth_metric_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [5.0, 7.0]]]])
    target = torch.tensor([[[[2.0, 2.0], [4.0, 0.0]]]])  # last pixel invalid
    for average in ("batches", "pixels"):
        m = M.DepthMetric(average)
        m.update(pred, target)
        out = m.compute()
        assert out["absErr"] == pytest.approx((1 + 0 + 1) / 3)
        assert out["relErr"] == pytest.approx((1 / 2 + 0 + 1 / 4) / 3)


def test_depth_metric_over_batches_and_pixels():
    pred = torch.tensor([[[[1.0, 2.0], [5.0, 7.0]]]])
    target = torch.tensor([[[[2.0, 2.0], [4.0, 0.0]]]])
    second = (torch.tensor([[[[3.0]]]]), torch.tensor([[[[1.0]]]]))
    empty = (torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))  # no valid pixel: skipped
    pooled, batched = M.DepthMetric("pixels"), M.DepthMetric("batches")
    for m in (pooled, batched):
        m.update(pred, target)
        m.update(*second)
        m.update(*empty)
    assert pooled.compute() == pytest.approx(
        {"absErr": (1 + 0 + 1 + 2) / 4, "relErr": (1 / 2 + 1 / 4 + 2) / 4}
    )
    # batch means 2/3 and 2 (abs), 1/4 and 2 (rel), averaged over the two batches
    assert batched.compute() == pytest.approx({"absErr": (2 / 3 + 2) / 2, "relErr": (1 / 4 + 2) / 2})
    with pytest.raises(ValueError, match="average"):
        M.DepthMetric("images")


def _unit(degrees):
    r = math.radians(degrees)
    return [math.cos(r), math.sin(r), 0.0]


@pytest.mark.parametrize("average", ["batches", "pixels"])
def test_normal_metric_angles_of_known_vectors(average):
    angles = [0.0, 90.0, 45.0, 10.0, 25.0, 35.0]
    target = torch.tensor([[1.0, 0.0, 0.0]] * 6 + [[0.0, 0.0, 0.0]])  # the last pixel is invalid
    pred = torch.tensor([_unit(a) for a in angles] + [[1.0, 0.0, 0.0]]) * 3.0  # not unit length
    m = M.NormalMetric(average)
    m.update(pred.T.reshape(1, 3, 1, 7), target.T.reshape(1, 3, 1, 7))
    out = m.compute()
    assert out["mean"] == pytest.approx(sum(angles) / 6, abs=1e-6)
    assert out["median"] == pytest.approx((25 + 35) / 2, abs=1e-3)  # sorted: 0 10 25 35 45 90
    assert out["11.25"] == pytest.approx(2 / 6)
    assert out["22.5"] == pytest.approx(2 / 6)
    assert out["30"] == pytest.approx(3 / 6)
    m.update(torch.tensor(_unit(80.0)).reshape(1, 3, 1, 1), torch.tensor([1.0, 0, 0]).reshape(1, 3, 1, 1))
    out = m.compute()
    if average == "pixels":  # 0 10 25 35 45 80 90: the middle one
        assert out["median"] == pytest.approx(35.0, abs=1e-3)
        assert out["mean"] == pytest.approx((sum(angles) + 80) / 7)
        assert out["30"] == pytest.approx(3 / 7)
    else:  # batch values (30, 80) for the median, (34.1666.., 80) for the mean, (1/2, 0) below 30
        assert out["median"] == pytest.approx((30 + 80) / 2, abs=1e-6)
        assert out["mean"] == pytest.approx((sum(angles) / 6 + 80) / 2)
        assert out["30"] == pytest.approx(1 / 4)


def _numpy_angles(pred, target):
    p, t = pred.double().numpy(), target.double().numpy()
    cos = (p * t).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1))
    return np.degrees(np.arccos(np.clip(cos, -1, 1))).ravel()


def test_normal_metric_median_against_numpy():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 9, 12, generator=gen)
    target = torch.randn(2, 3, 9, 12, generator=gen)
    pooled = M.NormalMetric("pixels")
    pooled.update(pred, target)
    pooled.update(pred[:0], target[:0])  # an empty batch changes nothing
    angles = _numpy_angles(pred, target)
    assert pooled.compute()["median"] == pytest.approx(np.median(angles), abs=1e-3)
    assert pooled.compute()["mean"] == pytest.approx(angles.mean(), abs=1e-9)
    # per batch: the mean of the two images' medians (even pixel counts: numpy's midpoint)
    batched = M.NormalMetric("batches")
    batched.update(pred[:1], target[:1])
    batched.update(pred[1:], target[1:])
    medians = [np.median(_numpy_angles(pred[i : i + 1], target[i : i + 1])) for i in range(2)]
    assert batched.compute()["median"] == pytest.approx(np.mean(medians), abs=1e-9)


def test_accuracy_metric():
    m = M.AccuracyMetric()
    m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    m.update(torch.tensor([0]), torch.tensor([0]))
    assert m.compute() == {"acc": 3 / 4}


def test_losses_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # 1 x 2 classes x 1 x 2
    target = torch.tensor([[[0, -1]]])
    # only pixel 0 counts: -log softmax([2, 0])[0] = log(1 + e^-2)
    assert M.segmentation_loss(logits, target).item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert M.segmentation_loss(logits, torch.full((1, 1, 2), -1)).item() == 0.0

    pred = torch.tensor([[[[1.0, 4.0, 9.0]]]])
    depth = torch.tensor([[[[2.0, 0.0, 6.0]]]])
    assert M.depth_loss(pred, depth).item() == pytest.approx((1 + 3) / 2)

    normal_target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    normal_pred = torch.tensor([_unit(60.0), [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    # valid pixels: cos 60 = 0.5 and cos 0 = 1 -> 1 - 0.75
    assert M.normal_loss(normal_pred, normal_target).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="differ"):
        M.depth_loss(pred, depth[..., :2])


def test_delta_m_by_hand_and_sign_convention():
    baseline = {"segmentation/mIoU": 0.5, "depth/absErr": 0.4}
    # mIoU 0.55 (higher is better, +10%) and absErr 0.5 (lower is better, 25% worse)
    # -> (1/2) (-(0.55 - 0.5)/0.5 + (0.5 - 0.4)/0.4) = (-0.1 + 0.25) / 2 = 7.5%
    value = M.delta_m({"segmentation/mIoU": 0.55, "depth/absErr": 0.5, "extra": 1.0}, baseline)
    assert value == pytest.approx(7.5)
    # better on both: negative
    assert M.delta_m({"segmentation/mIoU": 0.6, "depth/absErr": 0.3}, baseline) == pytest.approx(-22.5)
    for name, base in M.BASELINES.items():
        assert M.delta_m(base, base) == 0.0, name


def test_delta_m_published_baselines():
    assert len(M.BASELINES["nyuv2"]) == 9 and len(M.BASELINES["cityscapes"]) == 4
    for base in M.BASELINES.values():
        assert set(base) <= set(M.HIGHER_IS_BETTER)
    # one NYUv2 metric 10% worse in its own direction, the rest equal: 10/9 %
    worse = dict(M.BASELINES["nyuv2"])
    worse["normal/11.25"] *= 0.9
    assert M.delta_m(worse, M.BASELINES["nyuv2"]) == pytest.approx(10 / 9)
    worse = dict(M.BASELINES["cityscapes"])
    worse["depth/relErr"] *= 1.1
    assert M.delta_m(worse, M.BASELINES["cityscapes"]) == pytest.approx(10 / 4)


def test_delta_m_errors_name_the_metric():
    base = M.BASELINES["cityscapes"]
    partial = {k: v for k, v in base.items() if k != "depth/relErr"}
    with pytest.raises(ValueError, match="'depth/relErr'"):
        M.delta_m(partial, base)
    with pytest.raises(ValueError, match="'foo/bar'"):
        M.delta_m({"foo/bar": 1.0}, {"foo/bar": 2.0})
    with pytest.raises(ValueError, match="not finite"):
        M.delta_m({**base, "depth/absErr": math.nan}, base)


def test_task_metric_and_collect():
    metrics = {"segmentation": M.task_metric("segmentation", 3), "left": M.task_metric("left")}
    metrics["segmentation"].update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    metrics["left"].update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    assert M.collect(metrics) == {"segmentation/mIoU": 1.0, "segmentation/pixAcc": 1.0, "left/acc": 0.5}
    assert isinstance(M.task_metric("normal"), M.NormalMetric)
    assert isinstance(M.task_metric("depth"), M.DepthMetric)
    with pytest.raises(ValueError, match="number of classes"):
        M.task_metric("segmentation")
