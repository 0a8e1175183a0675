"""Layers built on the fused ops."""

__all__: list[str] = []
