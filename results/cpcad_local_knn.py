"""A position-restricted nearest-neighbour score on CPC-AD's embeddings (a probe; not in the library).

``knn`` (the library's) searches every training sub-patch embedding; ``local r`` only those of the
training images' sub-patches within r grid cells of the same position (a training image's own rows
left out for its statistics), so a dark region is compared with what lies *there* on normal parts.
Each score is standardised per position over the training images and summed with the library's
InfoNCE part, one- or two-sided. From one saved ``cpu``-preset model (``results/cpcad_knn.py
--model``); prints one line per variant and appends them to ``--out``.

    python results/cpcad_local_knn.py --root ../shared/data/mvtec_format --set magnetic_tile --model m.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpcad_knn import metrics  # noqa: E402

from pyanomaly import CPCAD  # noqa: E402
from pyanomaly.data import MVTecDataset  # noqa: E402
from pyanomaly.models.cpcad.detector import position_stats  # noqa: E402


def local_knn(query: torch.Tensor, bank: torch.Tensor, radius: int, leave_out: bool) -> torch.Tensor:
    """(n, G, G, D) queries, (N, G, G, D) training grids -> (n, G, G) L2 distance to the nearest
    training embedding within ``radius`` cells (``leave_out``: query i is training image i)."""
    n, g, _, d = query.shape
    out = torch.empty(n, g, g)
    for i in range(g):
        for j in range(g):
            near = bank[:, max(0, i - radius) : i + radius + 1, max(0, j - radius) : j + radius + 1].reshape(bank.shape[0], -1, d)
            owner = torch.arange(bank.shape[0]).repeat_interleave(near.shape[1])
            rows = near.reshape(-1, d)
            d2 = (query[:, i, j] ** 2).sum(-1, keepdim=True) - 2 * query[:, i, j] @ rows.T + (rows**2).sum(-1)
            if leave_out:
                d2 = d2.masked_fill(owner[None, :] == torch.arange(n)[:, None], float("inf"))
            out[:, i, j] = d2.clamp(min=0).min(1).values.sqrt()
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--set", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--radii", default="0,1,2,3")
    parser.add_argument("--out", default="results/cpcad_local_knn.jsonl")
    args = parser.parse_args()
    det = CPCAD.load(args.model, device="cpu")
    det.verbose, det.anomaly_score = False, "combined"
    train = [s.image for s in MVTecDataset(args.root, args.set, "train")]
    test = MVTecDataset(args.root, args.set, "test")
    samples = [test[i] for i in range(len(test))]
    train_parts = det._fit_score_stats(train)
    parts = det._component_grids([s.image for s in samples])

    def grids(images):  # the shared encoder's (N, G, G, D) embeddings
        return torch.cat([det._subpatch_grid(det._resize(images[i : i + 16]), None)[0].float() for i in range(0, len(images), 16)])

    def z(train_grid, grid):
        mean, std = position_stats(train_grid)
        return (grid - mean) / std

    train_grid, test_grid = grids(train), grids([s.image for s in samples])
    infonce = {}
    for sides in ("upper", "both"):
        det.infonce_sides = sides
        infonce[sides] = det._normalized({"infonce": parts["infonce"]})
    knn = z(train_parts["knn"], parts["knn"])
    rows = {"combined": infonce["upper"] + knn, "combined_both": infonce["both"] + knn}
    for r in (int(v) for v in args.radii.split(",")):
        local = z(local_knn(train_grid, train_grid, r, True), local_knn(test_grid, train_grid, r, False))
        rows[f"local{r}"] = local
        for sides in ("upper", "both"):
            rows[f"infonce_{sides}+local{r}"] = infonce[sides] + local
            rows[f"infonce_{sides}+knn+local{r}"] = infonce[sides] + knn + local
    with open(args.out, "a") as f:
        for name, grid in rows.items():
            m = metrics(det, grid, samples)
            f.write(json.dumps({"set": args.set, "model": Path(args.model).name, "score": name, **m}) + "\n")
            print(name, m["image_auroc"], m["pixel_auroc"], m["aupro"], {d: v["pixel_auroc"] for d, v in m["per_defect"].items()}, flush=True)


if __name__ == "__main__":
    main()
