"""Peak training memory per image at the paper's CPC-AD size, with and without activation checkpointing.

One training step (forward, InfoNCE objective, backward) of ``CPCAD.preset("paper")`` geometry
(768 px, 256/128 patches, 64/32 sub-patches, GIM stem, ResNet-18 v2 to stage 3) on one image, with
ONE encoder (``shared_encoder=True``; the paper's four separate encoders hold four times the
encoder activations), each setting in a fresh process: peak RSS above the process's start (the
model included), and the step time (median of ``--repeats``). Settings: layout grid / nested x
activation checkpointing off / on x fused ops / references, fp32, plus bf16 autocast for grid.

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


def main() -> None:
    from bench._harness import run_isolated

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/memory-cpu.json")
    args = parser.parse_args()
    rows, load_before = [], os.getloadavg()
    for setting in SETTINGS:
        result = run_isolated("bench.bench_memory:step", {**setting, "repeats": args.repeats}, timeout=1200)
        rows.append({**setting, **result})
        print(json.dumps(rows[-1]), flush=True)
    record = {"what": "one CPC-AD training step, paper geometry, 1 image, 1 encoder", "threads": os.environ.get("OMP_NUM_THREADS"),
              "load_before": load_before, "load_after": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
