"""Resizing lists of variable-size images and masks into fixed-size batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F

__all__ = ["stack_resized", "resize_masks"]

Size = Union[int, Sequence[int]]


def _parse_size(size: Size) -> tuple[int, int]:
    """Returns (height, width) from an int or a (height, width) pair."""
    if isinstance(size, bool):
        raise ValueError(f"size must be a positive int or a (height, width) pair, got {size!r}")
    if isinstance(size, int):
        pair = (size, size)
    elif (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) for side in size)
    ):
        pair = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be a positive int or a (height, width) pair of ints, got {size!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return pair


def _as_list(tensors: Sequence[torch.Tensor] | torch.Tensor, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return list(tensors.unbind(0)) if tensors.ndim > 0 else [tensors]
    if not isinstance(tensors, Sequence) or isinstance(tensors, (str, bytes)):
        raise ValueError(
            f"{name} must be a sequence of tensors or a batched tensor, got {type(tensors).__name__}"
        )
    if len(tensors) == 0:
        raise ValueError(f"{name} is empty")
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}[{index}] must be a torch.Tensor, got {type(tensor).__name__}")
    return list(tensors)


def stack_resized(images: Sequence[torch.Tensor] | torch.Tensor, size: Size) -> torch.Tensor:
    """Resizes uint8 images of varying sizes to one size and stacks them.

    Uses bilinear interpolation with antialiasing (``align_corners=False``),
    then rounds and clamps back to uint8. Images already at the target size
    are copied unchanged.

    Args:
        images: sequence of uint8 tensors (C, H_i, W_i) with the same C, or a
            uint8 tensor (N, C, H, W).
        size: output side ``s`` (square) or (height, width).

    Returns:
        uint8 tensor (N, C, height, width).
    """
    height, width = _parse_size(size)
    image_list = _as_list(images, "images")
    if not image_list:
        raise ValueError("images is empty")
    channels = None
    resized = []
    for index, image in enumerate(image_list):
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(
                f"images[{index}] must be a uint8 tensor (C, H, W), got dtype {image.dtype} "
                f"and shape {tuple(image.shape)}"
            )
        if channels is None:
            channels = image.shape[0]
        elif image.shape[0] != channels:
            raise ValueError(
                f"images[{index}] has {image.shape[0]} channels but images[0] has {channels}; "
                f"load all images with the same grayscale setting"
            )
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"images[{index}] is empty, shape {tuple(image.shape)}")
        if tuple(image.shape[1:]) == (height, width):
            resized.append(image.clone())
            continue
        scaled = F.interpolate(
            image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )[0]
        resized.append(scaled.round_().clamp_(0, 255).to(torch.uint8))
    return torch.stack(resized)


def resize_masks(masks: Sequence[torch.Tensor] | torch.Tensor, size: Size) -> torch.Tensor:
    """Resizes boolean masks of varying sizes with nearest-neighbour and stacks them.

    Uses ``nearest-exact`` (pixel-centre aligned, like Pillow's NEAREST), so a
    mask and its image stay aligned after :func:`stack_resized`. Note that
    downscaling may drop defects thinner than the sampling step.

    Args:
        masks: sequence of bool tensors (H_i, W_i), or a bool tensor (N, H, W).
        size: output side ``s`` (square) or (height, width).

    Returns:
        bool tensor (N, height, width).
    """
    height, width = _parse_size(size)
    mask_list = _as_list(masks, "masks")
    if not mask_list:
        raise ValueError("masks is empty")
    resized = []
    for index, mask in enumerate(mask_list):
        if mask.dtype != torch.bool or mask.ndim != 2:
            raise ValueError(
                f"masks[{index}] must be a bool tensor (H, W), got dtype {mask.dtype} "
                f"and shape {tuple(mask.shape)}"
            )
        if mask.shape[0] == 0 or mask.shape[1] == 0:
            raise ValueError(f"masks[{index}] is empty, shape {tuple(mask.shape)}")
        if tuple(mask.shape) == (height, width):
            resized.append(mask.clone())
            continue
        scaled = F.interpolate(mask[None, None].to(torch.uint8), size=(height, width), mode="nearest-exact")
        resized.append(scaled[0, 0].bool())
    return torch.stack(resized)
