"""Synthetic defect sets in MVTec layout, from the gray textures bundled with scikit-image.

For each texture (brick, grass, gravel: 512 x 512 gray PNGs inside ``skimage/data``), normal images
are random 192 x 192 crops (random flips and quarter turns, +-4 % gain); defective test images are
normal crops with one pasted defect and its mask:

- ``scratch``: a straight line, 1-3 px wide, 20-120 px long, brighter or darker by 35-60 grey levels;
- ``blob``: a filled ellipse, radii 3-24 px, shifted by 30-60 grey levels;
- ``smudge``: a soft-edged region, radius 8-40 px, where the texture is blurred (a Gaussian of
  sigma 3) and its contrast halved: no change of mean brightness, only of texture.

Sizes are drawn log-uniformly, so each type has small and large instances. Train: 100 good;
test: 40 good and 20 of each defect type. Seeded, so a rerun writes the same files.

Only this script needs scikit-image (``pip install scikit-image``), and only for the texture files.

Run: ``python results/synthetic_textures.py --out /tmp/synth`` then use ``/tmp/synth`` as an MVTec
root (categories ``brick``, ``grass``, ``gravel``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "blob", "smudge")
SIZE = 192
N_TRAIN, N_TEST_GOOD, N_TEST_PER_DEFECT = 100, 40, 20


def texture(name: str) -> np.ndarray:
    import skimage

    path = Path(skimage.__file__).parent / "data" / f"{name}.png"
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def normal_crop(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = rng.integers(0, source.shape[0] - SIZE + 1), rng.integers(0, source.shape[1] - SIZE + 1)
    crop = source[y:y + SIZE, x:x + SIZE]
    crop = np.rot90(crop, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(crop * rng.uniform(0.96, 1.04), 0, 255)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def paste_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(defective image, 0/1 mask), both (SIZE, SIZE)."""
    mask_image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask_image)
    cy, cx = rng.uniform(0.2, 0.8, size=2) * SIZE
    sign = 1.0 if rng.random() < 0.5 else -1.0
    out = image.copy()
    if kind == "scratch":
        length, angle = _log_uniform(rng, 20, 120), rng.uniform(0, np.pi)
        dy, dx = 0.5 * length * np.sin(angle), 0.5 * length * np.cos(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(1, 4)))
        mask = np.asarray(mask_image) > 0
        out[mask] += sign * rng.uniform(35, 60)
    elif kind == "blob":
        ry, rx = _log_uniform(rng, 3, 24), _log_uniform(rng, 3, 24)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        mask = np.asarray(mask_image) > 0
        out[mask] += sign * rng.uniform(30, 60)
    elif kind == "smudge":
        r = _log_uniform(rng, 8, 40)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        soft = np.asarray(mask_image.filter(ImageFilter.GaussianBlur(r / 4)), dtype=np.float64) / 255
        blurred = np.asarray(Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)),
                             dtype=np.float64)
        flat = blurred.mean() + 0.5 * (blurred - blurred.mean())
        out = (1 - soft) * image + soft * flat
        mask = soft > 0.5
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {DEFECTS}")
    return np.clip(out, 0, 255), mask


def write_set(root: Path, name: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    source = texture(name)
    base = root / name

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(array).astype(np.uint8)).save(path)

    for i in range(N_TRAIN):
        save(normal_crop(source, rng), base / "train" / "good" / f"{i:03d}.png")
    for i in range(N_TEST_GOOD):
        save(normal_crop(source, rng), base / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECTS:
        for i in range(N_TEST_PER_DEFECT):
            image, mask = paste_defect(normal_crop(source, rng), kind, rng)
            save(image, base / "test" / kind / f"{i:03d}.png")
            save(mask * 255.0, base / "ground_truth" / kind / f"{i:03d}_mask.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write <texture>/train, test, ground_truth into")
    parser.add_argument("--textures", default=",".join(TEXTURES))
    args = parser.parse_args()
    root = Path(args.out)
    os.makedirs(root, exist_ok=True)
    for seed, name in enumerate(args.textures.split(",")):
        write_set(root, name, seed)
        print("wrote", root / name)


if __name__ == "__main__":
    main()
