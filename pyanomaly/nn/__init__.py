"""Layers built on the fused ops, and the encoders the detectors use."""

from pyanomaly.nn.hopfield import HopfieldMemory, HopfieldRecall
from pyanomaly.nn.infonce import InfoNCE

__all__ = ["HopfieldMemory", "HopfieldRecall", "InfoNCE"]
