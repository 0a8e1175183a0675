"""Heatmap overlays: [image | overlay | mask] panels with a perceptual colormap (inferno)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["colormap", "overlay_panel", "save_overlay"]

#: matplotlib's "inferno" at 9 evenly spaced points (perceptually uniform, dark = low, yellow = high).
_INFERNO = np.array([
    [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
    [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] (clipped) -> (H, W, 3) uint8 inferno colours."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.floor(v).astype(np.int64).clip(0, len(_INFERNO) - 2)
    frac = (v - low)[..., None]
    return np.rint(_INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac).astype(np.uint8)


def overlay_panel(image, heat: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """[image | 50 % heatmap overlay | mask] side by side, (H, 2W or 3W, 3) uint8.

    Args:
        image: uint8 (C, H, W) tensor or array, C = 1 or 3.
        heat: (H, W) values where 0 = cool and 1 = hot (e.g. ``Detector.normalize_map(m) / 2``).
        mask: optional (H, W) bool ground truth.
    """
    img = np.asarray(image.numpy() if hasattr(image, "numpy") else image)
    rgb = np.repeat(img[:1], 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = rgb.transpose(1, 2, 0).astype(np.float32)
    over = (0.5 * rgb + 0.5 * colormap(heat).astype(np.float32)).astype(np.uint8)
    panels = [rgb.astype(np.uint8), over]
    if mask is not None:
        panels.append(np.repeat((np.asarray(mask, dtype=np.uint8) * 255)[..., None], 3, axis=2))
    return np.concatenate(panels, axis=1)


def save_overlay(path: str | Path, image, heat: np.ndarray, mask: np.ndarray | None = None) -> None:
    """Write :func:`overlay_panel` as a PNG (parent folders created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_panel(image, heat, mask)).save(path)
