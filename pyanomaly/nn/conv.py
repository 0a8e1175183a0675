"""The 2-D convolution the encoders use: ``nn.Conv2d`` minus a stride that changes nothing.

torch 2.13's CPU bf16 convolution backward returns garbage weight gradients (NaN, inf or values
near 1e36 in the taps that see only padding) for a stride-2 conv over a map one pixel wide: 3x3 and
7x7 kernels, inputs 1x1 and 2x1, every trial on a 2-core AMX Xeon; fp32, stride 1 and wider maps
are exact (``results/bf16_cpu_nan.py``). CPC-AD's encoders meet such maps on small sub-patches
(8 px through the fast stem), ResNets on small images.

Along an axis where the input has size 1 and a stride-1 conv also gives size 1, the stride does
not change which taps meet the input, so :class:`StrideSafeConv2d` drops it there: the same output
and the same gradients by construction, on every device and dtype, with the same parameters (a
state dict of ``nn.Conv2d`` loads unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StrideSafeConv2d"]


class StrideSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs at stride 1 along a size-1 axis whose output is size 1 either way."""

    def _stride_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The stride to run with on an input of spatial ``size`` (H, W)."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self.stride
        return tuple(
            1 if n == 1 and n + 2 * p - d * (k - 1) == 1 else s
            for n, s, p, d, k in zip(size, self.stride, self.padding, self.dilation, self.kernel_size)
        )

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'), as ``nn.Conv2d``."""
        stride = self._stride_for(tuple(input.shape[-2:]))
        if stride == self.stride:
            return super()._conv_forward(input, weight, bias)
        return F.conv2d(input, weight, bias, stride, self.padding, self.dilation, self.groups)
