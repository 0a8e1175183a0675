"""Does a nearest-neighbour score on CPC-AD's own sub-patch embeddings catch what InfoNCE misses?

The study (results/cpcad.md) found CPC-AD's InfoNCE score *inverted* on predictable anomalies: the
large-area "uneven" defects of magnetic_tile and the blurred "smudge" defects of the synthetic
textures get a lower loss than normal texture (a flat region is easy to tell apart from textured
negatives). This script fits ``CPCAD.preset("cpu", anomaly_score="combined")`` (training does not
depend on the score) and scores the test split three ways from that one model, each per-position
standardised over the training images as the preset does:

- ``infonce``: the paper's score;
- ``knn``: each sub-patch's distance to its nearest training sub-patch embedding in the bank (a
  training image's own sub-patches left out; mean over encoders; PatchCore's idea on CPC features);
- ``combined``: the sum of the two.

Run: ``python results/cpcad_knn.py --root ../shared/data/mvtec_format --set magnetic_tile --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from pyanomaly import CPCAD
from pyanomaly.data import MVTecDataset, resize_masks

EVAL_SIZE = 256


def metrics(detector: CPCAD, grid: torch.Tensor, samples) -> dict:
    from pyanomaly.metrics import aupro, image_auroc, pixel_auroc
    import torch.nn.functional as F

    sizes = [tuple(s.image.shape[1:]) for s in samples]
    labels = np.array([s.label for s in samples])
    masks = resize_masks([s.mask for s in samples], (EVAL_SIZE, EVAL_SIZE)).numpy()
    maps = detector.maps_from(grid, sizes)
    pix = np.stack([F.interpolate(torch.from_numpy(m)[None, None], size=(EVAL_SIZE,) * 2, mode="bilinear")[0, 0].numpy()
                    for m in maps])
    scores = detector.image_scores_from(grid, sizes)
    defects = [s.defect_type for s in samples]
    good = [i for i, d in enumerate(defects) if d == "good"]
    per_defect = {}
    for defect in sorted(set(defects) - {"good"}):
        bad = [i for i, d in enumerate(defects) if d == defect]
        per_defect[defect] = {"image_auroc": round(image_auroc(labels[good + bad], scores[good + bad]), 4),
                              "pixel_auroc": round(pixel_auroc(masks[bad], pix[bad]), 4)}
    return {"image_auroc": round(image_auroc(labels, scores), 4), "pixel_auroc": round(pixel_auroc(masks, pix), 4),
            "aupro": round(aupro(masks, pix), 4), "per_defect": per_defect}


def preset_model(model: str | None, seed: int, train_images: list, overrides: dict | None = None) -> tuple[CPCAD, float | None]:
    """``CPCAD.preset("cpu")`` loaded from ``model`` when that file exists, else fitted on ``train_images``
    (and saved to ``model`` when given); returns it and the fit's wall seconds (None when loaded)."""
    if model and os.path.exists(model):
        return CPCAD.load(model, device="cpu"), None
    tick = time.perf_counter()
    detector = CPCAD.preset("cpu", **{"anomaly_score": "combined", "seed": seed, "verbose": False, "device": "cpu",
                                      **(overrides or {})})
    detector.fit(train_images)
    fit_s = round(time.perf_counter() - tick, 1)
    if model:
        detector.save(model)
    return detector, fit_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/mvtec_format")
    parser.add_argument("--set", default="magnetic_tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a saved model.pt to score instead of fitting (its path is reused to save)")
    parser.add_argument("--override", default="{}", help='JSON of preset overrides, e.g. {"image_size": 256}')
    parser.add_argument("--out", default="results/cpcad_knn.jsonl")
    args = parser.parse_args()
    overrides = json.loads(args.override)
    train = MVTecDataset(args.root, args.set, "train")
    test = MVTecDataset(args.root, args.set, "test")
    train_images = [train[i].image for i in range(len(train))]
    samples = [test[i] for i in range(len(test))]
    detector, fit_s = preset_model(args.model, args.seed, train_images, overrides)
    record = {"set": args.set, "seed": args.seed, "overrides": overrides, "fit_s": fit_s, "threads": torch.get_num_threads(),
              "load": os.getloadavg()[0], "bank_size": detector.bank_size}
    tick = time.perf_counter()
    for kind in ("infonce", "knn", "combined"):
        detector.anomaly_score = kind
        record[kind] = metrics(detector, detector.subpatch_scores([s.image for s in samples]), samples)
    record["score_s"] = round(time.perf_counter() - tick, 1)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    for kind in ("infonce", "knn", "combined"):
        print(kind, json.dumps(record[kind]))


if __name__ == "__main__":
    main()
