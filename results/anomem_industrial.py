"""AnoMem's ``cpu`` preset on the shared industrial sets (MVTec layout): one-class image AUROC.

The preset was chosen on solar-cell EL images that are not shared here (issue 20); this checks it on
the two industrial sets that are: each seed fits ``AnoMem.preset("cpu", seed=S)`` on the set's
``train/good`` images and scores its whole test split: the detector's image AUROC (Eq. 13), each
scale's (Eq. 9), pixel AUROC of its anomaly maps (at 256 px, masks nearest), and, from the same
encoder, a nearest-neighbour score for comparison (``knn_s*``: each test image's pooled, memory-
normalised feature's cosine distance to the nearest training image's; ``patch_knn_s*``: the mean
of each position's distance to its nearest training position, PatchCore-style). One JSON line per
run, appended to ``--out`` as it finishes, with the fit and scoring wall times, the torch threads
and the load average. The no-learning floor on the same split is ``results/floors.py``.

    python results/anomem_industrial.py --root ../shared/data/mvtec_format --sets magnetic_tile,glass --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomem_diagnostics import knn_distance  # noqa: E402

from pyanomaly import AnoMem  # noqa: E402
from pyanomaly.data import MVTecDataset, resize_masks  # noqa: E402
from pyanomaly.metrics import image_auroc, pixel_auroc  # noqa: E402

EVAL_SIZE = 256


@torch.no_grad()
def feature_knn(detector: AnoMem, train, test) -> dict[str, np.ndarray]:
    """Nearest-neighbour scores (N,) on the detector's memory-normalised encoder features."""
    model = detector.model_.eval()
    x_train, x_test = detector._images(train, "train")[0], detector._images(test, "test")[0]
    out = {}
    for s, (stage, memory) in enumerate(zip(model.scales, model.memories)):
        def states(x):  # (N, P, C) normalised features at every position
            fmap = torch.cat([model.features(x[i : i + 64])[s] for i in range(0, len(x), 64)])
            n, c = fmap.shape[:2]
            return F.normalize(memory.states(fmap.permute(0, 2, 3, 1).reshape(-1, c)).float(), dim=1).reshape(n, -1, c)
        tr, te = states(x_train), states(x_test)
        out[f"knn_s{stage}"] = knn_distance(te.mean(1), tr.mean(1))
        bank = tr.reshape(-1, tr.shape[-1])
        out[f"patch_knn_s{stage}"] = np.array([(1 - (t @ bank.T).max(1).values).mean().item() for t in te])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding the MVTec-layout sets")
    parser.add_argument("--sets", default="magnetic_tile,glass")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", default="{}", help="JSON of overrides on top of the preset")
    parser.add_argument("--out", type=Path, default=Path("results/anomem_industrial.jsonl"))
    args = parser.parse_args()
    overrides = json.loads(args.set)
    for name in args.sets.split(","):
        train = MVTecDataset(args.root, name, "train")
        test = MVTecDataset(args.root, name, "test")
        samples = [test[i] for i in range(len(test))]
        labels = np.array([t.label for t in samples])
        masks = resize_masks([t.mask for t in samples], (EVAL_SIZE, EVAL_SIZE)).numpy()
        for seed in (int(s) for s in args.seeds.split(",")):
            load_before = os.getloadavg()[0]
            detector = AnoMem.preset(args.preset, seed=seed, **overrides)
            start = time.perf_counter()
            detector.fit(train)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            scores, maps = detector.score(test)
            score_s = time.perf_counter() - start
            pix = np.stack([F.interpolate(torch.from_numpy(m)[None, None], size=(EVAL_SIZE,) * 2, mode="bilinear")[0, 0].numpy()
                            for m in maps])
            per_scale = detector.scale_scores(test)
            row = {"set": name, "preset": args.preset, "overrides": overrides, "seed": seed,
                   "n_train": len(train), "n_test": len(test),
                   "image_auroc": round(float(image_auroc(labels, scores)), 4),
                   "pixel_auroc": round(float(pixel_auroc(masks, pix)), 4) if masks.any() else None,
                   **{f"image_auroc_s{stage}": round(float(image_auroc(labels, per_scale[:, i])), 4)
                      for i, stage in enumerate(detector.scales)},
                   **{k: round(float(image_auroc(labels, v)), 4) for k, v in feature_knn(detector, train, test).items()},
                   "final_loss": round(float(detector.history_[-1]["loss"]), 4),
                   "train_precision": detector.train_precision_,
                   "fit_s": round(fit_s, 1), "score_s": round(score_s, 1),
                   "threads": torch.get_num_threads(), "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
