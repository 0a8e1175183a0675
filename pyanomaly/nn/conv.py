"""The 2-D convolution the encoders use: ``nn.Conv2d`` with two CPU-only changes of how, never of what.

**A stride that changes nothing is dropped.** torch 2.13's CPU bf16 convolution backward returns
garbage weight gradients (NaN, inf or values near 1e36 in the taps that see only padding) for a
stride-2 conv over a map one pixel wide: 3x3 and 7x7 kernels, inputs 1x1 and 2x1, every trial on a
2-core AMX Xeon; fp32, stride 1 and wider maps are exact (``results/bf16_cpu_nan.py``). CPC-AD's
encoders meet such maps on small sub-patches (8 px through the fast stem), ResNets on small
images. Along an axis where the input has size 1 and a stride-1 conv also gives size 1, the stride
does not change which taps meet the input, so :class:`StrideSafeConv2d` drops it there: the same
output and the same gradients by construction, on every device and dtype.

**A map no larger than the kernel is one matrix product.** On such a map every output pixel sees
most of the input, so the conv is a dense linear map from the (H, W, C_in) input to the
(H', W', C_out) output whose matrix holds the kernel taps (and zeros where a tap meets padding).
oneDNN runs these tiny maps far below the CPU's GEMM speed. Encoder fwd+bwd on one training step's
3600 sub-patches, 2-core AVX2 AMD EPYC, fp32 channels_last (``python -m bench.bench_conv``): the
``cpu`` preset's encoder (16 px sub-patches through the fast stem; stages on 4x4, 2x2 and 1x1 maps,
the last two now products) 433 -> 254 ms (1.7x); the README demo's (8 px, GIM stem) and issue 21's
256 px config 1.1x; the paper's geometry and a ResNet-18 on 64 px images (their maps stay large)
unchanged. The same sums in another order: equal to float rounding. The matrix holds
H·W·C_in x H'·W'·C_out entries, at most the conv's own multiply-adds per image (the kernel has at
least H·W taps), so its cost stays within the conv's. Maps larger than the kernel were slower this
way (a 4x4 map under a 3x3 kernel: twice the FLOPs). Eager CPU only: CUDA keeps cuDNN (not
measured there), and a graph being traced, exported or compiled keeps the plain conv (what ONNX
and torch.export record).

The parameters are those of ``nn.Conv2d``: its state dict loads unchanged.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pyanomaly.ops._utils import tracing

__all__ = ["MAX_DENSE_ENTRIES", "SMALL_MAPS_AS_MATMUL", "StrideSafeConv2d"]

#: Whether CPU convs over maps no larger than their kernel run as one matrix product (read at each
#: call; the benchmarks switch it off to time the earlier oneDNN path).
SMALL_MAPS_AS_MATMUL = True

#: The largest dense matrix (entries) the product path builds: its cached int64 index and the
#: gathered weights stay under 48 MB (a 3x3 conv of 512 channels on a 3x3 map would need 21M).
MAX_DENSE_ENTRIES = 1 << 22


def _output_size(size, stride, padding, dilation, kernel_size) -> tuple[int, int]:
    """(H', W') of a zero-padded conv over a (H, W) map (below 1: an empty output)."""
    geometry = zip(size, stride, padding, dilation, kernel_size)
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, s, p, d, k in geometry)


@functools.lru_cache(maxsize=256)
def _dense_taps(
    weight_shape: tuple[int, int, int, int],
    size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, int, int]:
    """Where each entry of the conv's dense matrix comes from in the flattened weight.

    Returns ``(index, H', W')``: ``index`` is int64 of shape (H'·W'·C_out, H·W·C_in), rows in
    (h', w', c_out) order and columns in (h, w, c_in) order (the channels-last flattening);
    ``C_out·C_in·kh·kw`` (one past the last weight) marks a zero, a tap that meets padding.
    """
    out_channels, in_channels, kernel_h, kernel_w = weight_shape
    height, width = size
    out_h, out_w = _output_size(size, stride, padding, dilation, (kernel_h, kernel_w))
    taps = torch.arange(out_channels * in_channels * kernel_h * kernel_w).view(weight_shape)
    shape = (out_h, out_w, out_channels, height, width, in_channels)
    index = torch.full(shape, taps.numel(), dtype=torch.long)
    # (output row, kernel row, input row) and likewise for columns; a tap meets the input where both do
    rows = [(i, a, i * stride[0] - padding[0] + a * dilation[0])
            for i in range(out_h) for a in range(kernel_h)]
    cols = [(j, b, j * stride[1] - padding[1] + b * dilation[1])
            for j in range(out_w) for b in range(kernel_w)]
    meets = [(i, j, y, x, a, b) for i, a, y in rows if 0 <= y < height for j, b, x in cols if 0 <= x < width]
    if meets:
        i, j, y, x, a, b = (torch.tensor(column) for column in zip(*meets))
        index[i, j, :, y, x, :] = taps[:, :, a, b].permute(2, 0, 1)
    return index.view(out_h * out_w * out_channels, height * width * in_channels), out_h, out_w


class StrideSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that drops a stride that changes nothing and, on CPU, runs a map no larger than
    its kernel as one matrix product (see the module docstring). Shapes as ``nn.Conv2d``."""

    def _stride_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The stride to run with on an input of spatial ``size`` (H, W)."""
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self.stride
        at_stride_1 = _output_size(size, (1, 1), self.padding, self.dilation, self.kernel_size)
        return tuple(1 if n == 1 and o == 1 else s for n, o, s in zip(size, at_stride_1, self.stride))

    def _runs_as_matmul(self, input: torch.Tensor) -> bool:
        """Whether ``input`` (N, C_in, H, W) runs as a matrix product: eager CPU, zero padding, one group,
        H·W <= kh·kw and a dense matrix of at most ``MAX_DENSE_ENTRIES``."""
        if not (
            SMALL_MAPS_AS_MATMUL
            and input.device.type == "cpu"
            and not tracing()  # exported and compiled graphs keep the plain conv
            and input.dim() == 4
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        ):
            return False
        height, width = input.shape[-2:]
        out_h, out_w = _output_size(
            (height, width), self.stride, self.padding, self.dilation, self.kernel_size
        )
        return (
            height * width <= self.kernel_size[0] * self.kernel_size[1]
            and out_h >= 1 and out_w >= 1  # an empty output: F.conv2d raises its own error
            and height * width * self.in_channels * out_h * out_w * self.out_channels <= MAX_DENSE_ENTRIES
        )

    def _dense_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W') in channels-last strides: the (N, H·W·C_in) input
        rows times the transposed dense (H'·W'·C_out, H·W·C_in) matrix."""
        size = (int(input.shape[-2]), int(input.shape[-1]))
        index, out_h, out_w = _dense_taps(tuple(weight.shape), size, self.stride, self.padding, self.dilation)
        dense = F.pad(weight.reshape(-1), (0, 1))[index]  # (H'·W'·C_out, H·W·C_in); the pad is the zero
        rows = input.permute(0, 2, 3, 1).reshape(input.shape[0], index.shape[1])  # a view if channels-last
        out = F.linear(rows, dense, None if bias is None else bias.repeat(out_h * out_w))
        return out.view(input.shape[0], out_h, out_w, weight.shape[0]).permute(0, 3, 1, 2)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'), as ``nn.Conv2d``."""
        if self._runs_as_matmul(input):
            return self._dense_forward(input, weight, bias)
        stride = self._stride_for(tuple(input.shape[-2:]))
        if stride == self.stride:
            return super()._conv_forward(input, weight, bias)
        return F.conv2d(input, weight, bias, stride, self.padding, self.dilation, self.groups)
