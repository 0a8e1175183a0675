"""Overlapping-patch extraction and its inverse, the score fold.

``extract_patches`` cuts (B, C, H, W) images into overlapping patches (optionally a second level of
sub-patches, CPC-AD's 256/128 then 64/32 scheme) while converting uint8 to float, converting RGB to
gray, normalising and flipping, in one pass that never builds anything larger than its output.
``fold_patches`` averages per-patch scores back onto pixels (CPC-AD's segmentation map).

Both have a pure-PyTorch ``*_ref`` beside them: the test oracle and the fallback when the compiled
kernels are unavailable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyanomaly import _ext
from pyanomaly.ops._utils import IntPair, pair, require_finite

__all__ = ["extract_patches", "extract_patches_ref", "fold_patches", "fold_patches_ref", "LUMA_WEIGHTS"]

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INPUT_DTYPES = (torch.uint8, *_FLOATING)


class _PatchArgs:
    """Validated arguments of ``extract_patches`` (shared by the fused op and the reference)."""

    def __init__(self, images, size, stride, sub_size, sub_stride, grayscale, mean, std, hflip, dtype):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype not in _INPUT_DTYPES:
            raise TypeError(
                f"images must be uint8, float16, bfloat16, float32 or float64, got {images.dtype}"
            )
        batch, channels, height, width = images.shape
        self.size = pair(size, "size")
        self.stride = pair(stride, "stride")
        for axis, extent in enumerate((height, width)):
            if self.size[axis] > extent:
                raise ValueError(
                    f"size {self.size} is larger than the images ({height}, {width}): "
                    "patches must fit inside the image"
                )
        if (sub_size is None) != (sub_stride is None):
            raise ValueError("sub_size and sub_stride must be given together")
        self.sub_size = pair(sub_size, "sub_size") if sub_size is not None else None
        self.sub_stride = pair(sub_stride, "sub_stride") if sub_stride is not None else None
        if self.sub_size is not None and (self.sub_size[0] > self.size[0] or self.sub_size[1] > self.size[1]):
            raise ValueError(f"sub_size {self.sub_size} must not exceed size {self.size}")
        if channels == 0:
            raise ValueError("images must have at least one channel")
        if grayscale and channels not in (1, 3):
            raise ValueError(f"grayscale=True needs images with 1 or 3 channels, got {channels}")
        self.grayscale = bool(grayscale) and channels == 3
        self.out_channels = 1 if grayscale else channels
        self.mean = _channel_values(mean, "mean", self.out_channels)
        self.std = _channel_values(std, "std", self.out_channels)
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError(f"std must not contain zeros, got {self.std}")
        if hflip is not None:
            if not isinstance(hflip, torch.Tensor) or hflip.dtype != torch.bool or hflip.shape != (batch,):
                if isinstance(hflip, torch.Tensor):
                    got = f"{hflip.dtype} of shape {tuple(hflip.shape)}"
                else:
                    got = type(hflip).__name__
                raise ValueError(f"hflip must be a bool tensor of shape ({batch},), got {got}")
            if hflip.device != images.device:
                raise ValueError(f"hflip must be on the images' device {images.device}, got {hflip.device}")
        self.hflip = hflip
        if dtype is None:
            dtype = torch.float32 if images.dtype == torch.uint8 else images.dtype
        if dtype not in _FLOATING:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        self.dtype = dtype

    def grid(self, extent: tuple[int, int]) -> tuple[int, int]:
        return tuple((e - s) // t + 1 for e, s, t in zip(extent, self.size, self.stride))

    def output_shape(self, images: torch.Tensor) -> tuple[int, ...]:
        batch = images.shape[0]
        nh, nw = self.grid(tuple(images.shape[2:]))
        if self.sub_size is None:
            return (batch, nh, nw, self.out_channels, *self.size)
        mh, mw = ((s - u) // t + 1 for s, u, t in zip(self.size, self.sub_size, self.sub_stride))
        return (batch, nh, nw, mh, mw, self.out_channels, *self.sub_size)


def _channel_values(values, name: str, channels: int) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif isinstance(values, (int, float)):
        values = [values]
    values = tuple(float(v) for v in values)
    if len(values) == 1 and channels > 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name} must have one value per output channel ({channels}), got {len(values)}")
    return values


def extract_patches_ref(
    images: torch.Tensor,
    size: IntPair,
    stride: IntPair,
    *,
    sub_size: IntPair | None = None,
    sub_stride: IntPair | None = None,
    grayscale: bool = False,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    hflip: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`extract_patches`: convert, gray, normalise, flip, unfold."""
    args = _PatchArgs(images, size, stride, sub_size, sub_stride, grayscale, mean, std, hflip, dtype)
    compute = torch.float64 if args.dtype == torch.float64 else torch.float32
    x = images.to(compute)
    if images.dtype == torch.uint8:
        x = x / 255.0
    if args.grayscale:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=compute, device=x.device)
        x = (x * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
    if args.mean is not None:
        x = x - torch.tensor(args.mean, dtype=compute, device=x.device).view(1, -1, 1, 1)
    if args.std is not None:
        x = x / torch.tensor(args.std, dtype=compute, device=x.device).view(1, -1, 1, 1)
    if args.hflip is not None:
        x = torch.where(args.hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    p = x.unfold(2, args.size[0], args.stride[0]).unfold(3, args.size[1], args.stride[1])  # B C nh nw sh sw
    if args.sub_size is None:
        p = p.permute(0, 2, 3, 1, 4, 5)
    else:
        p = p.unfold(4, args.sub_size[0], args.sub_stride[0]).unfold(5, args.sub_size[1], args.sub_stride[1])
        p = p.permute(0, 2, 3, 4, 5, 1, 6, 7)  # B nh nw mh mw C ph pw
    return p.contiguous().to(args.dtype)


def extract_patches(
    images: torch.Tensor,
    size: IntPair,
    stride: IntPair,
    *,
    sub_size: IntPair | None = None,
    sub_stride: IntPair | None = None,
    grayscale: bool = False,
    mean: Sequence[float] | torch.Tensor | None = None,
    std: Sequence[float] | torch.Tensor | None = None,
    hflip: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Cut images into overlapping patches (and optionally sub-patches) in one fused pass.

    uint8 input is scaled to [0, 1]; then optional BT.601 gray conversion, per-output-channel
    ``(x - mean) / std``, and a horizontal flip of the images selected by ``hflip``.

    Args:
        images: (B, C, H, W) uint8 or floating, any strides (channels-last included).
        size, stride: patch size and stride, an int or an (h, w) pair.
        sub_size, sub_stride: when given, each patch is cut again into sub-patches.
        grayscale: convert RGB to one luma channel (one-channel input passes through).
        mean, std: per-output-channel normalisation (one value is broadcast).
        hflip: (B,) bool, flip those images horizontally before cutting.
        dtype: output dtype (default float32 for uint8 input, else the input's dtype).
        check_finite: raise a ValueError when floating ``images`` hold NaN/inf (one read of the
            input, small beside the patches written; skipped while torch.compile traces).

    Returns:
        (B, nh, nw, C', size_h, size_w), or with sub-patches
        (B, nh, nw, mh, mw, C', sub_h, sub_w), where nh = (H - size_h) // stride_h + 1 and
        mh = (size_h - sub_h) // sub_stride_h + 1. Differentiable for floating input.
    """
    args = _PatchArgs(images, size, stride, sub_size, sub_stride, grayscale, mean, std, hflip, dtype)
    if check_finite:
        require_finite(images=images)
    if not _ext.has_kernels(images.device):
        return extract_patches_ref(
            images, size, stride, sub_size=sub_size, sub_stride=sub_stride, grayscale=grayscale,
            mean=mean, std=std, hflip=hflip, dtype=dtype,
        )
    return torch.ops.pyanomaly.extract_patches(
        images, list(args.size), list(args.stride), list(args.sub_size or ()), list(args.sub_stride or ()),
        args.grayscale, _as_list(args.mean), _as_list(args.std), args.hflip, args.dtype,
    )


def _check_fold_args(scores, size, stride, output_size):
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() not in (3, 4):
        raise ValueError(
            f"scores must have shape (B, nh, nw) or (B, nh, nw, C), got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    size, stride, output_size = pair(size, "size"), pair(stride, "stride"), pair(output_size, "output_size")
    for axis in range(2):
        n = scores.shape[1 + axis]
        if n < 1:
            raise ValueError(
                f"scores must have at least one patch along each axis, got shape {tuple(scores.shape)}"
            )
        if (n - 1) * stride[axis] + size[axis] > output_size[axis]:
            raise ValueError(
                f"{n} patches of size {size[axis]} at stride {stride[axis]} do not fit in output_size "
                f"{output_size} along axis {axis}"
            )
    return size, stride, output_size


def fold_patches_ref(
    scores: torch.Tensor, size: IntPair, stride: IntPair, output_size: IntPair, *, reduce: str = "mean"
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`fold_patches`: a loop of window additions."""
    size, stride, output_size = _check_fold_args(scores, size, stride, output_size)
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    squeeze = scores.dim() == 3
    values = scores.unsqueeze(-1) if squeeze else scores  # B nh nw C
    batch, nh, nw, channels = values.shape
    total = values.new_zeros(batch, channels, *output_size)
    count = values.new_zeros(1, 1, *output_size)
    for i in range(nh):
        for j in range(nw):
            y, x = i * stride[0], j * stride[1]
            window = (Ellipsis, slice(y, y + size[0]), slice(x, x + size[1]))
            total[window] = total[window] + values[:, i, j, :, None, None]
            count[window] += 1
    out = total / count.clamp(min=1) if reduce == "mean" else total
    return out[:, 0] if squeeze else out


def fold_patches(
    scores: torch.Tensor, size: IntPair, stride: IntPair, output_size: IntPair, *, reduce: str = "mean"
) -> torch.Tensor:
    """Spread per-patch values back onto pixels: each pixel gets the mean (or sum) of its patches.

    Args:
        scores: (B, nh, nw) or (B, nh, nw, C) per-patch values.
        size, stride: the patch geometry that produced the grid.
        output_size: (H, W) of the map; pixels no patch covers are 0.
        reduce: "mean" or "sum".

    Returns:
        (B, H, W) or (B, C, H, W). Computed per output pixel (deterministic), differentiable.
    """
    size, stride, output_size = _check_fold_args(scores, size, stride, output_size)
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if not _ext.has_kernels(scores.device):
        return fold_patches_ref(scores, size, stride, output_size, reduce=reduce)
    squeeze = scores.dim() == 3
    values = scores.unsqueeze(-1) if squeeze else scores
    out = torch.ops.pyanomaly.fold_patches(
        values, list(size), list(stride), list(output_size), reduce == "mean"
    )
    return out[:, 0] if squeeze else out


def _as_list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


def _extract_output_shape(images_shape, size, stride, sub_size, sub_stride, grayscale) -> list:
    batch, channels, height, width = images_shape
    nh, nw = (height - size[0]) // stride[0] + 1, (width - size[1]) // stride[1] + 1
    out_channels = 1 if grayscale else channels
    if not sub_size:
        return [batch, nh, nw, out_channels, size[0], size[1]]
    mh, mw = (size[0] - sub_size[0]) // sub_stride[0] + 1, (size[1] - sub_size[1]) // sub_stride[1] + 1
    return [batch, nh, nw, mh, mw, out_channels, sub_size[0], sub_size[1]]


def _register_kernels() -> None:
    """Fake kernels and autograd formulas of the compiled ops (only when they are loaded)."""

    @torch.library.register_fake("pyanomaly::extract_patches")
    def _extract_fake(images, size, stride, sub_size, sub_stride, grayscale, mean, std, hflip, dtype):
        torch._check(images.dim() == 4, lambda: f"images must have shape (B, C, H, W), got {images.shape}")
        torch._check(
            size[0] <= images.shape[2] and size[1] <= images.shape[3],
            lambda: f"size {size} must not exceed the images' (H, W) {tuple(images.shape[2:])}",
        )
        shape = _extract_output_shape(images.shape, size, stride, sub_size, sub_stride, grayscale)
        return images.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("pyanomaly::extract_patches_backward")
    def _extract_backward_fake(
        grad, images_shape, images_dtype, size, stride, sub_size, sub_stride, grayscale, std, hflip
    ):
        return grad.new_empty(images_shape, dtype=images_dtype)

    @torch.library.register_fake("pyanomaly::fold_patches")
    def _fold_fake(values, size, stride, output_size, mean):
        torch._check(values.dim() == 4, lambda: f"values must have shape (B, nh, nw, C), got {values.shape}")
        return values.new_empty(values.shape[0], values.shape[3], output_size[0], output_size[1])

    @torch.library.register_fake("pyanomaly::fold_patches_backward")
    def _fold_backward_fake(grad, size, stride, grid, mean):
        torch._check(grad.dim() == 4, lambda: f"grad must have shape (B, C, H, W), got {grad.shape}")
        return grad.new_empty(grad.shape[0], grid[0], grid[1], grad.shape[1])

    # extract_patches: the backward is the overlap-add (scaled by 1/std and the luma weights); the
    # backward of that linear map is extract_patches again, without mean.
    def _extract_setup(ctx, inputs, output):
        images, size, stride, sub_size, sub_stride, grayscale, _mean, std, hflip, _dtype = inputs
        ctx.images_shape = list(images.shape)
        ctx.images_dtype = images.dtype
        ctx.geometry = (size, stride, sub_size, sub_stride, grayscale, std)
        ctx.save_for_backward(hflip)

    def _extract_backward(ctx, grad):
        (hflip,) = ctx.saved_tensors
        grad_images = None
        if ctx.needs_input_grad[0]:
            size, stride, sub_size, sub_stride, grayscale, std = ctx.geometry
            grad_images = torch.ops.pyanomaly.extract_patches_backward(
                grad, ctx.images_shape, ctx.images_dtype, size, stride, sub_size, sub_stride, grayscale, std,
                hflip,
            )
        return grad_images, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "pyanomaly::extract_patches", _extract_backward, setup_context=_extract_setup
    )

    def _extract_backward_setup(ctx, inputs, output):
        grad, _shape, _dtype, size, stride, sub_size, sub_stride, grayscale, std, hflip = inputs
        ctx.grad_dtype = grad.dtype
        ctx.geometry = (size, stride, sub_size, sub_stride, grayscale, std)
        ctx.save_for_backward(hflip)

    def _extract_backward_backward(ctx, grad_grad_images):
        (hflip,) = ctx.saved_tensors
        grad_grad = None
        if ctx.needs_input_grad[0]:
            size, stride, sub_size, sub_stride, grayscale, std = ctx.geometry
            grad_grad = torch.ops.pyanomaly.extract_patches(
                grad_grad_images, size, stride, sub_size, sub_stride, grayscale, None, std, hflip,
                ctx.grad_dtype,
            )
        return grad_grad, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd(
        "pyanomaly::extract_patches_backward",
        _extract_backward_backward,
        setup_context=_extract_backward_setup,
    )

    # fold_patches and its backward are each other's adjoints.
    def _fold_setup(ctx, inputs, output):
        values, size, stride, _output_size, mean = inputs
        ctx.args = (size, stride, [values.shape[1], values.shape[2]], mean)

    def _fold_backward(ctx, grad):
        size, stride, grid, mean = ctx.args
        grad_values = torch.ops.pyanomaly.fold_patches_backward(grad, size, stride, grid, mean)
        return grad_values, None, None, None, None

    torch.library.register_autograd("pyanomaly::fold_patches", _fold_backward, setup_context=_fold_setup)

    def _fold_backward_setup(ctx, inputs, output):
        grad, size, stride, _grid, mean = inputs
        ctx.args = (size, stride, [grad.shape[2], grad.shape[3]], mean)

    def _fold_backward_backward(ctx, grad_grad_values):
        size, stride, output_size, mean = ctx.args
        grad_grad = torch.ops.pyanomaly.fold_patches(grad_grad_values, size, stride, output_size, mean)
        return grad_grad, None, None, None, None

    torch.library.register_autograd(
        "pyanomaly::fold_patches_backward", _fold_backward_backward, setup_context=_fold_backward_setup
    )


if _ext.has_kernels():
    _register_kernels()
