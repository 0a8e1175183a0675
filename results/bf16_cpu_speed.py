"""Is bf16 autocast faster than fp32 for the detectors' encoders on this CPU? (issues 20 and 21)

One fwd+bwd step, channels_last, of ``--model cpcad``: the ``cpu`` preset's encoder (fast stem,
widths 32/64/128, one block per stage) on 3600 sub-patches of 16 px (16 images of the preset's
15 x 15 grid), or ``--model anomem``: the full-width CIFAR ResNet-18 on 128 images of 32 px; fp32 vs
``torch.autocast("cpu", torch.bfloat16)``, timed round robin (``--rounds`` of each, interleaved,
median reported) so that machine noise hits both alike. Prints and appends one JSON line.

Run: ``python results/bf16_cpu_speed.py`` on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from pyanomaly.models._precision import _cpu_flags
from pyanomaly.nn.preact_resnet import PreActResNetEncoder
from pyanomaly.nn.resnet import resnet18


def step(encoder: torch.nn.Module, x: torch.Tensor, bf16: bool) -> float:
    encoder.zero_grad(set_to_none=True)
    tick = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = encoder(x)
    y = y[-1] if isinstance(y, (list, tuple)) else y
    (y.float() ** 2).mean().backward()
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["cpcad", "anomem"], default="cpcad")
    parser.add_argument("--width", type=int, default=64, help="anomem: the ResNet-18 width")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="results/bf16_cpu_speed.jsonl")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "cpcad":
        encoder, x = PreActResNetEncoder(1, (32, 64, 128), (1, 1, 1), (1, 2, 2), "fast"), torch.randn(3600, 1, 16, 16)
        what = "cpu-preset CPC-AD encoder fwd+bwd, 3600 x 16 px, channels_last"
    else:
        encoder, x = resnet18(width=args.width, small_input=True).train(), torch.randn(128, 3, 32, 32)
        what = f"AnoMem ResNet-18 (width {args.width}, CIFAR stem) fwd+bwd, 128 x 32 px, channels_last"
    encoder = encoder.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    load_before = os.getloadavg()[0]
    for bf16 in (False, True):  # warm-up
        step(encoder, x, bf16)
    times = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in ("fp32", "bf16"):
            times[name].append(step(encoder, x, name == "bf16"))
    row = {"what": what, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "cpu_flags": sorted(f for f in _cpu_flags() if "bf16" in f or "amx" in f),
           "rounds": args.rounds, "fp32_s": round(statistics.median(times["fp32"]), 4),
           "bf16_s": round(statistics.median(times["bf16"]), 4), "load_before": load_before,
           "load_after": os.getloadavg()[0]}
    row["bf16_speedup"] = round(row["fp32_s"] / row["bf16_s"], 2)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
