"""Does adding each image's own score to its pixel map lift CPC-AD's pixel AUROC on magnetic_tile?

The study (results/cpcad.md) left pooled pixel AUROC at ~0.76 with image AUROC at ~0.80: the large
"uneven" regions (36% of the anomalous pixels) score low *within* their maps, yet the images they are
in are often detected. This probe scores the test split once with ``CPCAD.preset("cpu")`` (fitted
here, or loaded with ``--model``) and adds ``w`` times the image's standardised score (its image
score minus the training images' mean, over their std: ``decision_scores_``) to every sub-patch score
of that image before folding to pixels. Image scores (and so image AUROC) are unchanged by it; what
moves is pixel AUROC and AUPRO. Rows go to ``--out`` as JSON lines, one per weight.

Run: ``python results/cpcad_image_prior.py --set magnetic_tile --seed 0 --model /tmp/mt_s0.pt``;
``--summary`` prints the table of results/cpcad.md (mean +- std over the seeds in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from pyanomaly.data import MVTecDataset

from cpcad_knn import metrics, preset_model  # noqa: E402  (results/ is the script's folder)

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def summary(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    print("| w (image score) | seeds | image AUROC | pixel AUROC | AUPRO | pixel AUROC in the defective images:"
          " blowhole / break / crack / fray / uneven |")
    print("|---|---|---|---|---|---|")
    for weight in WEIGHTS:
        group = [r for r in rows if r["weight"] == weight]
        if not group:
            continue

        def stat(values):
            return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

        defects = " / ".join(f"{np.mean([r['per_defect'][d]['pixel_auroc'] for r in group]):.2f}"
                             for d in ("blowhole", "break", "crack", "fray", "uneven"))
        print(f"| {weight} | {len(group)} | {stat([r['image_auroc'] for r in group])} | "
              f"{stat([r['pixel_auroc'] for r in group])} | {stat([r['aupro'] for r in group])} | {defects} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/mvtec_format")
    parser.add_argument("--set", default="magnetic_tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a saved model.pt to score instead of fitting (saved there after a fit)")
    parser.add_argument("--out", default="results/cpcad_image_prior.jsonl")
    parser.add_argument("--summary", action="store_true", help="print the table from --out and exit")
    args = parser.parse_args()
    if args.summary:
        summary(args.out)
        return
    train = MVTecDataset(args.root, args.set, "train")
    test = MVTecDataset(args.root, args.set, "test")
    samples = [test[i] for i in range(len(test))]
    detector, fit_s = preset_model(args.model, args.seed, [train[i].image for i in range(len(train))])
    grid = detector.subpatch_scores([s.image for s in samples])
    sizes = [tuple(s.image.shape[1:]) for s in samples]
    train_scores = np.asarray(detector.decision_scores_, dtype=np.float64)
    z = (detector.image_scores_from(grid, sizes) - train_scores.mean()) / train_scores.std()
    for weight in WEIGHTS:
        shifted = grid + weight * torch.from_numpy(z).float()[:, None, None]
        record = {"set": args.set, "seed": args.seed, "weight": weight, "fit_s": fit_s,
                  "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
                  **metrics(detector, shifted, samples)}
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))


if __name__ == "__main__":
    main()
