"""Does a nearest-neighbour score on CPC-AD's own sub-patch embeddings catch what InfoNCE misses?

The study (results/cpcad.md) found CPC-AD's InfoNCE score *inverted* on predictable anomalies: the
large-area "uneven" defects of magnetic_tile and the blurred "smudge" defects of the synthetic
textures get a lower loss than normal texture (a flat region is easy to tell apart from textured
negatives). This script fits ``CPCAD.preset("cpu")`` (or loads a saved one) and scores the test
split three ways from the same model:

- ``infonce``: the paper's score (the preset's: target credit, per-position standardisation);
- ``knn``: each sub-patch's distance to its nearest training sub-patch embedding (every training
  sub-patch, other images only, mean over encoders; PatchCore's idea on CPC features), standardised
  per position over the training images like the preset's score;
- ``combined``: the sum of the two standardised maps.

Run: ``python results/cpcad_knn.py --set magnetic_tile --seed 0 --out results/cpcad_knn.jsonl``.
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
from pyanomaly.models.cpcad.detector import position_stats

EVAL_SIZE = 256


@torch.no_grad()
def embeddings(detector: CPCAD, images) -> list[torch.Tensor]:
    """Per encoder, (N, G, G, D) float32 embeddings of every sub-patch (unaugmented)."""
    parts: list[list[torch.Tensor]] = [[] for _ in detector.model_.encoders]
    for i in range(0, len(images), detector.score_batch_size):
        grids = detector._subpatch_grid(detector._resize(images[i : i + detector.score_batch_size]), None)
        for store, grid in zip(parts, grids):
            store.append(grid.float().cpu())
    return [torch.cat(p) for p in parts]


def knn_grid(query: list[torch.Tensor], bank: list[torch.Tensor], exclude_self: bool) -> torch.Tensor:
    """(N, G, G) mean over encoders of the L2 distance to the nearest bank row (of another image
    when ``exclude_self``: query i and bank image i are the same image)."""
    out = None
    for q, b in zip(query, bank):
        n, g, _, d = q.shape
        flat_b = b.reshape(-1, d)
        owner = torch.arange(b.shape[0]).repeat_interleave(g * g)
        b2 = (flat_b * flat_b).sum(1)
        dist = torch.empty(n, g * g)
        for i in range(n):
            qi = q[i].reshape(-1, d)
            d2 = (qi * qi).sum(1, keepdim=True) - 2 * qi @ flat_b.T + b2[None]
            if exclude_self:
                d2[:, owner == i] = float("inf")
            dist[i] = d2.min(1).values.clamp(min=0).sqrt()
        grid = dist.reshape(n, g, g)
        out = grid if out is None else out + grid
    return out / len(query)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/mvtec_format")
    parser.add_argument("--set", default="magnetic_tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a saved model.pt to score instead of fitting (its path is reused to save)")
    parser.add_argument("--out", default="results/cpcad_knn.jsonl")
    args = parser.parse_args()
    train = MVTecDataset(args.root, args.set, "train")
    test = MVTecDataset(args.root, args.set, "test")
    train_images = [train[i].image for i in range(len(train))]
    samples = [test[i] for i in range(len(test))]
    tick = time.perf_counter()
    if args.model and os.path.exists(args.model):
        detector, fit_s = CPCAD.load(args.model, device="cpu"), None
    else:
        detector = CPCAD.preset("cpu", seed=args.seed, verbose=False, device="cpu").fit(train_images)
        fit_s = round(time.perf_counter() - tick, 1)
        if args.model:
            detector.save(args.model)
    tick = time.perf_counter()
    infonce = detector.subpatch_scores([s.image for s in samples])  # the preset's (position-normalised) score
    train_emb, test_emb = embeddings(detector, train_images), embeddings(detector, [s.image for s in samples])
    knn_train, knn_test = knn_grid(train_emb, train_emb, True), knn_grid(test_emb, train_emb, False)
    mean, std = position_stats(knn_train)
    knn = (knn_test - mean) / std
    record = {"set": args.set, "seed": args.seed, "fit_s": fit_s, "score_s": round(time.perf_counter() - tick, 1),
              "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
              "infonce": metrics(detector, infonce, samples), "knn": metrics(detector, knn, samples),
              "combined": metrics(detector, infonce + knn, samples)}
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    for kind in ("infonce", "knn", "combined"):
        print(kind, json.dumps(record[kind]))


if __name__ == "__main__":
    main()
