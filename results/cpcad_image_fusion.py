"""How the combined score's components are joined into an image score, from saved models.

``anomaly_score="combined"`` sums the standardised InfoNCE and nearest-neighbour grids and pools the
sum (top-k mean): "map" fusion. Where one component separates images well and the other not at
all (the synthetic brick texture: kNN 0.88 image AUROC, two-sided InfoNCE 0.54, their sum 0.63) the
weak one's noise dilutes the strong one in every cell. Alternatives, scoring-time only: pool each
component on its own, standardise those image scores by the training images' (each training image
scored against the others' sub-patches, as ``score_norm`` does), then sum ("image_sum") or take the
larger ("image_max"). Pixel maps are unchanged (the sum of the grids). One JSON line per model.

    python results/cpcad_image_fusion.py --root ../shared/data/mvtec_format --set magnetic_tile --seed 0 --model m.pt
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpcad_knn import metrics  # noqa: E402
from cpcad_two_sided import load_saved_model  # noqa: E402

from pyanomaly.metrics import image_auroc  # noqa: E402


def main() -> None:
    args, detector, train, test = load_saved_model(__doc__.split("\n")[0], "results/cpcad_image_fusion.jsonl")
    detector.anomaly_score, detector.infonce_sides = "combined", "both"
    train_images = [train[i].image for i in range(len(train))]
    samples = [test[i] for i in range(len(test))]
    train_sizes = [tuple(x.shape[1:]) for x in train_images]
    test_sizes = [tuple(s.image.shape[1:]) for s in samples]
    labels = np.array([s.label for s in samples])
    tick = time.perf_counter()
    train_parts = detector._fit_score_stats(train_images)
    test_parts = detector._component_grids([s.image for s in samples])
    record = {"set": args.set, "seed": args.seed, "model": os.path.basename(args.model),
              "threads": torch.get_num_threads(), "load": round(os.getloadavg()[0], 2)}
    record["map"] = metrics(detector, detector._normalized(test_parts), samples)
    standardised = []
    for name in ("infonce", "knn"):
        train_scores = detector.image_scores_from(detector._normalized({name: train_parts[name]}), train_sizes)
        test_scores = detector.image_scores_from(detector._normalized({name: test_parts[name]}), test_sizes)
        record[f"{name}_image_auroc"] = round(image_auroc(labels, test_scores), 4)
        standardised.append((test_scores - train_scores.mean()) / max(train_scores.std(), 1e-12))
    stacked = np.stack(standardised)
    record["image_sum_auroc"] = round(image_auroc(labels, stacked.sum(0)), 4)
    record["image_max_auroc"] = round(image_auroc(labels, stacked.max(0)), 4)
    record["score_s"] = round(time.perf_counter() - tick, 1)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(args.set, args.seed, "map", record["map"]["image_auroc"], "infonce", record["infonce_image_auroc"],
          "knn", record["knn_image_auroc"], "sum", record["image_sum_auroc"], "max", record["image_max_auroc"], flush=True)


if __name__ == "__main__":
    main()
