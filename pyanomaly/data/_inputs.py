"""``as_images``: every image input a user may hand a detector, turned into one list of tensors."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyanomaly.data._io import IMAGE_EXTENSIONS, list_image_files, load_image

__all__ = ["MODES", "as_images", "image_files"]

#: ``mode`` of :func:`as_images`: "gray" (1 channel), "rgb" (3) or None (each input's own).
MODES = ("gray", "rgb", None)
_GRAY_FILE_MODES = ("1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_GLOB_CHARS = set("*?[")


def image_files(spec: str | os.PathLike, *, what: str = "images", recursive: bool = False) -> list[Path]:
    """The image files a path names: a file, a folder (its images; with ``recursive`` also those in
    its subfolders, hidden ones skipped) or a glob pattern (``**`` recurses).

    Raises a FileNotFoundError / ValueError naming ``spec`` when it names no image.
    """
    text = os.fspath(spec)
    if _GLOB_CHARS & set(text) and not Path(text).exists():
        files = sorted(Path(p) for p in glob.glob(text, recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"{what}: the pattern {text!r} matches no image file")
        return files
    path = Path(text)
    if path.is_dir():
        if recursive:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise ValueError(f"{what} folder {path} (and its subfolders) holds no image file")
            return files
        return list_image_files(path, what=f"{what} folder")
    if not path.exists():
        raise FileNotFoundError(f"{what}: image file not found: {text}")
    return [path]


def as_images(
    data: Any, name: str = "images", *, mode: str | None = None, min_size: int = 1, allow_float: bool = False
) -> list[torch.Tensor]:
    """Every accepted image input -> a list of (C, H, W) tensors, C = 1 or 3.

    Accepted: a path (file, folder or glob pattern) or a list of paths; a PIL image; a numpy array
    HW, HWC, CHW, NHWC or NCHW; a torch tensor HW, CHW, HWC, NCHW or NHWC; a sequence or map-style
    dataset of any of these (items may be ``(image, label)`` tuples or have ``.image``, as
    ``MVTecDataset``'s do). Pixel values are uint8, or float in [0, 1]; an alpha channel is dropped.

    Args:
        data: the images.
        name: the argument named in errors (``images[3]``, or the file's path).
        mode: "gray": files read as luma, colour arrays converted (ITU-R 601-2, as Pillow's "L");
            "rgb": gray replicated to 3 channels; None: each input keeps its channels (gray and
            colour mixed: gray replicated).
        min_size: smallest side accepted (an error names the image otherwise).
        allow_float: keep float inputs as float32 in [0, 1]; otherwise they become uint8 (rounded).

    Returns:
        uint8 (or float32) (C, H, W) CPU tensors, one per image.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    items = _items(data, name)
    if not items:
        raise ValueError(f"{name} is empty (no image)")
    images = [_one(item, label, mode, allow_float) for item, label in items]
    if mode is None and len({image.shape[0] for image in images}) > 1:
        images = [image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image for image in images]
    if len({image.dtype for image in images}) > 1:  # uint8 and float mixed: all float
        images = [image.float() / 255.0 if image.dtype == torch.uint8 else image for image in images]
    for image, (_, label) in zip(images, items):
        if min(image.shape[1:]) < min_size:
            raise ValueError(
                f"{label} is {image.shape[1]}x{image.shape[2]} pixels; this detector needs at least "
                f"{min_size} px a side"
            )
    return images


def _items(data: Any, name: str) -> list[tuple[Any, str]]:
    """Flatten ``data`` into (single image, label for errors) pairs."""
    if isinstance(data, (str, os.PathLike)):
        return [(path, str(path)) for path in image_files(data, what=name)]
    if _is_pil(data):
        return [(data, name)]
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim == 4:
            return [(data[i], f"{name}[{i}]") for i in range(data.shape[0])]
        if data.ndim in (2, 3):
            return [(data, name)]
        raise ValueError(
            f"{name} must be an image (H, W), (C, H, W) / (H, W, C) or a batch (N, C, H, W) / (N, H, W, C), "
            f"got an array of shape {tuple(data.shape)}"
        )
    if isinstance(data, (bytes, dict)) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(
            f"{name} must be image paths, a folder, PIL images, numpy arrays, tensors or a dataset of them, "
            f"got {type(data).__name__}"
        )
    out: list[tuple[Any, str]] = []
    for index in range(len(data)):
        item = data[index]
        if hasattr(item, "image") and not isinstance(item, (np.ndarray, torch.Tensor)):
            label = str(getattr(item, "path", f"{name}[{index}]"))
            item = item.image
        else:
            if isinstance(item, tuple) and item and not isinstance(item[0], (int, float)):
                item = item[0]
            label = f"{name}[{index}]"
        if isinstance(item, (str, os.PathLike)):
            files = image_files(item, what=label)
            out.extend((path, str(path)) for path in files)
        elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
            raise ValueError(f"{label} is a batch of shape {tuple(item.shape)}; pass one image per item")
        else:
            out.append((item, label))
    return out


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def _one(item: Any, label: str, mode: str | None, allow_float: bool) -> torch.Tensor:
    """One image -> (C, H, W) uint8 / float32 tensor, C per ``mode``."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        grayscale = mode == "gray" if mode is not None else _file_is_gray(path)
        return load_image(path, grayscale=grayscale)
    if _is_pil(item):
        if item.mode in ("P", "PA", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F", "1", "CMYK", "YCbCr", "HSV", "LAB"):
            item = item.convert("RGBA" if item.mode in ("P", "PA") else "L" if item.mode in ("LA", "1") else
                                "RGB" if item.mode in ("CMYK", "YCbCr", "HSV", "LAB") else item.mode)
        if item.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            raise ValueError(f"{label}: a PIL image of mode {item.mode} has no 8-bit range; convert it or pass the file path")
        item = np.asarray(item)
        layout = "HWC"
    elif isinstance(item, np.ndarray):
        layout = "HWC"
    elif isinstance(item, torch.Tensor):
        layout = "CHW"
    else:
        raise TypeError(
            f"{label} must be an image path, a PIL image, a numpy array or a tensor, got {type(item).__name__}"
        )
    tensor = torch.from_numpy(np.array(item)) if isinstance(item, np.ndarray) else item.detach().cpu()
    tensor = _to_chw(tensor, label, layout)
    tensor = _to_pixels(tensor, label, allow_float)
    if tensor.shape[0] == 4:
        tensor = tensor[:3]
    if mode == "gray" and tensor.shape[0] == 3:
        tensor = _luma(tensor)
    elif mode == "rgb" and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor.contiguous()


def _to_chw(tensor: torch.Tensor, label: str, layout: str) -> torch.Tensor:
    """HW / CHW / HWC -> CHW. Arrays (and PIL) default to HWC, tensors to CHW; the other layout is
    taken when only it has a channel axis of 1-4 entries."""
    if tensor.ndim == 2:
        return tensor[None]
    if tensor.ndim != 3:
        raise ValueError(f"{label} must be an image (H, W), (C, H, W) or (H, W, C), got shape {tuple(tensor.shape)}")
    first, last = tensor.shape[0] in (1, 3, 4), tensor.shape[-1] in (1, 3, 4)
    if layout == "HWC" and last:
        return tensor.permute(2, 0, 1)
    if first:
        return tensor
    if last:
        return tensor.permute(2, 0, 1)
    raise ValueError(
        f"{label} has shape {tuple(tensor.shape)}: no channel axis of 1 or 3 (or 4 with alpha) entries first "
        "(C, H, W) or last (H, W, C)"
    )


def _to_pixels(tensor: torch.Tensor, label: str, allow_float: bool) -> torch.Tensor:
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.is_floating_point():
        values = tensor.float()
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{label} contains NaN or infinite values")
        if values.numel() and (float(values.min()) < 0 or float(values.max()) > 1):
            raise ValueError(
                f"{label}: float images must lie in [0, 1], got values in "
                f"[{float(values.min()):.3g}, {float(values.max()):.3g}] (pass uint8 for 0-255 values)"
            )
        return values if allow_float else (values * 255).round().to(torch.uint8)
    raise ValueError(f"{label} must hold uint8 or float values in [0, 1], got {tensor.dtype}")


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (1, H, W) with Pillow's "L" conversion (ITU-R 601-2, its fixed-point rounding)."""
    if rgb.dtype == torch.uint8:
        weighted = rgb[0].int() * 19595 + rgb[1].int() * 38470 + rgb[2].int() * 7471
        return ((weighted + 0x8000) >> 16).to(torch.uint8)[None]
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]


def _file_is_gray(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode in _GRAY_FILE_MODES
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as error:
        raise ValueError(f"cannot read image file {path}: {type(error).__name__}: {error}") from error
