"""Domain generalization: data sets, networks and (later) the DomainBed-protocol harness."""

from torchsage.dg.datasets import ROTATED_DIGITS_ANGLES, rotated_digits
from torchsage.dg.networks import MNISTCNN

__all__ = ["MNISTCNN", "ROTATED_DIGITS_ANGLES", "rotated_digits"]
