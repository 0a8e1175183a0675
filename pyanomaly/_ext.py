"""Loads the compiled kernels (``pyanomaly._C``) if they match the installed torch.

When the extension is missing, or was compiled against another torch, ``import pyanomaly``
still works: a single warning gives the rebuild command and every op runs its pure-PyTorch
reference instead.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "REBUILD_COMMAND", "build_info", "has_kernels", "host_reclaims_free_memory", "huge_pages", "load_error",
    "reference_mode",
]

REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."

# Every op the Python side calls; an extension missing one of them is stale and is not used.
EXPECTED_OPS = (
    "extract_patches",
    "extract_patches_backward",
    "fold_patches",
    "fold_patches_backward",
    "hopfield_retrieve",
    "hopfield_retrieve_backward",
    "infonce",
    "infonce_backward",
)

_C: Any = None
_load_error: str | None = None
_built_with_cuda = False
_force_reference = False


def _source_checkout_hint() -> str:
    """Explain the usual cause of a missing extension: importing the source folder, not the install."""
    source_root = Path(__file__).resolve().parents[1]
    if not (source_root / "setup.py").is_file():
        return ""
    return (
        f" ({source_root / 'pyanomaly'} is the source checkout, imported because the current folder comes "
        "first on sys.path; run from another folder, or use the `pyanomaly` command, to get the installed "
        "package, or build here with `python setup.py build_ext --inplace`)"
    )


def _load() -> None:
    global _C, _load_error, _built_with_cuda
    try:
        from pyanomaly import _build_info
    except ImportError:
        _load_error = "the compiled extension pyanomaly._C is not built" + _source_checkout_hint()
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        _load_error = (
            f"pyanomaly._C was compiled against torch {_build_info.TORCH_VERSION} "
            f"but torch {torch.__version__} is installed"
        )
        return
    try:
        _C = importlib.import_module("pyanomaly._C")
    except ImportError as exc:  # missing .so, or an ABI mismatch the version check missed
        _load_error = f"pyanomaly._C could not be imported ({exc})" + _source_checkout_hint()
        return
    missing = [name for name in EXPECTED_OPS if not hasattr(torch.ops.pyanomaly, name)]
    if missing:
        _C, _load_error = None, f"pyanomaly._C is out of date: it lacks the ops {', '.join(missing)}"
        return
    _built_with_cuda = bool(_C.build_info()["with_cuda"])
    default_set = "PYANOMALY_HUGE_PAGES" in os.environ
    if not default_set and hasattr(_C, "set_huge_pages") and host_reclaims_free_memory():
        _C.set_huge_pages(False)


def host_reclaims_free_memory(sysfs: str = "/sys") -> bool:
    """Whether this Linux guest hands freed memory back to its hypervisor (a virtio balloon with free
    page reporting, feature bit 5): there a fresh huge page can cost a host fault, and the patch ops'
    huge-page advice measured erratic (single calls of 0.3-1.9 s; see :func:`huge_pages`)."""
    for features in Path(sysfs, "bus/virtio/drivers/virtio_balloon").glob("virtio*/features"):
        with contextlib.suppress(OSError):
            bits = features.read_text().strip()
            if len(bits) > 5 and bits[5] == "1":
                return True
    return False


_load()
if _load_error is not None:
    warnings.warn(
        f"{_load_error}; pyanomaly ops fall back to their (slower, memory-hungry) pure-PyTorch "
        f"references. Rebuild from the source folder with:\n    {REBUILD_COMMAND}",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernels(device: torch.device | str | None = None) -> bool:
    """Whether compiled kernels exist for ``device`` (any device when None)."""
    if _C is None or _force_reference:
        return False
    if device is None:
        return True
    device_type = torch.device(device).type
    if device_type == "cpu" or device_type == "meta":
        return True
    if device_type == "cuda":
        return _built_with_cuda
    return False


@contextlib.contextmanager
def reference_mode(enabled: bool = True) -> Iterator[None]:
    """Within this context every op runs its pure-PyTorch reference (for benchmarks and tests)."""
    global _force_reference
    previous, _force_reference = _force_reference, enabled
    try:
        yield
    finally:
        _force_reference = previous


@contextlib.contextmanager
def huge_pages(enabled: bool = True) -> Iterator[None]:
    """Within this context the CPU patch kernels do (or, with False, do not) advise the kernel to back
    their large outputs with 2 MiB transparent huge pages: a fresh output of tens of MB is then written
    without a page fault per 4 KiB, the same values 3-5x faster (2-core EPYC VM, THP "madvise", one op
    called in a loop). The default is on, except where the hypervisor takes back freed guest memory
    (:func:`host_reclaims_free_memory`), where it is off; ``PYANOMALY_HUGE_PAGES=1`` / ``=0`` in the
    environment sets it at import. Off Linux, with THP "never", or without the compiled kernels, it
    changes nothing. The setting is process-wide."""
    if _C is None or not hasattr(_C, "set_huge_pages"):
        yield
        return
    previous = _C.set_huge_pages(bool(enabled))
    try:
        yield
    finally:
        _C.set_huge_pages(previous)


def load_error() -> str | None:
    """Why the compiled kernels are unavailable, or None when they loaded."""
    return _load_error


def build_info() -> dict:
    """How the extension was built: torch version, CUDA, OpenMP (empty dict when not loaded)."""
    return dict(_C.build_info()) if _C is not None else {}
