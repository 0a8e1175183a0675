"""AnoMem's ``cpu`` preset on the shared industrial sets (MVTec layout): one-class image AUROC.

The preset was chosen on solar-cell EL images that are not shared here (issue 20); this checks it on
the two industrial sets that are: each seed fits ``AnoMem.preset("cpu", seed=S)`` on the set's
``train/good`` images and scores its whole test split. One JSON line per run, appended to ``--out``
as it finishes, with the fit and scoring wall times, the torch threads and the load average. The
no-learning floor on the same split is ``results/floors.py`` (per-pixel Gaussian, brightness).

    python results/anomem_industrial.py --root ../shared/data/mvtec_format --sets magnetic_tile,glass --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from pyanomaly import AnoMem
from pyanomaly.data import MVTecDataset
from pyanomaly.metrics import image_auroc


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
        labels = np.array([test[i].label for i in range(len(test))])
        for seed in (int(s) for s in args.seeds.split(",")):
            load_before = os.getloadavg()[0]
            detector = AnoMem.preset(args.preset, seed=seed, **overrides)
            start = time.perf_counter()
            detector.fit(train)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            scores = detector.decision_function(test)
            row = {"set": name, "preset": args.preset, "overrides": overrides, "seed": seed,
                   "n_train": len(train), "n_test": len(test),
                   "image_auroc": round(float(image_auroc(labels, scores)), 4),
                   "final_loss": round(float(detector.history_[-1]["loss"]), 4),
                   "train_precision": detector.train_precision_,
                   "fit_s": round(fit_s, 1), "score_s": round(time.perf_counter() - start, 1),
                   "threads": torch.get_num_threads(), "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
