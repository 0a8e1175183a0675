"""How much do scoring-time choices move CPC-AD's pixel AUROC on magnetic_tile? (issue 21)

One trained ``CPCAD.preset("cpu")`` model (fitted here, or ``--model`` a saved one) is scored once;
its two per-sub-patch components (InfoNCE and the nearest-neighbour distance, each standardised
per grid position over the training images as the preset does) are then combined with a weight
``w_knn`` on the nearest-neighbour term (1 = the preset's ``combined``, 0 = InfoNCE alone, inf =
nearest neighbour alone) and the 256 px maps smoothed with a Gaussian of ``sigma`` px (0 = none,
PatchCore smooths with 4). These are **test-set sensitivities**, not tuned defaults: nothing here
changed a default. One JSON line per (w_knn, sigma) in ``--out``.

Run: ``python results/cpcad_postprocess.py --root ../shared/data/mvtec_format --model mt_cpu_s0.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from pyanomaly.data import MVTecDataset, resize_masks
from pyanomaly.metrics import aupro, image_auroc, pixel_auroc
from pyanomaly.models.cpcad.detector import position_stats

from cpcad_knn import preset_model  # noqa: E402  (results/ is the script's folder)

EVAL_SIZE = 256


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 1, H, W) maps blurred by a separable Gaussian of ``sigma`` px (reflected borders)."""
    if sigma == 0:
        return maps
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/mvtec_format")
    parser.add_argument("--set", default="magnetic_tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a saved cpu-preset model to score (fitted and saved there when absent)")
    parser.add_argument("--out", default="results/cpcad_postprocess.jsonl")
    args = parser.parse_args()
    train = MVTecDataset(args.root, args.set, "train")
    train_images = [train[i].image for i in range(len(train))]
    test = MVTecDataset(args.root, args.set, "test")
    samples = [test[i] for i in range(len(test))]
    detector, _ = preset_model(args.model, args.seed, train_images)
    detector.anomaly_score = "combined"
    if detector.bank_owners_ is None:  # a model saved before the nearest-neighbour score existed
        detector.banks_, detector.bank_owners_ = detector._build_banks(train_images, torch.Generator().manual_seed(0))
    stats = {k: position_stats(v) for k, v in detector._component_grids(train_images, own_rows=True).items()}
    tick = time.perf_counter()
    raw = detector._component_grids([s.image for s in samples])
    score_s = time.perf_counter() - tick
    z = {k: (raw[k] - stats[k][0]) / stats[k][1] for k in raw}
    sizes = [tuple(s.image.shape[1:]) for s in samples]
    labels = np.array([s.label for s in samples])
    masks = resize_masks([s.mask for s in samples], (EVAL_SIZE, EVAL_SIZE)).numpy()
    defects = [s.defect_type for s in samples]
    for w_knn in (0.0, 0.5, 1.0, 2.0, float("inf")):
        grid = z["knn"] if w_knn == float("inf") else z["infonce"] + w_knn * z["knn"]
        maps = torch.stack([F.interpolate(torch.from_numpy(m)[None, None], size=(EVAL_SIZE,) * 2, mode="bilinear")[0]
                            for m in detector.maps_from(grid, sizes)])
        scores = detector.image_scores_from(grid, sizes)
        for sigma in (0, 4, 8):
            pix = gaussian_blur(maps, sigma)[:, 0].numpy()
            per_defect = {d: round(pixel_auroc(masks[[i for i, x in enumerate(defects) if x == d]],
                                               pix[[i for i, x in enumerate(defects) if x == d]]), 3)
                          for d in sorted(set(defects) - {"good"})}
            row = {"set": args.set, "seed": args.seed, "w_knn": w_knn if np.isfinite(w_knn) else "inf",
                   "sigma": sigma, "image_auroc": round(image_auroc(labels, scores), 4),
                   "pixel_auroc": round(pixel_auroc(masks, pix), 4), "aupro": round(aupro(masks, pix), 4),
                   "pixel_auroc_per_defect": per_defect, "score_s": round(score_s, 1),
                   "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
