"""Layers built on the fused ops."""

from pyanomaly.nn.infonce import InfoNCE

__all__ = ["InfoNCE"]
