"""Two-sided InfoNCE (``CPCAD(infonce_sides="both")``) against the paper's one-sided score, from saved models.

CPC-AD's InfoNCE score is inverted on anomalies that are easier to predict than normal texture
(magnetic_tile's "uneven", the synthetic "smudge"; results/cpcad.md): their loss falls *below* the
position's training range. ``infonce_sides="both"`` also scores that side. Scoring-time only, so each
model (saved by ``results/cpcad_knn.py --model PATH``, the ``cpu`` preset with the combined score)
is scored five ways: infonce and combined, each one- and two-sided, and knn. The score statistics
are refitted on the set's training images first (models saved before the option lack the
two-sided ones; the others come out identical). One JSON line per model in ``--out``.

    python results/cpcad_two_sided.py --root ../shared/data/mvtec_format --set magnetic_tile --seed 0 --model m.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpcad_knn import metrics  # noqa: E402

from pyanomaly import CPCAD  # noqa: E402
from pyanomaly.data import MVTecDataset  # noqa: E402

VARIANTS = {  # name: (anomaly_score, infonce_sides)
    "infonce": ("infonce", "upper"), "infonce_both": ("infonce", "both"), "knn": ("knn", "upper"),
    "combined": ("combined", "upper"), "combined_both": ("combined", "both"),
}


def load_saved_model(description: str, default_out: str):
    """The saved-model scripts' arguments (--root --set --seed --model --out), the quiet CPU model and
    the set's train and test splits."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", required=True)
    parser.add_argument("--set", required=True)
    parser.add_argument("--seed", type=int, required=True, help="the seed the model was fitted with (recorded)")
    parser.add_argument("--model", required=True, help="a CPCAD saved with anomaly_score='combined'")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()
    detector = CPCAD.load(args.model, device="cpu")
    detector.verbose = False
    return args, detector, MVTecDataset(args.root, args.set, "train"), MVTecDataset(args.root, args.set, "test")


def main() -> None:
    args, detector, train, test = load_saved_model(__doc__.split("\n")[0], "results/cpcad_two_sided.jsonl")
    samples = [test[i] for i in range(len(test))]
    tick = time.perf_counter()
    detector.anomaly_score = "combined"
    detector._fit_score_stats([train[i].image for i in range(len(train))])
    record = {"set": args.set, "seed": args.seed, "model": os.path.basename(args.model), "threads": torch.get_num_threads(),
              "load": round(os.getloadavg()[0], 2)}
    components = detector._component_grids([s.image for s in samples])
    for name, (score, sides) in VARIANTS.items():
        detector.anomaly_score, detector.infonce_sides = score, sides
        parts = {k: v for k, v in components.items() if score == "combined" or k == score}
        record[name] = metrics(detector, detector._normalized(parts), samples)
    record["score_s"] = round(time.perf_counter() - tick, 1)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    for name in VARIANTS:
        r = record[name]
        print(name, r["image_auroc"], r["pixel_auroc"], r["aupro"],
              {d: v["pixel_auroc"] for d, v in r["per_defect"].items()}, flush=True)


if __name__ == "__main__":
    main()
