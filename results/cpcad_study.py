"""CPC-AD study on MVTec-layout sets: one JSON line per (setting, seed) run, appended as it ends.

Each run fits ``CPCAD(**BASE, **SETTINGS[name])`` on ``<root>/<set>/train/good``, scores the test
split and records image AUROC for several top-k poolings (from the same sub-patch scores), every
scoring-time variant (credit x score_norm, from the same trained model), optionally a learning
curve (``--curve 10,30,60``: AUROC at those epochs, with a temporary bank; fit_s excludes it),
pixel AUROC and AUPRO at 256 x 256 (maps bilinear, masks nearest), per-defect numbers, the loss
curve, fit and score wall time and the load average. The no-learning floors are in ``floors.py``.

Run: ``python results/cpcad_study.py --root ../shared/data/mvtec_format --set magnetic_tile
--settings base,e300 --seeds 0,1,2 --out results/cpcad_study.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from pyanomaly import CPCAD
from pyanomaly.data import MVTecDataset, resize_masks
from pyanomaly.metrics import aupro, image_auroc, pixel_auroc
from pyanomaly.models.cpcad.detector import position_stats
from pyanomaly.models.cpcad.torch_model import CREDITS

EVAL_SIZE = 256
TOP_KS = (1, 0.01, 0.02, 0.05, 0.1, 1.0)

#: results/cpcad.md's reduced config (128 px, 7x7 windows of 16 px sub-patches at stride 8).
BASE = dict(
    image_size=128, patch_size=64, patch_stride=32, sub_size=16, sub_stride=8, layout="grid",
    stem="fast", widths=(32, 64, 128), blocks=(1, 1, 1), shared_encoder=True, prediction_steps=3,
    batch_size=16, lr=1e-3, epochs=60, verbose=False,
)

SETTINGS: dict[str, dict] = {
    "base": {},
    "e150": {"epochs": 150},
    "e300": {"epochs": 300},
    "gim_stem": {"stem": "gim"},
    "wide": {"widths": (64, 128, 256)},
    "blocks2": {"blocks": (2, 2, 2)},
    "four_encoders": {"shared_encoder": False},
    "k1": {"prediction_steps": 1},
    "k5": {"prediction_steps": 5},
    "crop1": {"crop_fraction": 1.0},
    "crop05": {"crop_fraction": 0.5},
    "lr3e-4": {"lr": 3e-4},
    "lr3e-3": {"lr": 3e-3},
    "px256": {"image_size": 256, "patch_size": 128, "patch_stride": 64, "sub_size": 32, "sub_stride": 16},
    "px384": {"image_size": 384, "patch_size": 192, "patch_stride": 96, "sub_size": 48, "sub_stride": 24},
    "draws1": {"test_draws": 1},
    "draws32": {"test_draws": 32},
    "cosine": {"lr": 3e-3, "lr_schedule": "cosine", "warmup_epochs": 5},
    "e150_cosine": {"epochs": 150, "lr": 3e-3, "lr_schedule": "cosine", "warmup_epochs": 5},
    "pad": {"aspect": "pad"},
    # BASE + best128 was CPCAD.PRESETS["cpu"] until 2026-12-02; the preset now adds
    # anomaly_score="combined" (results/cpcad_knn.py scores both from one fit)
    "best128": {"epochs": 150, "lr": 3e-3, "lr_schedule": "cosine", "warmup_epochs": 5, "aspect": "pad",
                "score_norm": "position"},
    "px256_sub16": {"image_size": 256, "patch_size": 64, "patch_stride": 32, "sub_size": 16, "sub_stride": 8},
    "px256_e150": {"image_size": 256, "patch_size": 128, "patch_stride": 64, "sub_size": 32, "sub_stride": 16,
                   "epochs": 150},
}


def _metrics(detector: CPCAD, grid: torch.Tensor, samples, labels, masks, defects) -> dict:
    maps = detector.maps_from(grid, [tuple(s.image.shape[1:]) for s in samples])
    pix = np.stack([F.interpolate(torch.from_numpy(m)[None, None], size=(EVAL_SIZE,) * 2, mode="bilinear")[0, 0].numpy()
                    for m in maps])
    sizes = [tuple(s.image.shape[1:]) for s in samples]
    out: dict = {"image_auroc_topk": {}}
    configured = detector.top_k
    for k in TOP_KS:
        detector.top_k = k
        out["image_auroc_topk"][str(k)] = image_auroc(labels, detector.image_scores_from(grid, sizes))
    detector.top_k = configured
    scores = detector.image_scores_from(grid, sizes)
    out["image_auroc"] = image_auroc(labels, scores)
    out["pixel_auroc"] = pixel_auroc(masks, pix) if masks.any() else None
    out["aupro"] = aupro(masks, pix) if masks.any() else None
    good = [i for i, d in enumerate(defects) if d == "good"]
    out["per_defect"] = {}
    for defect in sorted(set(defects) - {"good"}):
        index = np.array(good + [i for i, d in enumerate(defects) if d == defect])
        bad = np.array([i for i, d in enumerate(defects) if d == defect])
        out["per_defect"][defect] = {
            "image_auroc": image_auroc(labels[index], scores[index]),
            "pixel_auroc": pixel_auroc(masks[bad], pix[bad]) if masks[bad].any() else None,
        }
    return out


def evaluate(detector: CPCAD, train_images, samples) -> dict:
    """The configured scoring's metrics, plus every scoring-time variant of the same trained model:
    ``variants["<credit>/<score_norm>"]`` (the objective depends on neither, so one fit serves all)."""
    images = [s.image for s in samples]
    labels = np.array([s.label for s in samples])
    defects = [s.defect_type for s in samples]
    masks = resize_masks([s.mask for s in samples], (EVAL_SIZE, EVAL_SIZE)).numpy()
    out = _metrics(detector, detector.subpatch_scores(images), samples, labels, masks, defects)
    configured = detector.credit, detector.test_negatives
    out["variants"] = {}
    with torch.no_grad():
        for credit, negatives in [(c, None) for c in CREDITS] + [("target", 128)]:
            detector.credit, detector.test_negatives = credit, negatives
            train_grid, test_grid = detector._subpatch_scores(train_images), detector._subpatch_scores(images)
            mean, std = position_stats(train_grid)
            for norm, grid in (("none", test_grid), ("position", (test_grid - mean) / std)):
                variant = _metrics(detector, grid, samples, labels, masks, defects)
                out["variants"][f"{credit}/{norm}" + (f"/neg{negatives}" if negatives else "")] = variant
    detector.credit, detector.test_negatives = configured
    return out


def curve_point(detector: CPCAD, train_images, samples, epoch: int, loss: float, fit_s: float) -> dict:
    """Image / pixel AUROC (raw and position-normalised scores) of the model mid-training."""
    labels = np.array([s.label for s in samples])
    masks = resize_masks([s.mask for s in samples], (EVAL_SIZE, EVAL_SIZE)).numpy()
    defects = [s.defect_type for s in samples]
    train_grid, test_grid = detector.scores_now(train_images, [s.image for s in samples])
    mean, std = position_stats(train_grid)
    point = {"epoch": epoch, "loss": round(loss, 4), "fit_s": round(fit_s, 1)}
    for norm, grid in (("none", test_grid), ("position", (test_grid - mean) / std)):
        m = _metrics(detector, grid, samples, labels, masks, defects)
        point[norm] = {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"]}
    return point


def run(root: str, name: str, setting: str, seed: int, extra: dict, curve: set[int] = frozenset()) -> dict:
    config = {**BASE, **SETTINGS[setting], **extra, "seed": seed}
    train = MVTecDataset(root, name, "train")
    test = MVTecDataset(root, name, "test")
    train_images = [train[i].image for i in range(len(train))]
    samples = [test[i] for i in range(len(test))]
    load_before = os.getloadavg()[0]
    points, spent = [], [0.0]
    tick = time.perf_counter()

    def on_epoch_end(detector: CPCAD, record: dict) -> None:
        if record["epoch"] in curve:
            start = time.perf_counter()
            fit_s = start - tick - spent[0]
            points.append(curve_point(detector, train_images, samples, record["epoch"], record["loss"], fit_s))
            print("  curve", setting, seed, json.dumps(points[-1]), flush=True)
            spent[0] += time.perf_counter() - start

    detector = CPCAD(**config).fit(train, on_epoch_end=on_epoch_end)
    fit_s = time.perf_counter() - tick - spent[0]
    tick = time.perf_counter()
    metrics = evaluate(detector, train_images, samples)
    score_s = time.perf_counter() - tick
    return {
        "set": name, "setting": setting, "seed": seed, "extra": extra, "fit_s": round(fit_s, 1),
        "score_s": round(score_s, 1), "load_before": load_before, "load_after": os.getloadavg()[0],
        "threads": torch.get_num_threads(), "curve": points, "final_loss": detector.history_[-1] if detector.history_ else None,
        "loss_curve": [round(v, 4) for v in detector.history_], **metrics,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="../shared/data/mvtec_format")
    parser.add_argument("--set", default="magnetic_tile")
    parser.add_argument("--settings", default="base")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--extra", default="{}", help="JSON overrides applied to every setting")
    parser.add_argument("--out", default="results/cpcad_study.jsonl")
    parser.add_argument("--curve", default="", help="comma-separated epochs to evaluate at (learning curve)")
    args = parser.parse_args()
    curve = {int(e) for e in args.curve.split(",") if e}
    for setting in args.settings.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            record = run(args.root, args.set, setting, seed, json.loads(args.extra), curve)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(setting, seed, record["image_auroc"], record["pixel_auroc"], record["fit_s"], flush=True)


if __name__ == "__main__":
    main()
