"""Peak training memory per image at the paper's CPC-AD size, with and without activation checkpointing.

One training step (forward, InfoNCE objective, backward) of ``CPCAD.preset("paper")`` geometry
(768 px, 256/128 patches, 64/32 sub-patches, GIM stem, ResNet-18 v2 to stage 3) on one image, with
ONE encoder (``shared_encoder=True``; the paper's four separate encoders hold four times the
encoder activations), each setting in a fresh process: peak RSS above the process's start (the
model included), and the step time (median of ``--repeats``). Settings: layout grid / nested x
activation checkpointing off / on x fused ops / references, fp32, plus bf16 autocast for grid.
And one AnoMem stage-1 step (ResNet-50, 32 px, the paper's preset) at batch 16 and 32, activation
checkpointing off / on (``--anomem-only`` refreshes just these rows): the
difference / 16 is the memory per image.

Run: ``python -m bench.bench_memory [--repeats 2] [--out bench/results/memory-cpu.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

SETTINGS = [
    {"layout": layout, "activation_checkpointing": ckpt, "ops": ops, "precision": "fp32"}
    for layout in ("grid", "nested") for ckpt in (False, True) for ops in ("fused", "reference")
] + [{"layout": "grid", "activation_checkpointing": ckpt, "ops": "fused", "precision": "bf16"} for ckpt in (False, True)]


def step(layout: str, activation_checkpointing: bool, ops: str, precision: str, repeats: int) -> dict:
    """Peak RSS above the start and the median time of one training step on one 768 px image."""
    import contextlib

    import torch

    from bench._harness import _peak_rss, _reset_hwm
    from pyanomaly import CPCAD, _ext

    _reset_hwm()
    start_rss = _peak_rss()
    detector = CPCAD.preset("paper", shared_encoder=True, layout=layout, precision=precision, device="cpu",
                            activation_checkpointing=activation_checkpointing, verbose=False, seed=0)
    detector.model_ = detector._build_model().train()
    image = torch.randint(0, 256, (1, 1, 768, 768), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    times = []
    context = _ext.reference_mode() if ops == "reference" else contextlib.nullcontext()
    with context:
        for _ in range(repeats):
            tick = time.perf_counter()
            windows = detector._windows(image, None)
            _, _, objective = detector.model_(windows, num_negatives=16, generator=gen)
            objective.backward()
            detector.model_.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - tick)
    return {"peak_gb": (_peak_rss() - start_rss) / 2**30, "step_s": statistics.median(times)}


def anomem_step(batch: int, precision: str, repeats: int, activation_checkpointing: bool = False) -> dict:
    """Peak RSS above the start and median time of one AnoMem stage-1 step (ResNet-50, width 64,
    CIFAR stem, 32 px, the paper's memories), ``batch`` images, blocks recomputed in the backward
    or not."""
    import torch

    from bench._harness import _peak_rss, _reset_hwm
    from pyanomaly import AnoMem
    from pyanomaly.models.anomem.augment import AugmentConfig, simclr_view

    _reset_hwm()
    start_rss = _peak_rss()
    detector = AnoMem.preset("paper", precision=precision, device="cpu", verbose=False,
                             activation_checkpointing=activation_checkpointing)
    model = detector._build_model(3, (32, 32)).train()
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gen, config, times = torch.Generator().manual_seed(1), AugmentConfig(), []
    for _ in range(repeats):
        tick = time.perf_counter()
        first, first_crop = simclr_view(images, config, gen)
        second, second_crop = simclr_view(images, config, gen)
        with detector._autocast():
            loss, _ = model.contrastive_loss(first, first_crop, second, second_crop, torch.ones(batch, dtype=torch.bool),
                                             sampling_ratios=detector.sampling_ratios, scale_weights=detector.weights_,
                                             temperature=detector.temperature, variance_weight=detector.variance_weight,
                                             generator=gen, negatives=detector.negatives)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
    return {"peak_gb": (_peak_rss() - start_rss) / 2**30, "step_s": statistics.median(times)}


def main() -> None:
    from bench._harness import run_isolated

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/memory-cpu.json")
    parser.add_argument("--anomem-only", action="store_true", help="only the AnoMem rows")
    args = parser.parse_args()
    rows, load_before = [], os.getloadavg()
    for ckpt in (False, True):
        for batch in (16, 32):  # per image: the difference over 16 images (the model's own memory cancels)
            setting = {"batch": batch, "precision": "fp32", "activation_checkpointing": ckpt}
            result = run_isolated("bench.bench_memory:anomem_step", {**setting, "repeats": args.repeats}, timeout=1200)
            rows.append({"method": "anomem resnet50 32px", **setting, **result})
            print(json.dumps(rows[-1]), flush=True)
    for setting in [] if args.anomem_only else SETTINGS:
        result = run_isolated("bench.bench_memory:step", {**setting, "repeats": args.repeats}, timeout=1200)
        rows.append({**setting, **result})
        print(json.dumps(rows[-1]), flush=True)
    record = {"what": "one CPC-AD training step, paper geometry, 1 image, 1 encoder", "threads": os.environ.get("OMP_NUM_THREADS"),
              "load_before": load_before, "load_after": os.getloadavg(), "rows": rows}
    out = Path(args.out)
    if args.anomem_only and out.is_file():  # add the rows to the CPC-AD ones already measured
        previous = json.loads(out.read_text())
        record["rows"] = [r for r in previous["rows"] if not r.get("method", "").startswith("anomem")] + rows
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
