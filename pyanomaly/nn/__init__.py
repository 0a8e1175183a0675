"""Layers built on the fused ops."""

from pyanomaly.nn.hopfield import HopfieldMemory, HopfieldRecall

__all__ = ["HopfieldMemory", "HopfieldRecall"]
