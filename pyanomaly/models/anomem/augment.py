"""Batch-wise SimCLR augmentations on the model's device (no per-image Python loop, no PIL).

Each image of a batch draws its own parameters from one ``torch.Generator`` (on the images'
device), so a seeded run is reproducible. The pipeline follows SimCLR (Chen et al., 2020) as the
AnoMem paper asks: random resized crop, horizontal flip, brightness / contrast / saturation jitter,
optional random grayscale, Gaussian blur, plus additive Gaussian noise. :func:`simclr_view` also returns where each view's crop
lies in the source image, so positions of two views can be matched (:func:`matching_points`).

Images are float (B, C, H, W) in [0, 1]; C is 1 or 3 (saturation does nothing on gray images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "CropParams", "all_quarter_turns", "matching_points", "random_quarter_turns", "simclr_view"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (SimCLR's CIFAR-10 settings unless noted).

    Attributes:
        crop_scale: range of the crop's area fraction (SimCLR uses (0.08, 1); 0.2 is the usual
            CIFAR lower bound, as in SimCLR's CIFAR code and CSI).
        crop_ratio: range of the crop's aspect ratio (SimCLR: 3/4 to 4/3).
        flip_p: probability of a horizontal flip (SimCLR: 0.5).
        jitter_p: probability of applying the colour jitter (SimCLR: 0.8).
        brightness, contrast, saturation: jitter strengths, factor in [1 - s, 1 + s] (SimCLR with
            colour strength 0.5: 0.4 each).
        grayscale_p: probability of converting a colour view to gray (SimCLR: 0.2; default 0.0,
            this project's behaviour before the option existed, kept until a measurement on CIFAR-10
            decides, see results/anomem.md).
        blur_p: probability of a Gaussian blur (SimCLR: 0.5).
        blur_sigma: range of the blur's sigma in pixels (SimCLR: 0.1 to 2.0).
        noise_p: probability of additive Gaussian noise (AnoMem adds noise; strength is our choice).
        noise_std: the noise's standard deviation is drawn in [0, noise_std].
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.0
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_p: float = 0.5
    noise_std: float = 0.05


@dataclass
class CropParams:
    """Where each view's crop lies in its source image, in normalised [-1, 1] coordinates.

    Attributes:
        center: (B, 2) crop centre (x, y).
        half: (B, 2) crop half-size (x, y), in (0, 1].
        flip: (B,) bool, True where the view is mirrored.
    """

    center: torch.Tensor
    half: torch.Tensor
    flip: torch.Tensor

    def to_view(self, points: torch.Tensor) -> torch.Tensor:
        """Source-image points (B, K, 2) -> the same points in view coordinates (B, K, 2)."""
        sign = torch.where(self.flip, -1.0, 1.0).to(points.dtype)
        scale = self.half.to(points.dtype)[:, None, :] * torch.stack(
            [sign, torch.ones_like(sign)], dim=-1
        )[:, None, :]
        return (points - self.center.to(points.dtype)[:, None, :]) / scale


#: ``part`` = (first row, total rows): the batch is rows [first, first + B) of a larger one
#: (distributed training: the global batch); every draw is made for all ``total`` rows and sliced,
#: so an image's augmentation does not depend on how the batch is split. None: the batch itself.
Part = tuple[int, int] | None


def _draw(sample, batch: int, part: Part, *shape, generator: torch.Generator, device, **kwargs) -> torch.Tensor:
    """``sample((rows, *shape))`` for this batch's ``batch`` rows of ``part`` (see :data:`Part`)."""
    first, total = part if part is not None else (0, batch)
    return sample((total, *shape), generator=generator, device=device, **kwargs)[first : first + batch]


def _rand(batch: int, part, *shape, generator: torch.Generator, device) -> torch.Tensor:
    return _draw(torch.rand, batch, part, *shape, generator=generator, device=device)


def _uniform(batch: int, low: float, high: float, generator: torch.Generator, device, part=None) -> torch.Tensor:
    return low + (high - low) * _rand(batch, part, generator=generator, device=device)


def _random_crop(
    batch: int, config: AugmentConfig, generator: torch.Generator, device: torch.device, part=None
) -> CropParams:
    area = _uniform(batch, *config.crop_scale, generator, device, part)
    low, high = math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])
    log_ratio = _uniform(batch, low, high, generator, device, part)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    half = torch.stack([width, height], dim=-1)
    # centre uniformly among positions that keep the crop inside the image
    center = (1 - half) * (2 * _rand(batch, part, 2, generator=generator, device=device) - 1)
    flip = _rand(batch, part, generator=generator, device=device) < config.flip_p
    return CropParams(center=center, half=half, flip=flip)


def _gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _jitter(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator, part=None) -> torch.Tensor:
    batch, device = images.shape[0], images.device
    apply = (_rand(batch, part, generator=generator, device=device) < config.jitter_p).view(-1, 1, 1, 1)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(batch, max(0.0, 1 - strength), 1 + strength, generator, device, part).view(-1, 1, 1, 1)
        return torch.where(apply, f, torch.ones_like(f))

    out = (images * factor(config.brightness)).clamp(0, 1)
    mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * factor(config.contrast) + mean).clamp(0, 1)
    gray = _gray(out)
    out = ((out - gray) * factor(config.saturation) + gray).clamp(0, 1)
    return out


def _random_gray(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator, part=None) -> torch.Tensor:
    if images.shape[1] == 1 or config.grayscale_p <= 0:
        return images
    apply = _rand(images.shape[0], part, generator=generator, device=images.device) < config.grayscale_p
    return torch.where(apply.view(-1, 1, 1, 1), _gray(images).expand_as(images), images)


def _blur(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator, part=None) -> torch.Tensor:
    batch, channels, height, width = images.shape
    device = images.device
    # kernel about 10% of the image side, odd, at least 3 (SimCLR)
    size = max(3, int(0.1 * min(height, width)) | 1)
    sigma = _uniform(batch, *config.blur_sigma, generator, device, part)
    apply = _rand(batch, part, generator=generator, device=device) < config.blur_p
    offsets = torch.arange(size, device=device, dtype=images.dtype) - size // 2
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None].to(images.dtype) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = torch.zeros_like(kernel)
    identity[:, size // 2] = 1
    kernel = torch.where(apply[:, None], kernel, identity)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, k)
    pad = size // 2
    x = images.reshape(1, batch * channels, height, width)
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect" if width > pad else "replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=batch * channels)
    x = F.pad(x, (0, 0, pad, pad), mode="reflect" if height > pad else "replicate")
    x = F.conv2d(x, kernel[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def _noise(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator, part=None) -> torch.Tensor:
    batch, device = images.shape[0], images.device
    std = _uniform(batch, 0.0, config.noise_std, generator, device, part)
    std = torch.where(_rand(batch, part, generator=generator, device=device) < config.noise_p, std, 0.0)
    noise = _draw(torch.randn, batch, part, *images.shape[1:], generator=generator, device=device, dtype=images.dtype)
    return (images + std.view(-1, 1, 1, 1).to(images.dtype) * noise).clamp(0, 1)


def random_quarter_turns(images: torch.Tensor, generator: torch.Generator, part=None) -> torch.Tensor:
    """Each image of a square batch (B, C, S, S) turned by its own random multiple of 90 degrees.

    Distribution augmentation (Sohn et al., 2021, "Learning and evaluating representations for deep
    one-class classification"): applied to a training image *before* its two views are drawn, so
    both views share the turn and a turned image is a new instance, not a positive of the upright
    one. The upright class then fills only part of the feature sphere instead of all of it.
    ``part``: see :data:`Part`.
    """
    turns = _draw(lambda shape, **kw: torch.randint(0, 4, shape, **kw), images.shape[0], part,
                  generator=generator, device=images.device)
    out = images.clone()
    for k in (1, 2, 3):
        chosen = turns == k
        if bool(chosen.any()):
            out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


def all_quarter_turns(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A square batch (B, C, S, S) in all four quarter turns -> (4B, C, S, S) images, turn k of
    image i at row k * B + i, and their (4B,) int64 turns (the rotation pretext task's input, as
    RotNet feeds it: every turn of every image in one batch)."""
    turned = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return turned, torch.arange(4, device=images.device).repeat_interleave(images.shape[0])


def simclr_view(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator, part=None
) -> tuple[torch.Tensor, CropParams]:
    """One augmented view of each image, at the input size.

    Args:
        images: float (B, C, H, W) in [0, 1], on the generator's device.
        config: augmentation strengths.
        generator: source of every random draw.
        part: (first row, total rows) when ``images`` are rows of a larger batch (see :data:`Part`).

    Returns:
        (view (B, C, H, W) in [0, 1], crop parameters of each view).
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    batch = images.shape[0]
    crop = _random_crop(batch, config, generator, images.device, part)
    sign = torch.where(crop.flip, -1.0, 1.0).to(images.dtype)
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = crop.half[:, 0].to(images.dtype) * sign
    theta[:, 1, 1] = crop.half[:, 1].to(images.dtype)
    theta[:, :, 2] = crop.center.to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    view = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = _jitter(view, config, generator, part)
    view = _random_gray(view, config, generator, part)
    view = _blur(view, config, generator, part)
    view = _noise(view, config, generator, part)
    return view, crop


def matching_points(
    first: CropParams, second: CropParams, count: int, generator: torch.Generator, part=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random source points per image seen by both views, in each view's coordinates.

    Points are drawn uniformly in the intersection of the two crops; where the crops do not
    overlap, the same view-relative positions are used in both views.

    Returns:
        (points in the first view, points in the second view), each (B, count, 2) in [-1, 1].
    """
    low = torch.maximum(first.center - first.half, second.center - second.half)
    high = torch.minimum(first.center + first.half, second.center + second.half)
    overlap = (high > low).all(dim=-1)
    batch, device = first.center.shape[0], first.center.device
    u = _rand(batch, part, count, 2, generator=generator, device=device)
    source = low[:, None, :] + u * (high - low).clamp(min=0)[:, None, :]
    in_first, in_second = first.to_view(source), second.to_view(source)
    fallback = 2 * u - 1
    in_first = torch.where(overlap[:, None, None], in_first, fallback).clamp(-1, 1)
    in_second = torch.where(overlap[:, None, None], in_second, fallback).clamp(-1, 1)
    return in_first, in_second
