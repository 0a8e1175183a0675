"""Argument helpers shared by the op wrappers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

IntPair = Union[int, Sequence[int]]

__all__ = ["IntPair", "pair"]


def pair(value: IntPair, name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair to a tuple of two ints >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    if isinstance(value, int):
        result = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        result = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    if min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result
