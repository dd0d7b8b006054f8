"""Sharpness-aware optimizers: one two-pass core, one ascent rule each."""

from torchsage.optim._ascent import (
    RHO_SCALINGS,
    AdaptiveGradientAscent,
    AlignedPolarAscent,
    GradientAscent,
    GradientMatchingAscent,
    PolarAscent,
)
from torchsage.optim._core import AscentRule, SharpnessAware, StepInfo, frozen_bn_stats
from torchsage.optim._sage import SAGE, SAGEAlign, SAGEAlignmentOnly, SAGECurvatureOnly
from torchsage.optim._sam import ASAM, GSAM, SAGM, SAM

__all__ = [
    "ASAM",
    "GSAM",
    "RHO_SCALINGS",
    "SAGE",
    "SAGM",
    "SAM",
    "AdaptiveGradientAscent",
    "AlignedPolarAscent",
    "AscentRule",
    "GradientAscent",
    "GradientMatchingAscent",
    "PolarAscent",
    "SAGEAlign",
    "SAGEAlignmentOnly",
    "SAGECurvatureOnly",
    "SharpnessAware",
    "StepInfo",
    "frozen_bn_stats",
]
