"""No-learning floors on an MVTec-layout set: per-pixel Gaussian and global image statistics.

The per-pixel Gaussian resizes every gray image to ``size`` x ``size`` (squashing), fits a mean and
std per pixel on the training images and scores a test pixel by its squared z-score; the image score
is the mean of the top 1% of its pixel scores. "brightness" scores an image by |mean - train mean| /
train std of the image means (a global statistic, no map). Run:
``python results/floors.py ../shared/data/mvtec_format magnetic_tile``.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from pyanomaly.data import MVTecDataset, resize_masks
from pyanomaly.metrics import aupro, image_auroc, pixel_auroc

EVAL_SIZE = 256


def resized(images, size: int) -> torch.Tensor:
    return torch.cat([F.interpolate(im[None].float() / 255, size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False) for im in images])[:, 0]


def floors(root: str, category: str, size: int = 128) -> dict:
    train = MVTecDataset(root, category, "train")
    test = MVTecDataset(root, category, "test")
    train_x = resized([s.image for s in train], size)
    samples = [test[i] for i in range(len(test))]
    test_x = resized([s.image for s in samples], size)
    labels = np.array([s.label for s in samples])
    masks = resize_masks([s.mask for s in samples], (EVAL_SIZE, EVAL_SIZE)).numpy()
    mu, sigma = train_x.mean(0), train_x.std(0).clamp(min=1e-3)
    z2 = ((test_x - mu) / sigma) ** 2
    maps = F.interpolate(z2[:, None], size=(EVAL_SIZE, EVAL_SIZE), mode="bilinear")[:, 0].numpy()
    k = max(1, round(0.01 * size * size))
    image_scores = z2.flatten(1).topk(k, dim=1).values.mean(1).numpy()
    means = train_x.mean((1, 2))
    brightness = ((test_x.mean((1, 2)) - means.mean()).abs() / means.std()).numpy()
    out = {
        "set": category, "size": size,
        "pixel_gaussian": {"image_auroc": image_auroc(labels, image_scores),
                           "pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps)},
        "brightness": {"image_auroc": image_auroc(labels, brightness)},
    }
    return out


if __name__ == "__main__":
    root, category = sys.argv[1], sys.argv[2]
    for size in (128, 256):
        print(json.dumps(floors(root, category, size)))
