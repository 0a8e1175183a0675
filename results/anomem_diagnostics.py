"""Is AnoMem's one-class score limited by its memory or by its representation? (results/anomem.md)

For each CIFAR-10 class taken as normal, this trains a one-class AnoMem and, with the same
encoder, augmentations, optimiser and budget, a plain SimCLR (global average pool, projection
head, NT-Xent). It then reports image AUROCs on the test subset:

- ``score``: AnoMem's one-class score (Eq. 13, both scales);
- ``dev_sK``: the memory-deviation norm of the memory after encoder stage K alone (Eq. 9);
- ``knn_sK``: 1-nearest-neighbour cosine distance from each test image's pooled, LayerNorm-ed
  stage-K features to the training images' (what the same representation gives without memory);
- ``simclr``: the same kNN score on the plain SimCLR encoder's pooled stage-4 features;
- ``eff_sK``: the memory's effective number of patterns per query, exp(entropy of the softmax),
  and ``used_s``: how many stored patterns are some query's most likely one.

Run from the repository root (about 5 minutes per class on 2 CPU cores with the defaults):

    python results/anomem_diagnostics.py --data /tmp/cifar10 --out /tmp/anomem_diag
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from pyanomaly import AnoMem
from pyanomaly.data import ClassFolderDataset, load_image
from pyanomaly.models.anomem.augment import AugmentConfig, simclr_view
from pyanomaly.models.anomem.torch_model import nt_xent
from pyanomaly.nn.resnet import resnet18


def load_subset(root: Path, split: str, per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Up to ``per_class`` seeded random images of every class: uint8 (N, 3, 32, 32), labels (N,)."""
    dataset = ClassFolderDataset(root, split)
    labels = np.asarray(dataset.labels)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [
            np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
            for c in range(len(dataset.classes))
        ]
    )
    images = torch.stack([load_image(dataset.paths[i], grayscale=False) for i in chosen])
    return images, labels[chosen]


def auroc(is_anomaly: np.ndarray, scores) -> float:
    return round(100 * roc_auc_score(is_anomaly, np.asarray(scores, dtype=np.float64)), 1)


def knn_distance(test: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """1 - the cosine similarity of each (N, D) test vector to its nearest (M, D) training vector."""
    similarity = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    return (1 - similarity.max(dim=1).values).numpy()


@torch.no_grad()
def anomem_report(detector: AnoMem, train: torch.Tensor, test: torch.Tensor, is_anomaly: np.ndarray) -> dict:
    model = detector.model_.eval()
    row = {"score": auroc(is_anomaly, detector.decision_function(test))}
    train_maps = model.features(train.float() / 255)
    test_maps = model.features(test.float() / 255)
    for i, (stage, memory, fmap) in enumerate(zip(model.scales, model.memories, test_maps)):
        s = f"s{stage}"  # the encoder stage
        b, c, h, w = fmap.shape
        states = memory.states(fmap.permute(0, 2, 3, 1).reshape(-1, c))
        deviation = (states - memory.retrieve(states)[0]).view(b, -1)
        row[f"dev_{s}"] = auroc(is_anomaly, deviation.norm(dim=1))
        pooled_test = memory.states(fmap.mean(dim=(2, 3)))
        pooled_train = memory.states(train_maps[i].mean(dim=(2, 3)))
        row[f"knn_{s}"] = auroc(is_anomaly, knn_distance(pooled_test, pooled_train))
        probs = (memory.beta * states @ memory.stored_patterns().T).softmax(dim=-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
        row[f"eff_{s}"] = round(float(entropy.exp().mean()), 1)
        row[f"used_{s}"] = f"{int(probs.argmax(dim=-1).unique().numel())}/{memory.num_patterns}"
    return row


def simclr_knn(args, train: torch.Tensor, test: torch.Tensor, is_anomaly: np.ndarray) -> float:
    """Plain SimCLR with AnoMem's encoder, augmentations and optimiser; kNN AUROC on stage 4."""
    torch.manual_seed(args.seed)
    encoder = resnet18(in_channels=3, width=args.width, small_input=True)
    channels = encoder.stage_channels[3]
    head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, 128))
    images = train.float() / 255
    mean, std = images.mean(dim=(0, 2, 3)).view(1, -1, 1, 1), images.std(dim=(0, 2, 3)).view(1, -1, 1, 1)

    def pooled(x):
        return encoder((x - mean) / std, num_stages=4)[3].mean(dim=(2, 3))

    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = len(images) // args.batch_size
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps * args.epochs)
    gen = torch.Generator().manual_seed(args.seed + 1)
    config = AugmentConfig()
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=gen)
        for step in range(steps):
            x = images[order[step * args.batch_size : (step + 1) * args.batch_size]]
            first, _ = simclr_view(x, config, gen)
            second, _ = simclr_view(x, config, gen)
            z = head(pooled(torch.cat([first, second])))
            loss = nt_xent(z[: len(x)], z[len(x) :], 0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    encoder.eval()
    with torch.no_grad():
        return auroc(is_anomaly, knn_distance(pooled(test.float() / 255), pooled(images)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 as <root>/<split>/<class>/*.jpg")
    parser.add_argument("--out", type=Path, required=True, help="folder for diagnostics.{json,md}")
    parser.add_argument("--classes", type=int, nargs="*", default=list(range(10)))
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    train_all, train_labels = load_subset(args.data, "train", args.train_per_class, args.seed)
    test, test_labels = load_subset(args.data, "test", args.test_per_class, args.seed)
    classes = ClassFolderDataset(args.data, "test").classes
    rows = []
    for c in args.classes:
        tick = time.perf_counter()
        train = train_all[train_labels == c]
        is_anomaly = (test_labels != c).astype(np.int64)
        detector = AnoMem(
            backbone="resnet18",
            width=args.width,
            batch_size=args.batch_size,
            epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
        ).fit(train)
        row = {"class": classes[c], **anomem_report(detector, train, test, is_anomaly)}
        row["simclr"] = simclr_knn(args, train, test, is_anomaly)
        row["seconds"] = round(time.perf_counter() - tick)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "diagnostics.json").write_text(
            json.dumps(
                {"args": vars(args) | {"data": str(args.data), "out": str(args.out)}, "rows": rows}, indent=1
            )
        )

    columns = [k for k in rows[0] if k != "class"]
    lines = ["| class | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {r['class']} | " + " | ".join(str(r[k]) for k in columns) + " |" for r in rows]
    means = [k for k in columns if isinstance(rows[0][k], float)]
    lines.append(
        "| **mean** | "
        + " | ".join(f"**{np.mean([r[k] for r in rows]):.1f}**" if k in means else "" for k in columns)
        + " |"
    )
    (args.out / "diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
