"""Pre-activation ResNet encoder without BatchNorm, as in Greedy InfoMax (CPC-AD's encoder).

Greedy InfoMax (loeweX/Greedy_InfoMax, vision ``PreActBlockNoBN``): every block is
``relu -> conv3x3(stride) -> relu -> conv3x3`` plus a shortcut that is the identity, or a 1x1
conv (applied to the activated input) when the stride or the width changes; convs have a bias;
there is no normalisation at all, so a sub-patch's embedding does not depend on its batch (which
is what lets CPC-AD's ``grid`` layout reuse one encoding per distinct sub-patch).

Two stems:

* ``"gim"``: a 5x5 conv at stride 1 (Greedy InfoMax). Faithful, but every later layer runs at the
  full sub-patch resolution: about 1.68 G multiply-adds per 64x64 sub-patch for ResNet-18 v2 up to
  stage 3.
* ``"fast"``: the standard ResNet stem, 7x7 conv at stride 2 then 3x3 max-pool at stride 2:
  about 0.11 G multiply-adds per 64x64 sub-patch (15x cheaper; lineage-notes measurement).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyanomaly.nn.conv import StrideSafeConv2d

__all__ = ["PreActBlockNoBN", "PreActResNetEncoder", "STEMS"]

STEMS = ("gim", "fast")


class PreActBlockNoBN(nn.Module):
    """Pre-activation basic block without normalisation (Greedy InfoMax's ``PreActBlockNoBN``).

    Args:
        in_channels: input width.
        out_channels: output width.
        stride: stride of the first 3x3 conv (and of the 1x1 shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = StrideSafeConv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = StrideSafeConv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.shortcut = (
            StrideSafeConv2d(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        out = F.relu(x)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(out))
        return out + shortcut


class PreActResNetEncoder(nn.Module):
    """Pre-activation ResNet (v2) without BatchNorm, average-pooled to one vector per input.

    The defaults are "ResNet-18 v2 up to the third residual stage" as Greedy InfoMax builds it:
    three stages of two basic blocks, widths 64/128/256, strides 1/2/2.

    Args:
        in_channels: input channels (1 for CPC-AD's grayscale input).
        widths: output width of each stage.
        blocks: number of basic blocks in each stage.
        strides: stride of the first block of each stage.
        stem: ``"gim"`` (5x5 conv, stride 1, width ``widths[0]``) or ``"fast"`` (7x7 conv stride 2
            plus 3x3 max-pool stride 2: 15x fewer multiply-adds, see the module docstring).

    Shapes:
        forward: (N, in_channels, h, w) -> (N, widths[-1]).
        feature_map: (N, in_channels, h, w) -> (N, widths[-1], h', w').
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256),
        blocks: Sequence[int] = (2, 2, 2),
        strides: Sequence[int] = (1, 2, 2),
        stem: str = "gim",
    ) -> None:
        super().__init__()
        widths, blocks, strides = tuple(int(w) for w in widths), tuple(int(b) for b in blocks), tuple(strides)
        if not (len(widths) == len(blocks) == len(strides)) or not widths:
            raise ValueError(
                "widths, blocks and strides must have the same non-zero length, "
                f"got {widths}, {blocks}, {strides}"
            )
        if min(widths) < 1 or min(blocks) < 1 or min(int(s) for s in strides) < 1:
            raise ValueError(f"widths, blocks and strides must be >= 1, got {widths}, {blocks}, {strides}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if stem == "gim":
            self.stem = StrideSafeConv2d(in_channels, widths[0], 5, stride=1, padding=2)
        else:
            self.stem = nn.Sequential(
                StrideSafeConv2d(in_channels, widths[0], 7, stride=2, padding=3),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        layers: list[nn.Module] = []
        channels = widths[0]
        for width, count, stride in zip(widths, blocks, strides):
            for index in range(count):
                layers.append(PreActBlockNoBN(channels, width, int(stride) if index == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels
        #: Recompute each residual block's activations in the backward instead of keeping them
        #: (``torch.utils.checkpoint``; training only): peak memory down to about one block's worth
        #: plus the block inputs, for one extra forward. Exact: the encoder has no normalisation
        #: or randomness.
        self.checkpoint_activations = False

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, D, h', w') before pooling."""
        x = self.stem(x)
        if not (self.checkpoint_activations and self.training and torch.is_grad_enabled()):
            return self.layers(x)
        from torch.utils.checkpoint import checkpoint

        for block in self.layers:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, D): the average-pooled feature map."""
        return self.feature_map(x).mean(dim=(2, 3))
