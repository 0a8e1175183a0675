"""Probe (issue 20): does a rotation-prediction pretext task give one-class CIFAR-10 features that
beat the raw-pixel floor on a CPU budget, where AnoMem's instance-contrastive stage 1 does not?

Golan & El-Yaniv (2018) and CSI (Tack et al., 2020) train the encoder to tell which of four turns
(0, 90, 180, 270 degrees) an image of the normal class was given; the features then encode the
class's canonical orientation, which the one-vs-all anomalies lack. This trains the same encoder as
AnoMem's runs (ResNet-18, CIFAR stem) on that task alone, all 5000 training images of the class
(random crop with 4 px padding and horizontal flip, each image in all four turns), SGD Nesterov with
cosine decay, and scores all 10,000 test images by

- ``rotation``: Golan's score, minus the mean over the four turns of log p(turn | turned image);
- ``knn_s3`` / ``knn_s4``: 1-NN cosine distance on the upright images' pooled, LayerNorm-ed stage
  features (what AnoMem's memories would store).

One JSON line per evaluation, appended to ``--out`` as it is measured, with wall times.

    python results/anomem_rotation_probe.py --data /tmp/cifar10 --classes airplane --epochs 6 --eval-at 2,4,6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomem_curves import load_split, pixel_knn  # noqa: E402
from anomem_diagnostics import auroc, knn_distance  # noqa: E402

from pyanomaly.nn.resnet import resnet18  # noqa: E402

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class RotationNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.encoder = resnet18(width=width, small_input=True)
        self.head = nn.Linear(8 * width, 4)

    def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8-range float images (B, 3, 32, 32) / 255 -> stage 3 and 4 maps."""
        x = ((images - MEAN) / STD).contiguous(memory_format=torch.channels_last)
        return self.encoder(x)[2:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(images)[-1].mean(dim=(2, 3)))


def turned(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> all four turns (4B, C, H, W) and their labels (4B,)."""
    out = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return out, torch.arange(4).repeat_interleave(len(images))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32 px crop of the 4 px zero-padded image and a random horizontal flip."""
    b = len(images)
    padded = F.pad(images, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (b,), generator=generator)
    dy = torch.randint(0, 9, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(b, 3, 32, 40)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(b, 3, 32, 32)
    out = out.gather(3, cols)
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def evaluate(model: RotationNet, train: torch.Tensor, test: torch.Tensor) -> dict[str, np.ndarray]:
    model.eval()

    def pooled(images):
        parts = [[m.mean(dim=(2, 3)) for m in model.stages(images[i : i + 500].float() / 255)]
                 for i in range(0, len(images), 500)]
        return [torch.cat([p[s] for p in parts]) for s in range(2)]

    out = {}
    for stage, tr, te in zip((3, 4), pooled(train), pooled(test)):
        ln = lambda v: F.layer_norm(v, v.shape[1:])  # noqa: E731
        out[f"knn_s{stage}"] = knn_distance(ln(te), ln(tr))
    scores = []
    for i in range(0, len(test), 500):
        x, k = turned(test[i : i + 500].float() / 255)
        logp = model(x).log_softmax(1).gather(1, k[:, None]).squeeze(1)
        scores.append(-logp.view(4, -1).mean(0))
    out["rotation"] = torch.cat(scores).numpy()
    model.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp"))
    parser.add_argument("--classes", default="airplane,automobile,ship")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eval-at", default="")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (x4 turns)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/anomem_rotation_probe.jsonl"))
    args = parser.parse_args()
    train_all, train_labels, classes = load_split(args.data, "train", args.cache)
    test, test_labels, _ = load_split(args.data, "test", args.cache)
    eval_at = {int(e) for e in args.eval_at.split(",") if e} or {args.epochs}

    def write(row: dict) -> None:
        row.update(threads=torch.get_num_threads(), load=round(os.getloadavg()[0], 2))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for name in args.classes.split(","):
        label = classes.index(name)
        train = train_all[torch.from_numpy(train_labels == label)]
        is_anomaly = (test_labels != label).astype(np.int64)
        write({"class": name, "kind": "floor", "pixel_knn": auroc(is_anomaly, pixel_knn(train, test))})
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        model = RotationNet(args.width).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps_per_epoch = len(train) // args.batch_size
        total = steps_per_epoch * args.epochs
        config = {"width": args.width, "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
                  "seed": args.seed}
        fit_s, step = 0.0, 0
        for epoch in range(1, args.epochs + 1):
            tick = time.perf_counter()
            order = torch.randperm(len(train), generator=generator)
            losses = []
            for i in range(steps_per_epoch):
                batch = augment(train[order[i * args.batch_size : (i + 1) * args.batch_size]].float() / 255, generator)
                x, k = turned(batch)
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(x), k)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
            fit_s += time.perf_counter() - tick
            print(f"{name} epoch {epoch} loss {np.mean(losses):.4f} fit {fit_s:.0f} s", flush=True)
            if epoch in eval_at:
                tick = time.perf_counter()
                scores = evaluate(model, train, test)
                row = {"class": name, "kind": "rotation", "epoch": epoch, "config": config,
                       "fit_s": round(fit_s, 1), "loss": round(float(np.mean(losses)), 4)}
                row.update({k: auroc(is_anomaly, v) for k, v in scores.items()})
                row["eval_s"] = round(time.perf_counter() - tick, 1)
                write(row)


if __name__ == "__main__":
    main()
