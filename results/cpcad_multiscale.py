"""A coarser second scale at scoring time for a fitted CPC-AD model (a probe; not in the library).

The same trained encoders and predictors score the images a second time at ``--coarse`` px (the
`cpu` preset's 128 px -> 64 px: each 16 px sub-patch then covers twice the tile's width, a window of
7 x 7 sub-patches the whole image), with their own negative bank and per-position statistics from the
training images at that size. Both standardised grids become maps at the evaluation size and are
summed (``w`` x the coarse one) or maxed (``max``); image scores are each scale's image score
standardised by the training images' and combined likewise. The question: does a larger relative
field of view find the large-area defects (magnetic_tile's "uneven") that the fine grid misses?
From saved models (``results/cpcad_knn.py --model``); one JSON line per model and weight appended
to ``--out``.

    python results/cpcad_multiscale.py --set magnetic_tile --models m0.pt,m1.pt,m2.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpcad_knn import EVAL_SIZE  # noqa: E402

from pyanomaly import CPCAD  # noqa: E402
from pyanomaly.data import MVTecDataset, resize_masks  # noqa: E402
from pyanomaly.metrics import aupro, image_auroc, pixel_auroc  # noqa: E402


def at_size(det: CPCAD, image_size: int) -> CPCAD:
    """A copy of ``det`` that works at ``image_size`` (same weights; geometry recomputed)."""
    other = copy.deepcopy(det)
    other.image_size = image_size
    other.patches_per_side = (image_size - det.patch_size) // det.patch_stride + 1
    other.grid_size = (other.patches_per_side - 1) * det.ratio + det.window
    return other


@torch.no_grad()
def scale_scores(det: CPCAD, train: list, test: list, seed: int) -> tuple:
    """Fit banks and statistics at ``det``'s size; -> standardised (train image, test image) scores
    and the (N, G, G) test grid."""
    det.banks_, det.bank_owners_ = det._build_banks(train, torch.Generator().manual_seed(seed))
    train_grid = det._normalized(det._fit_score_stats(train))
    test_grid = det._normalized(det._component_grids(test))
    train_image = det.image_scores_from(train_grid, [tuple(t.shape[1:]) for t in train])
    test_image = det.image_scores_from(test_grid, [tuple(t.shape[1:]) for t in test])
    mean, std = train_image.mean(), train_image.std() + 1e-12
    return (train_image - mean) / std, (test_image - mean) / std, test_grid


def eval_maps(det: CPCAD, grid: torch.Tensor, sizes: list) -> np.ndarray:
    maps = det.maps_from(grid, sizes)
    size = (EVAL_SIZE, EVAL_SIZE)
    return np.stack([F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear")[0, 0].numpy()
                     for m in maps])


def summary(labels, masks, defects, image, pix) -> dict:
    good = [i for i, d in enumerate(defects) if d == "good"]
    per_defect = {}
    for defect in sorted(set(defects) - {"good"}):
        bad = [i for i, d in enumerate(defects) if d == defect]
        per_defect[defect] = round(pixel_auroc(masks[bad], pix[bad]), 4)
    return {"image_auroc": round(image_auroc(labels, image), 4),
            "pixel_auroc": round(pixel_auroc(masks, pix), 4), "aupro": round(aupro(masks, pix), 4),
            "pixel_auroc_per_defect": per_defect}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/mvtec_format")
    parser.add_argument("--set", default="magnetic_tile")
    parser.add_argument("--models", required=True, help="comma-separated saved models")
    parser.add_argument("--coarse", type=int, default=64)
    parser.add_argument("--weights", default="0,0.25,0.5,1,2,inf,max")
    parser.add_argument("--out", default="results/cpcad_multiscale.jsonl")
    args = parser.parse_args()
    train = [s.image for s in MVTecDataset(args.root, args.set, "train")]
    samples = [s for s in MVTecDataset(args.root, args.set, "test")]
    test = [s.image for s in samples]
    sizes = [tuple(t.shape[1:]) for t in test]
    labels = np.array([s.label for s in samples])
    defects = [s.defect_type for s in samples]
    masks = resize_masks([s.mask for s in samples], (EVAL_SIZE, EVAL_SIZE)).numpy()
    for path in args.models.split(","):
        tick = time.perf_counter()
        fine = CPCAD.load(path, device="cpu")
        fine.verbose = False
        coarse = at_size(fine, args.coarse)
        _, fine_image, fine_grid = scale_scores(fine, train, test, fine.seed or 0)
        _, coarse_image, coarse_grid = scale_scores(coarse, train, test, fine.seed or 0)
        fine_pix, coarse_pix = eval_maps(fine, fine_grid, sizes), eval_maps(coarse, coarse_grid, sizes)
        score_s = round(time.perf_counter() - tick, 1)
        for w in args.weights.split(","):
            if w == "inf":
                image, pix = coarse_image, coarse_pix
            elif w == "max":  # the larger of the two standardised scores
                image, pix = np.maximum(fine_image, coarse_image), np.maximum(fine_pix, coarse_pix)
            else:
                image, pix = fine_image + float(w) * coarse_image, fine_pix + float(w) * coarse_pix
            row = {"set": args.set, "model": Path(path).name, "coarse": args.coarse, "w_coarse": w,
                   "score_s": score_s, **summary(labels, masks, defects, image, pix)}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
