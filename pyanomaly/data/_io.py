"""Reading images and masks with Pillow into torch tensors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "PathLike", "load_image", "load_mask", "list_image_files", "read_image_size"]

PathLike = Union[str, os.PathLike]

#: File extensions (lower case) recognised as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _require_file(path: PathLike, what: str) -> Path:
    file_path = Path(path)
    if not file_path.exists():
        raise FileNotFoundError(f"{what} not found: {file_path}")
    if not file_path.is_file():
        raise FileNotFoundError(f"{what} is not a file: {file_path}")
    return file_path


def _open_decoded(file_path: Path, what: str) -> Image.Image:
    """Opens and fully decodes an image (first frame), wrapping every failure."""
    try:
        with Image.open(file_path) as image:
            image.load()
            return image.copy()
    except Exception as error:
        raise ValueError(f"cannot read {what} {file_path}: {type(error).__name__}: {error}") from error


def read_image_size(path: PathLike) -> tuple[int, int]:
    """Returns (width, height) of an image file, reading only its header.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image.
    """
    file_path = _require_file(path, "image file")
    try:
        with Image.open(file_path) as image:
            return image.size
    except Exception as error:
        raise ValueError(f"cannot read image file {file_path}: {type(error).__name__}: {error}") from error


def _sixteen_bit_to_uint8(values: np.ndarray, file_path: Path) -> np.ndarray:
    """Maps 16-bit intensities [0, 65535] to [0, 255] (divides by 257, rounds)."""
    values = values.astype(np.float64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"cannot convert image {file_path}: 32-bit integer pixel values outside the 16-bit "
            f"range [0, 65535] (found [{values.min():g}, {values.max():g}])"
        )
    return np.rint(values / 257.0).astype(np.uint8)


def load_image(path: PathLike, *, grayscale: bool) -> torch.Tensor:
    """Reads an image file (PNG, JPEG, BMP, TIFF, any Pillow mode) as uint8.

    16-bit images (modes ``I;16*`` and ``I`` with values in [0, 65535]) are
    scaled to 8 bit; alpha channels are dropped; palette images are expanded;
    gray images are replicated to 3 channels when ``grayscale`` is False and
    colour images are converted to luma (ITU-R 601-2) when it is True.

    Args:
        path: image file.
        grayscale: return 1 channel if True, 3 (RGB) otherwise.

    Returns:
        uint8 tensor (C, H, W) with C = 1 or 3.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded or its mode converted.
    """
    file_path = _require_file(path, "image file")
    image = _open_decoded(file_path, "image file")
    target_mode = "L" if grayscale else "RGB"
    try:
        if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
            gray = _sixteen_bit_to_uint8(np.asarray(image), file_path)
            array = gray if grayscale else np.repeat(gray[:, :, None], 3, axis=2)
        elif image.mode == "F":
            raise ValueError("32-bit float images (mode F) have no defined 8-bit range")
        else:
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA")
            array = np.asarray(image.convert(target_mode))
    except Exception as error:
        raise ValueError(
            f"cannot convert image {file_path} (mode {image.mode}) to {target_mode}: {error}"
        ) from error
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), dtype=np.uint8, order="C"))


_WARNED_MASKS: set[str] = set()


def _warn_if_not_binary(values: np.ndarray, file_path: Path) -> None:
    """Warn (once per file) when a gray mask marks most of the image and is not a clean 0/255 mask
    (no zero at all, or more than two values): ``> 0`` counts every non-zero pixel, so a background
    of 3 instead of 0 makes the whole image a defect. (Anti-aliased masks, 0 with soft edges, do not
    warn.)"""
    share = float((values > 0).mean()) if values.size else 0.0
    if share <= 0.5 or str(file_path) in _WARNED_MASKS:
        return
    distinct = np.unique(values[:: max(1, values.shape[0] // 256)])
    if distinct[0] > 0 or len(distinct) > 2:
        _WARNED_MASKS.add(str(file_path))
        warnings.warn(
            f"mask {file_path} marks {share:.0%} of the image as defect: every pixel > 0 counts, and it holds "
            f"values {distinct[:4].tolist()}{' ...' if len(distinct) > 4 else ''} (a background that is not 0?)",
            stacklevel=3,
        )


def load_mask(path: PathLike) -> torch.Tensor:
    """Reads a ground-truth mask file and binarises it with ``> 0``.

    Any Pillow mode is accepted: for colour masks (RGB, RGBA, palette ...) a
    pixel is anomalous if any colour channel is > 0 (alpha is ignored).

    Args:
        path: mask image file.

    Returns:
        bool tensor (H, W).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded.
    """
    file_path = _require_file(path, "mask file")
    image = _open_decoded(file_path, "mask file")
    try:
        if image.mode in ("1", "L", "I", "F") or image.mode in _SIXTEEN_BIT_MODES:
            values = np.asarray(image)
            mask = values > 0
            _warn_if_not_binary(values, file_path)
        elif image.mode == "LA":
            mask = np.asarray(image)[:, :, 0] > 0
        else:
            rgb = np.asarray(image.convert("RGBA"))[:, :, :3]
            mask = np.any(rgb > 0, axis=2)
    except Exception as error:
        raise ValueError(f"cannot convert mask {file_path} (mode {image.mode}): {error}") from error
    return torch.from_numpy(np.ascontiguousarray(mask))


def list_image_files(folder: PathLike, *, what: str = "image folder") -> list[Path]:
    """Sorted image files directly inside ``folder`` (hidden files ignored).

    Args:
        folder: directory to list (not recursive).
        what: description of the folder used in error messages.

    Raises:
        FileNotFoundError: the folder does not exist or is not a directory.
        ValueError: the folder holds no image file.
    """
    directory = Path(folder)
    if not directory.is_dir():
        state = "is not a folder" if directory.exists() else "not found"
        raise FileNotFoundError(f"{what} {state}: {directory}")
    files = sorted(
        entry
        for entry in directory.iterdir()
        if not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS and entry.is_file()
    )
    if not files:
        raise ValueError(
            f"{what} {directory} contains no image file (expected extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files
