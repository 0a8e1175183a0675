"""Does CPC-AD track fp32 oneDNN training under bf16 autocast, or with small maps as products? (issue 21)

Fits ``CPCAD.preset("cpu")`` twice per seed, ``precision="fp32"`` and ``precision="bf16"`` (the
encoders under CPU bf16 autocast; predictors, InfoNCE and the scores stay fp32), and writes one JSON
line per fit: the per-epoch training loss, image / pixel AUROC and AUPRO of the preset's score on
the whole test split (``cpcad_knn.metrics``), and the fit's wall time with the thread count and
load beside it.

``--convs onednn,matmul`` fits each (seed, precision) once per way of running the encoders' small
maps (``pyanomaly.nn.conv.SMALL_MAPS_AS_MATMUL``; rows before session 13 have no ``"conv"`` key and
ran every conv through oneDNN).

Run: ``python results/cpcad_bf16_tracks.py --root ../shared/data/mvtec_format --set glass --seeds 0,1,2``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpcad_knn import metrics  # noqa: E402

from pyanomaly import CPCAD  # noqa: E402
from pyanomaly.data import MVTecDataset  # noqa: E402
from pyanomaly.nn import conv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/mvtec_format")
    parser.add_argument("--set", default="glass")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--convs", default="matmul", help="onednn and/or matmul: how small maps run")
    parser.add_argument("--out", default="results/cpcad_bf16_tracks.jsonl")
    args = parser.parse_args()
    train = MVTecDataset(args.root, args.set, "train")
    test = MVTecDataset(args.root, args.set, "test")
    train_images = [train[i].image for i in range(len(train))]
    samples = [test[i] for i in range(len(test))]
    runs = [(int(seed), precision, way) for seed in args.seeds.split(",")
            for precision in args.precisions.split(",") for way in args.convs.split(",")]
    for seed, precision, way in runs:
        if way not in ("onednn", "matmul"):
            raise SystemExit(f"--convs takes onednn and/or matmul, got {way!r}")
        conv.SMALL_MAPS_AS_MATMUL = way == "matmul"
        detector = CPCAD.preset("cpu", seed=seed, precision=precision, device="cpu", verbose=False)
        load_before, tick = os.getloadavg()[0], time.perf_counter()
        detector.fit(train_images)
        fit_s = round(time.perf_counter() - tick, 1)
        record = {"set": args.set, "seed": seed, "precision": precision, "conv": way, "fit_s": fit_s,
                  "threads": torch.get_num_threads(), "load_before": load_before, "load_after": os.getloadavg()[0],
                  "loss": [round(v, 4) for v in detector.history_],
                  **metrics(detector, detector.subpatch_scores([s.image for s in samples]), samples)}
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k not in ("loss", "per_defect")}), flush=True)


if __name__ == "__main__":
    main()
