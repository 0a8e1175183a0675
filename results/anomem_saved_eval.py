"""Scores of saved AnoMem detectors on CIFAR-10 one-vs-all (issue 20), with kNN on the same features.

For each ``--models`` file (``results/anomem_curves.py --save-dir``'s ``<class>-s<seed>.pt``): the
memory score of the saved detector (Eq. 13, ``decision_function``) and per scale, and the columns
of ``anomem_curves.py`` on the same encoder (``knn_s*``, ``csi_s*``, ``norm_s*``, ``rotation``),
on the full test split, training features from all 5000 images of the class. One JSON line per
model, appended to ``--out``, with the precision stage 1 trained in.

    python results/anomem_saved_eval.py --data /tmp/cifar10 --models /tmp/ff-models/*.pt
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomem_curves import feature_knn, load_split  # noqa: E402
from anomem_diagnostics import auroc  # noqa: E402

from pyanomaly import AnoMem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp"))
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="saved detectors, <class>-s<seed>.pt")
    parser.add_argument("--out", type=Path, default=Path("results/anomem_final_features.jsonl"))
    args = parser.parse_args()
    train_all, train_labels, classes = load_split(args.data, "train", args.cache)
    test, test_labels, _ = load_split(args.data, "test", args.cache)
    for path in args.models:
        name = path.stem.rsplit("-s", 1)[0]
        if name not in classes:
            parser.error(f"--models: {path.name} does not start with a CIFAR-10 class name ({', '.join(classes)})")
        normal = classes.index(name)
        train = train_all[torch.from_numpy(train_labels == normal)]
        is_anomaly = (test_labels != normal).astype(np.int64)
        tick = time.perf_counter()
        detector = AnoMem.load(path, device="cpu")
        scale_scores = detector.scale_scores(test)
        row = {"class": name, "kind": "saved_eval", "model": path.name, "epochs": detector.epochs, "seed": detector.seed,
               "memory_init": detector.memory_init, "train_precision": detector.train_precision_,
               "memory": auroc(is_anomaly, detector.decision_function(test))}
        row.update({f"memory_s{s}": auroc(is_anomaly, scale_scores[:, i]) for i, s in enumerate(detector.scales)})
        row.update({k: auroc(is_anomaly, v) for k, v in feature_knn(detector, train, test).items()})
        row.update(eval_s=round(time.perf_counter() - tick, 1), threads=torch.get_num_threads(),
                   load=round(os.getloadavg()[0], 2))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
