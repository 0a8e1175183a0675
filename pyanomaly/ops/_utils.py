"""Argument helpers shared by the op wrappers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

IntPair = Union[int, Sequence[int]]

__all__ = ["IntPair", "all_finite", "check_no_overflow", "checkable", "pair", "require_finite", "tracing"]


def tracing() -> bool:
    """Whether torch.compile, torch.export or the TorchScript/ONNX tracer is recording (no data to check)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def checkable(tensor: torch.Tensor) -> bool:
    """Value checks need real data: skipped while a graph is traced and on the meta device."""
    return tensor.numel() > 0 and tensor.device.type != "meta" and not tracing()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in about one read of the tensor.

    A sum (in at least float32) is finite iff every value is finite, unless finite values overflow
    it, so only a non-finite sum needs the exact (and 2-3x slower: a bool tensor) isfinite pass."""
    tensor = tensor.detach()  # a check, not part of any graph
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def require_finite(**tensors: torch.Tensor) -> None:
    """A ValueError naming the first floating argument holding NaN or an infinity."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.is_floating_point() and checkable(tensor):
            if not all_finite(tensor):
                raise ValueError(f"{name} contains NaN or infinite values")


def check_no_overflow(op: str, result: torch.Tensor, **inputs: torch.Tensor) -> None:
    """A non-finite ``result``: a ValueError naming the first non-finite input if there is one
    (:func:`require_finite`), else the arithmetic overflowed: a FloatingPointError naming the
    largest input, instead of returning NaN."""
    if checkable(result) and not all_finite(result):
        require_finite(**inputs)
        largest = {name: float(t.detach().abs().max()) for name, t in inputs.items() if t is not None and t.numel()}
        detail = ", ".join(f"max |{name}| = {value:.3g}" for name, value in largest.items())
        raise FloatingPointError(
            f"{op} overflowed to NaN/inf although its inputs are finite ({detail}); rescale the inputs"
        )


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
