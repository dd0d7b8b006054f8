"""torchsage: SAGE (Spectral-Aware Gradient-Aligned Exploration) for multi-distribution learning."""

from torchsage import amp
from torchsage.disagreement import GradientStatistics, disagreement
from torchsage.groups import group_counts, group_losses, group_sizes
from torchsage.optim import (
    ASAM,
    GSAM,
    SAGE,
    SAGM,
    SAM,
    MicroBatches,
    SAGEAlign,
    SAGEAlignmentOnly,
    SAGECurvatureOnly,
    StepInfo,
    frozen_bn_stats,
)
from torchsage.polar import polar_factor
from torchsage.presets import PRESETS, preset

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "GSAM",
    "PRESETS",
    "SAGE",
    "SAGM",
    "SAM",
    "GradientStatistics",
    "MicroBatches",
    "SAGEAlign",
    "SAGEAlignmentOnly",
    "SAGECurvatureOnly",
    "StepInfo",
    "amp",
    "disagreement",
    "frozen_bn_stats",
    "group_counts",
    "group_losses",
    "group_sizes",
    "polar_factor",
    "preset",
]
