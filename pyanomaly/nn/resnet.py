"""Standard ResNet-18 / ResNet-50 (He et al., 2016), written from scratch, with multi-scale outputs.

torchvision is not a dependency, so the two encoders are defined here. The layer layout and the
initialisation follow the paper and torchvision's reference implementation (v1.5: the stride of a
bottleneck sits on its 3x3 conv; Kaiming-normal convs; BatchNorm weight 1, bias 0). There is no
classification head: :meth:`ResNet.forward` returns the four stage outputs, so a model can tap the
scales it needs (AnoMem memorises the outputs of stages 3 and 4).

Two options beyond the standard network:

- ``small_input=True`` replaces the 7x7 stride-2 stem and its max pool by one 3x3 stride-1 conv
  (the usual CIFAR variant, as in SimCLR's CIFAR-10 experiments), so a 32x32 image gives stage
  maps of 32, 16, 8 and 4 pixels instead of 8, 4, 2 and 1.
- ``width`` scales every stage's channel count (64 is the standard network); small widths give
  tiny encoders for tests and CPU runs.

And ``checkpoint_activations``: recompute each residual block in the backward instead of keeping its
activations (``torch.utils.checkpoint``, training only). BatchNorm would update its running
statistics a second time in the recompute; :func:`_frozen_batchnorm_stats` keeps them as the
forward left them, so a checkpointed step gives the same gradients and the same buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from pyanomaly.nn.conv import StrideSafeConv2d

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Run ``module`` (in training mode) without changing its BatchNorm running statistics: the
    batch statistics still normalise, momentum 0 keeps the running mean and variance exactly, and
    the batch counter is put back."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> StrideSafeConv2d:
    return StrideSafeConv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34). Output channels = ``planes``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (ResNet-50). Output = 4 * ``planes``."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = StrideSafeConv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = StrideSafeConv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        StrideSafeConv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class ResNet(nn.Module):
    """A ResNet trunk returning its four stage outputs.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 4, 6, 3) for ResNet-50.
        in_channels: image channels (3 for RGB, 1 for gray).
        width: channels of the first stage's ``planes`` (64 in the standard network).
        small_input: 3x3 stride-1 stem without max pool (for 32x32 images) instead of 7x7/2 + pool.

    Attributes:
        stage_channels: output channels of stages 1..4.
        stage_strides: total downsampling factor at stages 1..4.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        in_channels: int = 3,
        width: int = 64,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {tuple(layers)}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if small_input:
            self.stem = nn.Sequential(
                _conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
            stem_stride = 1
        else:
            self.stem = nn.Sequential(
                StrideSafeConv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
            stem_stride = 4
        channels = width
        stages = []
        self.stage_channels: list[int] = []
        self.stage_strides: list[int] = []
        stride_total = stem_stride
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stride_total *= stride
            modules = []
            for b in range(int(blocks)):
                modules.append(block(channels, planes, stride if b == 0 else 1))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*modules))
            self.stage_channels.append(channels)
            self.stage_strides.append(stride_total)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        #: Recompute each residual block's activations in the backward (see the module docstring).
        self.checkpoint_activations = False
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, num_stages: int = 4) -> list[torch.Tensor]:
        """Images (B, C, H, W) -> the outputs of stages 1..``num_stages``, each (B, C_s, H_s, W_s)."""
        if x.ndim != 4:
            raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        outputs = []
        x = self.stem(x)
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:num_stages]:
            if recompute:
                from torch.utils.checkpoint import checkpoint

                for block in stage:
                    contexts = (lambda block=block: (contextlib.nullcontext(), _frozen_batchnorm_stats(block)))
                    x = checkpoint(block, x, use_reentrant=False, context_fn=contexts)
            else:
                x = stage(x)
            outputs.append(x)
        return outputs


def resnet18(*, in_channels: int = 3, width: int = 64, small_input: bool = False) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2); stage channels (64, 128, 256, 512) at width 64."""
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels=in_channels, width=width, small_input=small_input)


def resnet50(*, in_channels: int = 3, width: int = 64, small_input: bool = False) -> ResNet:
    """ResNet-50: bottlenecks (3, 4, 6, 3); stage channels (256, 512, 1024, 2048) at width 64."""
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels=in_channels, width=width, small_input=small_input)
