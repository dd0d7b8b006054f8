"""Sharpness-aware optimizers: one two-pass core, one ascent rule each.

The data-parallel pieces the training harnesses use under ``torchrun`` (:class:`Communicator`,
:func:`torchrun_session`, :func:`average_gradients`, :func:`make_data_parallel`, :data:`LAYOUTS`)
are exported here too, so nothing outside this package imports its private modules.
"""

from torchsage.optim._ascent import (
    ASCENT_DIRECTIONS,
    RHO_SCALINGS,
    AdaptiveGradientAscent,
    AlignedPolarAscent,
    GradientAscent,
    GradientMatchingAscent,
    PolarAscent,
)
from torchsage.optim._core import AscentRule, Closure, SharpnessAware, StepInfo, frozen_bn_stats
from torchsage.optim._distributed import (
    LAYOUTS,
    Communicator,
    average_gradients,
    make_data_parallel,
    torchrun_session,
)
from torchsage.optim._micro import MicroBatches
from torchsage.optim._sage import SAGE, SAGEAlign, SAGEAlignmentOnly, SAGECurvatureOnly
from torchsage.optim._sam import ASAM, GSAM, SAGM, SAM
from torchsage.optim._schedule import AscentSchedule, EveryK, EveryStep, Triggered
from torchsage.optim._shards import is_sharded

__all__ = [
    "ASAM",
    "ASCENT_DIRECTIONS",
    "GSAM",
    "LAYOUTS",
    "RHO_SCALINGS",
    "SAGE",
    "SAGM",
    "SAM",
    "AdaptiveGradientAscent",
    "AlignedPolarAscent",
    "AscentRule",
    "AscentSchedule",
    "Closure",
    "Communicator",
    "EveryK",
    "EveryStep",
    "GradientAscent",
    "GradientMatchingAscent",
    "MicroBatches",
    "PolarAscent",
    "SAGEAlign",
    "SAGEAlignmentOnly",
    "SAGECurvatureOnly",
    "SharpnessAware",
    "StepInfo",
    "Triggered",
    "average_gradients",
    "frozen_bn_stats",
    "is_sharded",
    "make_data_parallel",
    "torchrun_session",
]
