"""Probe (issue 20): why does the memory score lag nearest-neighbour on the same features?

Fits (or loads) one AnoMem on a CIFAR-10 class and scores the full test split with the memory
score (Eq. 13) at the trained inverse temperature and at multiples of it (a scoring-time change
only: larger beta makes the recollection nearer to the single closest pattern), and 1-NN on the
same LayerNorm-ed pooled features; per scale, how near the learned patterns lie to the training
features (how many patterns are some training position's nearest, the mean cosine of a position to
its nearest pattern) and the same deviation score with the learned patterns replaced by a bank of
``M`` random training positions' normalised features (``bank{M}_s*``, at 4x beta). One JSON line per
model, appended to ``--out``.

    python results/anomem_memory_probe.py --data /tmp/cifar10 --classes automobile \
        --set '{"pretext": "rotation", "contrastive_trains_encoder": false}' --model /tmp/auto.pt
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
from anomem_curves import feature_knn, load_split  # noqa: E402
from anomem_diagnostics import auroc  # noqa: E402

from pyanomaly import AnoMem  # noqa: E402


@torch.no_grad()
def pattern_diagnostics(detector: AnoMem, train: torch.Tensor, test: torch.Tensor, is_anomaly) -> dict:
    model = detector.model_.eval()

    def positions(images):  # per scale, the normalised state of every position (N, P, C)
        parts = [model.features(images[i : i + 500].float() / 255) for i in range(0, len(images), 500)]
        maps = [torch.cat(c) for c in zip(*parts)]
        return [memory.states(m.flatten(2).transpose(1, 2)) for memory, m in zip(model.memories, maps)]

    out = {}
    for stage, memory, tr, te in zip(detector.scales, model.memories, positions(train), positions(test)):
        patterns = memory.stored_patterns()
        queries = tr.reshape(-1, tr.shape[-1])
        nearest = torch.cat([(queries[i : i + 20000] @ patterns.T).argmax(1) for i in range(0, len(queries), 20000)])
        out[f"patterns_used_s{stage}"] = f"{nearest.unique().numel()}/{len(patterns)}"
        out[f"nearest_pattern_cos_s{stage}"] = round(float(F.cosine_similarity(queries, patterns[nearest]).mean()), 3)
        for size in (len(patterns), 2048):
            bank = queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[:size]]
            flat = te.reshape(-1, te.shape[-1])
            recall = torch.cat([(4 * memory.beta * flat[i : i + 20000] @ bank.T).softmax(1) @ bank
                                for i in range(0, len(flat), 20000)])
            score = (flat - recall).norm(dim=1).view(len(te), -1).norm(dim=1)
            out[f"bank{size}_s{stage}"] = auroc(is_anomaly, score.numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("/tmp"))
    parser.add_argument("--classes", default="automobile")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", default="{}")
    parser.add_argument("--model", type=Path, help="save the fit here, or load it when it exists")
    parser.add_argument("--betas", default="1,2,4,8,16")
    parser.add_argument("--out", type=Path, default=Path("results/anomem_memory_probe.jsonl"))
    args = parser.parse_args()
    train_all, train_labels, classes = load_split(args.data, "train", args.cache)
    test, test_labels, _ = load_split(args.data, "test", args.cache)
    for name in args.classes.split(","):
        label = classes.index(name)
        train = train_all[torch.from_numpy(train_labels == label)]
        is_anomaly = (test_labels != label).astype(np.int64)
        config = dict(backbone="resnet18", width=args.width, small_input=True, epochs=args.epochs,
                      batch_size=args.batch_size, lr=0.1, seed=args.seed, **json.loads(args.set))
        path = args.model.with_name(f"{args.model.stem}-{name}{args.model.suffix}") if args.model else None
        fit_s = None
        if path is not None and path.exists():
            detector = AnoMem.load(path)
        else:
            tick = time.perf_counter()
            detector = AnoMem(**config).fit(train)
            fit_s = round(time.perf_counter() - tick, 1)
            if path is not None:
                detector.save(path)
        row = {"class": name, "config": config, "fit_s": fit_s}
        row.update({k: auroc(is_anomaly, v) for k, v in feature_knn(detector, train, test).items()})
        for memory in detector.model_.memories:
            memory.base_beta = memory.beta
        for factor in [float(b) for b in args.betas.split(",")]:
            for memory in detector.model_.memories:
                memory.beta = memory.base_beta * factor
            scales = detector.scale_scores(test)
            row[f"memory_beta_x{factor:g}"] = auroc(is_anomaly, detector._weighted_sum(torch.as_tensor(scales)))
            for i, stage in enumerate(detector.scales):
                row[f"memory_s{stage}_beta_x{factor:g}"] = auroc(is_anomaly, scales[:, i])
        row.update(pattern_diagnostics(detector, train, test, is_anomaly))
        row.update(threads=torch.get_num_threads(), load=round(os.getloadavg()[0], 2))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
