"""Reproducer: intermittent non-finite weight gradients under CPU bf16 autocast (torch 2.13, AMX CPU).

Part 1, CPC-AD's small encoder alone (fast stem, widths 16/32/64, one block per stage) on 3600 sub-patches of 8 px,
one forward under ``torch.autocast("cpu", bfloat16)`` and a backward of a random projection of the
output, ``--trials`` times per layout; counts the trials in which any weight gradient holds NaN or
inf. Part 2, a one-step CPCAD fit at a tiny config, ``--trials / 2`` times per precision: how many
end with a non-finite weight. fp32 is the control. Prints one JSON line per row.

Run: ``python results/bf16_cpu_nan.py --trials 20`` (results/cpcad.md has the counts measured here).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from pyanomaly.models._precision import _cpu_flags
from pyanomaly.nn.preact_resnet import PreActResNetEncoder


def count_bad(channels_last: bool, bf16: bool, trials: int) -> int:
    torch.manual_seed(0)
    encoder = PreActResNetEncoder(1, (16, 32, 64), (1, 1, 1), (1, 2, 2), "fast")
    x = torch.randn(3600, 1, 8, 8)
    if channels_last:
        encoder, x = encoder.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    bad = 0
    for _ in range(trials):
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = encoder(x).float()
        (y * torch.randn_like(y)).sum().backward()
        bad += int(any(not bool(torch.isfinite(p.grad).all()) for p in encoder.parameters()))
    return bad


def count_bad_fits(precision: str, trials: int) -> int:
    """One-step CPCAD fits (4 random 64 px images, four encoders, 8 px sub-patches): how many end
    with a non-finite weight (the step's gradient was)."""
    from pyanomaly import CPCAD

    torch.manual_seed(0)
    images = [torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8) for _ in range(4)]
    config = dict(image_size=64, patch_size=32, patch_stride=16, sub_size=8, sub_stride=4, widths=(16, 32, 64),
                  blocks=(1, 1, 1), shared_encoder=False, stem="fast", prediction_steps=2, epochs=1,
                  crop_fraction=1.0, verbose=False, precision=precision, seed=0, device="cpu")
    bad = 0
    for _ in range(trials):
        detector = CPCAD(**config)
        try:
            detector.fit(images)
        except FloatingPointError:
            bad += 1
            continue
        bad += int(any(not bool(torch.isfinite(p).all()) for p in detector.model_.parameters()))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    flags = sorted(f for f in _cpu_flags() if "bf16" in f or "amx" in f)
    for channels_last in (True, False):
        for bf16 in (True, False):
            print(json.dumps({
                "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_flags": flags,
                "channels_last": channels_last, "precision": "bf16" if bf16 else "fp32", "trials": args.trials,
                "nonfinite_grad_trials": count_bad(channels_last, bf16, args.trials), "load": os.getloadavg()[0],
            }), flush=True)
    for precision in ("bf16", "fp32"):
        print(json.dumps({
            "torch": torch.__version__, "threads": torch.get_num_threads(), "what": "cpcad one-step fit",
            "precision": precision, "trials": args.trials // 2,
            "nonfinite_fits": count_bad_fits(precision, args.trials // 2), "load": os.getloadavg()[0],
        }), flush=True)


if __name__ == "__main__":
    main()
