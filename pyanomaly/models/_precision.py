"""Mixed precision shared by the detectors: the dtype their encoders run in, and its autocast.

``precision="auto"`` (the default) runs the encoders under bf16 autocast on CUDA devices with bf16,
and in fp32 on every CPU. Two CPU measurements decided that:

- Without AMX (a 2-core Xeon with avx512_bf16 only) bf16 autocast made encoder fwd+bwd slower than
  fp32 channels_last (ResNet-18 at 32 px, batch 128: 2.70 s vs 2.44 s; CPC-AD's fast-stem encoder on
  1800 sub-patches of 32 px: 0.322 s vs 0.236 s).
- With AMX (a 2-core Xeon with amx_bf16, torch 2.13 CPU), bf16 autocast made CPC-AD's preset
  encoder (3600 sub-patches of 16 px) slower too: 0.283 s vs 0.196 s fwd+bwd
  (``results/bf16_cpu_speed.py``); whole training steps at its 128 px geometry 0.89-0.91x, while
  issue 21's 256 px config with 32 px sub-patches trains 1.19-1.39x faster in bf16
  (``python -m bench.bench_end_to_end --precision``, session 9): a user's choice there.

torch 2.13's CPU bf16 convolution backward also returns garbage weight gradients (NaN, inf, ~1e36)
for stride-2 convs over one-pixel-wide maps; the encoders' :class:`~pyanomaly.nn.conv.StrideSafeConv2d`
avoids that case with the same results (``results/bf16_cpu_nan.py``: 8 of 10 one-step CPC-AD fits at
a tiny config ended with a NaN weight before it, 0 of 10 since), so ``"bf16"`` is safe to choose.

AnoMem's stage-1 training is the one exception (:func:`training_precision`): on a CPU
with AMX, "auto" trains its ResNet encoder under bf16 autocast (1.6-1.7x faster whole fits,
``results/bf16_cpu_speed.py``; no non-finite gradient in 24 encoder trials) and guards every step,
a safety net for kernel bugs not covered above: the first step with a non-finite gradient is
skipped and the rest of the fit runs in fp32. Its scoring and export stay fp32 on CPUs.

``"bf16"`` forces autocast (the user's choice, on any device; on a CPU without bf16 instructions,
such as the AVX2-only AMD EPYC where CPC-AD trained 6-10x slower in bf16 than in fp32, it warns
once), ``"fp32"`` turns it off. What follows the encoders (CPC-AD's predictors, InfoNCE and scores;
AnoMem's memories, projections and NT-Xent) always runs in fp32: the detectors cast the encoder
outputs explicitly.
"""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = [
    "ENCODER_MEMORY_FORMAT", "PRECISIONS", "amx_bf16_cpu", "check_precision", "emulated_bf16_cpu",
    "encoder_autocast", "encoder_memory_format", "native_bf16", "resolve_precision", "training_precision",
]

PRECISIONS = ("auto", "bf16", "fp32")

#: The memory format of both detectors' encoder weights and inputs. channels_last made fp32
#: convolution fwd+bwd 1.1-3.7x faster on the CPUs measured here (issue 21's table) and is what
#: cuDNN prefers; ``torch.contiguous_format`` is the earlier path, kept for comparison
#: (``python -m bench.bench_end_to_end --precision`` measures both). Read when a model is built and
#: at every encoder call, so set it before building a detector.
ENCODER_MEMORY_FORMAT = torch.channels_last


def encoder_memory_format() -> torch.memory_format:
    """:data:`ENCODER_MEMORY_FORMAT`, read at call time (so that a caller may change it)."""
    return ENCODER_MEMORY_FORMAT


def check_precision(precision: str) -> str:
    """``precision`` if it is one of PRECISIONS, else a ValueError naming the argument."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def native_bf16(device: torch.device | str) -> bool:
    """Whether "auto" picks bf16 autocast on ``device``: CUDA with bf16 only (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere, i.e. fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def amx_bf16_cpu() -> bool:
    """Whether this CPU has AMX bf16 tiles (Linux flags ``amx_bf16``)."""
    return "amx_bf16" in _cpu_flags()


def training_precision(precision: str, device: torch.device | str) -> str:
    """"bf16" or "fp32" for AnoMem's stage-1 training on ``device``: :func:`resolve_precision`, except
    that "auto" also picks bf16 on CPUs with AMX."""
    if check_precision(precision) == "auto" and torch.device(device).type == "cpu" and amx_bf16_cpu():
        return "bf16"
    return resolve_precision(precision, device)


def emulated_bf16_cpu() -> bool:
    """Whether this CPU is known to lack bf16 instructions (Linux flags without ``avx512_bf16``,
    ``amx_bf16`` or ``avx_ne_convert``; unknown flags count as not known to lack them)."""
    flags = _cpu_flags()
    return bool(flags) and not flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"}


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    """Once per process: bf16 chosen on a CPU that emulates it."""
    warnings.warn(
        "precision='bf16' on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16 flag): "
        "oneDNN emulates it, 6-10x slower than fp32 (CPC-AD's training steps on a 2-core AVX2 AMD "
        "EPYC, bench/README.md); precision='auto' or 'fp32' runs fp32 on CPUs",
        UserWarning,
        stacklevel=3,
    )


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"bf16" or "fp32": what ``precision`` means on ``device`` (warns once if bf16 would be emulated)."""
    if check_precision(precision) == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and torch.device(device).type == "cpu" and emulated_bf16_cpu():
        _warn_emulated_bf16()
    return precision


def encoder_autocast(precision: str, device: torch.device | str):
    """The autocast context for the encoders (a disabled one in fp32)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")
