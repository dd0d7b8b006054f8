r"""Metrics, losses and Delta-m% of the multi-task benchmarks.

Metric names are ``"{task}/{metric}"``: ``segmentation/mIoU``, ``segmentation/pixAcc``,
``depth/absErr``, ``depth/relErr``, ``normal/mean``, ``normal/median``, ``normal/11.25``,
``normal/22.5``, ``normal/30``, ``left/acc``, ``right/acc``.

How an epoch is summarised follows the evaluation code behind the published tables (CAGrad,
Nash-MTL, FAMO): segmentation pools one confusion matrix over the epoch; depth and normal values
are computed per batch and averaged over the batches (``average="batches"``, the default; the
median is then a mean of per-batch medians, and the values depend on the evaluation batch size:
2 on NYUv2, 8 on Cityscapes in those tables). ``average="pixels"`` pools every valid pixel of the
epoch instead (batch-size independent).

Definitions:

* mIoU: mean over classes of ``TP / (TP + FP + FN)`` from the confusion matrix of the pixels
  whose label is not -1; a class absent from both labels and predictions is left out of the mean
  (an empty union has no IoU). pixAcc: ``TP / labelled pixels``.
* Depth, on pixels whose target depth is not 0: absErr = mean ``|d - d*|``, relErr = mean
  ``|d - d*| / d*`` (a ratio, not a percentage). The published Cityscapes relErr of 27.77 comes
  from this same formula in the same evaluation code, with no factor of 100: the preprocessed
  Cityscapes depth targets are small numbers (absErr 0.0125), many close to 0, so the ratio is
  large. Both data sets therefore use one definition here.
* Normals, on pixels whose target normal is not the zero vector: the angle in degrees between
  prediction and target (both normalised); mean, median and the fractions of angles below
  11.25, 22.5 and 30 degrees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BASELINES",
    "HIGHER_IS_BETTER",
    "AccuracyMetric",
    "DepthMetric",
    "NormalMetric",
    "SegmentationMetric",
    "collect",
    "delta_m",
    "depth_loss",
    "normal_loss",
    "segmentation_loss",
    "task_metric",
]

HIGHER_IS_BETTER: dict[str, bool] = {
    "segmentation/mIoU": True,
    "segmentation/pixAcc": True,
    "depth/absErr": False,
    "depth/relErr": False,
    "normal/mean": False,
    "normal/median": False,
    "normal/11.25": True,
    "normal/22.5": True,
    "normal/30": True,
    "left/acc": True,
    "right/acc": True,
}

# Single-task SegNet results that the published Delta-m% tables use as their reference.
BASELINES: dict[str, dict[str, float]] = {
    "nyuv2": {
        "segmentation/mIoU": 0.3830,
        "segmentation/pixAcc": 0.6376,
        "depth/absErr": 0.6754,
        "depth/relErr": 0.2780,
        "normal/mean": 25.01,
        "normal/median": 19.21,
        "normal/11.25": 0.3014,
        "normal/22.5": 0.5720,
        "normal/30": 0.6915,
    },
    "cityscapes": {
        "segmentation/mIoU": 0.7401,
        "segmentation/pixAcc": 0.9316,
        "depth/absErr": 0.0125,
        "depth/relErr": 27.77,
    },
}


def delta_m(
    metrics: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool] = HIGHER_IS_BETTER,
) -> float:
    r"""Delta-m%: the mean relative loss of performance against single-task baselines, in percent.

    .. math::
        \Delta_m = \frac{100}{K} \sum_{k=1}^{K} (-1)^{\delta_k} \frac{M_{m,k} - M_{b,k}}{M_{b,k}}

    over the ``K`` metrics of ``baseline``, with :math:`\delta_k = 1` when higher is better.
    Lower is better; a negative value beats the baselines. Metrics of ``metrics`` that the
    baseline does not list are ignored.

    Example:
        >>> round(delta_m({"left/acc": 0.9, "depth/absErr": 0.5}, {"left/acc": 1.0, "depth/absErr": 0.4}), 6)
        17.5
    """
    if not baseline:
        raise ValueError("baseline is empty: Delta-m% needs at least one metric")
    total = 0.0
    for name, reference in baseline.items():
        if name not in metrics:
            raise ValueError(f"metric {name!r} of the baseline is missing from the results")
        if name not in higher_is_better:
            raise ValueError(f"higher_is_better does not say which way metric {name!r} improves")
        if reference == 0:
            raise ValueError(f"baseline of metric {name!r} is 0: relative change undefined")
        value = float(metrics[name])
        if not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not finite: {value}")
        sign = -1.0 if higher_is_better[name] else 1.0
        total += sign * (value - reference) / reference
    return 100.0 * total / len(baseline)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of ``B x C x H x W`` logits against ``B x H x W`` labels, ignoring -1.

    A batch without a labelled pixel gives a zero loss (still connected to ``logits``).
    """
    valid = target != -1
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=-1)


def _depth_mask(target: Tensor) -> Tensor:
    return target != 0


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error on the pixels whose target depth is not 0 (``B x 1 x H x W``)."""
    if pred.shape != target.shape:
        raise ValueError(f"depth prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    mask = _depth_mask(target)
    if not bool(mask.any()):
        return pred.sum() * 0.0
    return (pred - target).abs()[mask].mean()


def _normal_mask(target: Tensor) -> Tensor:
    return (target != 0).any(dim=1)


def normal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """One minus the mean cosine between predicted and target normals (``B x 3 x H x W``) on the
    pixels whose target is not the zero vector."""
    if pred.shape != target.shape:
        raise ValueError(f"normal prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    mask = _normal_mask(target)
    if not bool(mask.any()):
        return pred.sum() * 0.0
    cosine = F.cosine_similarity(pred, target, dim=1, eps=1e-12)
    return 1.0 - cosine[mask].mean()


# ---------------------------------------------------------------------------------------------
# Streaming metrics
# ---------------------------------------------------------------------------------------------


class SegmentationMetric:
    """Confusion matrix over an epoch; :meth:`compute` gives ``{"mIoU", "pixAcc"}``.

    :meth:`update` takes ``B x C x H x W`` logits (or ``B x H x W`` predicted ids) and labels,
    ignoring label -1 (and any label outside ``[0, num_classes)``).
    """

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        n = self.num_classes
        pred = logits.argmax(1) if logits.dim() == target.dim() + 1 else logits
        if pred.shape != target.shape:
            raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(target.shape)} differ")
        target = target.long()
        keep = (target >= 0) & (target < n)
        index = n * target[keep] + pred[keep].long()
        self.confusion += torch.bincount(index.cpu(), minlength=n * n).reshape(n, n)

    def compute(self) -> dict[str, float]:
        h = self.confusion.double()
        total = h.sum()
        if total == 0:
            raise ValueError("SegmentationMetric saw no labelled pixel")
        tp = h.diag()
        union = h.sum(0) + h.sum(1) - tp
        present = union > 0
        return {"mIoU": float((tp[present] / union[present]).mean()), "pixAcc": float(tp.sum() / total)}


_AVERAGES = ("batches", "pixels")


def _check_average(average: str) -> str:
    if average not in _AVERAGES:
        raise ValueError(f"average must be 'batches' or 'pixels', got {average!r}")
    return average


class DepthMetric:
    """Absolute and relative depth errors on the valid pixels (target not 0): ``{"absErr",
    "relErr"}``.

    Args:
        average: ``"batches"`` (default): the mean over the batches of an epoch of each batch's
            mean over its valid pixels, the protocol of the published tables (evaluation batch 2
            on NYUv2, 8 on Cityscapes); ``"pixels"``: the mean over all valid pixels of the epoch
            (independent of the batch size). Batches without a valid pixel are skipped.
    """

    def __init__(self, average: str = "batches") -> None:
        self.average = _check_average(average)
        self.reset()

    def reset(self) -> None:
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.count = 0
        self.batch_abs = 0.0
        self.batch_rel = 0.0
        self.batches = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"depth prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        mask = _depth_mask(target)
        count = int(mask.sum())
        if count == 0:
            return
        error = (pred[mask] - target[mask]).abs().double()
        abs_sum = float(error.sum())
        rel_sum = float((error / target[mask].abs().double()).sum())
        self.abs_sum += abs_sum
        self.rel_sum += rel_sum
        self.count += count
        self.batch_abs += abs_sum / count
        self.batch_rel += rel_sum / count
        self.batches += 1

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("DepthMetric saw no valid pixel (all target depths are 0)")
        if self.average == "batches":
            return {"absErr": self.batch_abs / self.batches, "relErr": self.batch_rel / self.batches}
        return {"absErr": self.abs_sum / self.count, "relErr": self.rel_sum / self.count}


class NormalMetric:
    """Angular errors (degrees) of surface normals on the valid pixels (target not the zero
    vector): ``{"mean", "median", "11.25", "22.5", "30"}`` (the last three: fractions of angles
    below).

    Args:
        average: ``"batches"`` (default): each value is the mean over the batches of the value
            of each batch (so "median" is a mean of per-batch medians), the protocol of the
            published tables; ``"pixels"``: values over all valid pixels of the epoch.
        resolution: bin width in degrees of the histogram that gives the epoch median under
            ``"pixels"`` (each order statistic taken at its bin's midpoint: error at most half
            the resolution; memory stays fixed however many pixels an epoch has). The mean,
            the fractions and the per-batch medians are exact.
    """

    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, average: str = "batches", resolution: float = 1e-3) -> None:
        self.average = _check_average(average)
        if not resolution > 0:
            raise ValueError(f"resolution must be positive, got {resolution!r}")
        self.resolution = float(resolution)
        self.bins = math.ceil(180.0 / self.resolution)
        self.reset()

    def _names(self) -> list[str]:
        return ["mean", "median"] + [f"{t:g}" for t in self.THRESHOLDS]

    def reset(self) -> None:
        self.histogram = torch.zeros(self.bins, dtype=torch.int64)
        self.angle_sum = 0.0
        self.below = [0] * len(self.THRESHOLDS)
        self.count = 0
        self.batch_sums = dict.fromkeys(self._names(), 0.0)
        self.batches = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"normal prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        mask = _normal_mask(target)
        cosine = F.cosine_similarity(pred.double(), target.double(), dim=1, eps=1e-12)[mask]
        angle = torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0))).cpu()
        n = angle.numel()
        if n == 0:
            return
        angle_sum = float(angle.sum())
        below = [int((angle < threshold).sum()) for threshold in self.THRESHOLDS]
        self.angle_sum += angle_sum
        self.below = [a + b for a, b in zip(self.below, below, strict=True)]
        index = (angle / self.resolution).long().clamp_(0, self.bins - 1)
        self.histogram += torch.bincount(index, minlength=self.bins)
        self.count += n
        ordered = angle.sort().values
        batch = [angle_sum / n, float(ordered[(n - 1) // 2] + ordered[n // 2]) / 2, *(b / n for b in below)]
        for name, value in zip(self._names(), batch, strict=True):
            self.batch_sums[name] += value
        self.batches += 1

    def _median(self) -> float:
        # The median averages the order statistics of ranks floor((n-1)/2) and ceil((n-1)/2);
        # each is located by its histogram bin and taken at the bin's midpoint.
        cumulative = self.histogram.cumsum(0)
        ranks = torch.tensor([(self.count - 1) // 2, self.count // 2], dtype=torch.int64)
        bins = torch.searchsorted(cumulative, ranks, right=True)
        return float(((bins.double() + 0.5) * self.resolution).mean())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("NormalMetric saw no valid pixel (all target normals are zero)")
        if self.average == "batches":
            return {name: total / self.batches for name, total in self.batch_sums.items()}
        result = {"mean": self.angle_sum / self.count, "median": self._median()}
        for threshold, below in zip(self.THRESHOLDS, self.below, strict=True):
            result[f"{threshold:g}"] = below / self.count
        return result


class AccuracyMetric:
    """Classification accuracy over an epoch: ``{"acc"}``. :meth:`update` takes ``B x C``
    logits (or ``B`` predicted classes) and ``B`` labels."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.count = 0

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        pred = logits.argmax(-1) if logits.dim() == target.dim() + 1 else logits
        if pred.shape != target.shape:
            raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(target.shape)} differ")
        self.correct += int((pred == target).sum())
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("AccuracyMetric saw no example")
        return {"acc": self.correct / self.count}


Metric = SegmentationMetric | DepthMetric | NormalMetric | AccuracyMetric


def task_metric(task: str, channels: int | None = None) -> Metric:
    """The accumulator of a task: ``"segmentation"`` (needs ``channels`` = classes), ``"depth"``,
    ``"normal"``, or any other name (a classification task, e.g. ``"left"``)."""
    if task == "segmentation":
        if channels is None:
            raise ValueError("task 'segmentation' needs its number of classes")
        return SegmentationMetric(channels)
    if task == "depth":
        return DepthMetric()
    if task == "normal":
        return NormalMetric()
    return AccuracyMetric()


def collect(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """Flattens ``{task: accumulator}`` into ``{"task/metric": value}``."""
    return {f"{task}/{name}": value for task, m in metrics.items() for name, value in m.compute().items()}
