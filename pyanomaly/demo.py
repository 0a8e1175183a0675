"""A built-in synthetic data set in the MVTec AD layout, and the ``pyanomaly demo`` job.

The images are generated in code (nothing to download): normal images are a gray oriented
grating with a random phase, a slight random wobble and sensor noise; anomalous test images add a
synthetic defect with its ground-truth mask:

* ``scratch``: a thin bright or dark line segment at a random angle;
* ``blob``: a filled ellipse, brighter or darker than the texture;
* ``shift``: an elliptical region where the grating is shifted by half a period (same brightness
  and contrast statistics as normal texture: only the context tells it apart).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DEMO_CONFIG", "DEFECT_TYPES", "make_dataset", "make_image", "run_demo"]

DEFECT_TYPES = ("scratch", "blob", "shift")

#: The small CPU config the demo trains (a few minutes on 2 cores). Geometry: 64 px images,
#: patches 32/16, sub-patches 8/4 (the paper's 7x7 window at 1/8 scale); a narrow encoder.
DEMO_CONFIG = {
    "image_size": 64,
    "patch_size": 32,
    "patch_stride": 16,
    "sub_size": 8,
    "sub_stride": 4,
    "widths": [16, 32, 64],
    "blocks": [1, 1, 1],
    "shared_encoder": True,
    "prediction_steps": 2,
    "epochs": 15,
    "batch_size": 16,
    "lr": 1e-3,
    "crop_fraction": 1.0,
    "bank_size": 4096,
    "score_batch_size": 16,
}


def make_image(
    rng: np.random.Generator, size: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size) uint8 image and its bool mask (all False when ``defect`` is None)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = size / 8.0
    angle = math.radians(30.0)
    wobble = 0.6 * np.sin(2 * math.pi * y / size + rng.uniform(0, 2 * math.pi))
    phase = rng.uniform(0, 2 * math.pi)
    u = (x * math.cos(angle) + y * math.sin(angle)) / period
    mask = np.zeros((size, size), dtype=bool)
    if defect == "shift":
        cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
        ry, rx = rng.uniform(0.1, 0.18, 2) * size
        mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        phase = phase + np.where(mask, math.pi, 0.0)
    image = 128.0 + 45.0 * np.sin(2 * math.pi * u + wobble + phase) + rng.normal(0.0, 6.0, (size, size))
    if defect == "scratch":
        cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
        theta = rng.uniform(0, math.pi)
        length = rng.uniform(0.25, 0.45) * size
        half_width = max(0.75, size / 96.0)
        dx, dy = math.cos(theta), math.sin(theta)
        along = (x - cx) * dx + (y - cy) * dy
        across = -(x - cx) * dy + (y - cy) * dx
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= half_width)
        image[mask] = 235.0 if rng.random() < 0.5 else 20.0
    elif defect == "blob":
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        ry, rx = rng.uniform(0.05, 0.12, 2) * size
        mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        image[mask] += 70.0 if rng.random() < 0.5 else -70.0
    elif defect not in (None, "shift"):
        raise ValueError(f"defect must be None or one of {DEFECT_TYPES}, got {defect!r}")
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def make_dataset(
    root: str | Path,
    *,
    category: str = "synthetic",
    size: int = 64,
    n_train: int = 48,
    n_test_good: int = 16,
    n_test_defect: int = 8,
    seed: int = 0,
) -> Path:
    """Write a synthetic category in the MVTec AD layout under ``root`` and return ``root``.

    ``<root>/<category>/train/good``, ``test/good``, ``test/<defect>`` and
    ``ground_truth/<defect>/<name>_mask.png`` (0/255) for each of :data:`DEFECT_TYPES`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    base = root / category
    jobs = [("train", "good", None, n_train), ("test", "good", None, n_test_good)]
    jobs += [("test", d, d, n_test_defect) for d in DEFECT_TYPES]
    for split, folder, defect, count in jobs:
        out = base / split / folder
        out.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = make_image(rng, size, defect)
            Image.fromarray(image, mode="L").save(out / f"{i:03d}.png")
            if defect is not None:
                gt = base / "ground_truth" / folder
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(gt / f"{i:03d}_mask.png")
    return root


def run_demo(out: str | Path = "pyanomaly-demo", *, epochs: int | None = None, seed: int = 0) -> dict:
    """Generate the data set, train :data:`DEMO_CONFIG`, evaluate; returns the metrics dict."""
    from pyanomaly.runs import evaluate_run, fit_run

    out = Path(out)
    data = make_dataset(out / "data", seed=seed)
    config = dict(DEMO_CONFIG, seed=seed)
    if epochs is not None:
        config["epochs"] = epochs
    run = out / "run"
    start = time.perf_counter()
    fit_run("cpcad", run, config, data=data, category="synthetic", overwrite=True)  # the demo's own folder
    metrics = evaluate_run(run, data=data, category="synthetic")
    metrics["total_seconds"] = round(time.perf_counter() - start, 1)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
