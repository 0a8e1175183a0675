"""Reproducer: garbage weight gradients under CPU bf16 autocast (torch 2.13, AMX CPU), and the fix.

Part 0, the cause: one ``aten.convolution_backward`` in bf16 per case (3x3 and 7x7 kernels, stride 1
or 2, maps 1x1 to 4x4), its weight gradient against float64 from the same bf16 inputs; counts the
trials whose relative error exceeds 5% (NaN, inf, or values near 1e36 in the taps that see only
padding). On the AMX Xeon of session 9 every trial of a stride-2 conv over a map one pixel wide
(1x1, 2x1) failed, and nothing else. ``pyanomaly.nn.conv.StrideSafeConv2d`` (the encoders' conv
since then) runs such convs at stride 1, which gives the same result by construction.

Part 1, CPC-AD's small encoder alone (fast stem, widths 16/32/64, one block per stage) on 3600 sub-patches of 8 px,
one forward under ``torch.autocast("cpu", bfloat16)`` and a backward of a random projection of the
output, ``--trials`` times per layout; counts the trials in which any weight gradient is more than
50% off (in norm) the fp32 gradient of the same trial, or not finite, with the library's conv and
with plain ``nn.Conv2d`` swapped back in (``conv``). Part 2, a one-step CPCAD fit at a tiny config,
``--trials / 2`` times per precision: how many end with a non-finite weight. fp32 is the control.
Prints one JSON line per row.

Run: ``python results/bf16_cpu_nan.py --trials 20`` (results/cpcad.md has the counts measured here).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

from pyanomaly.models._precision import _cpu_flags
from pyanomaly.nn.conv import StrideSafeConv2d
from pyanomaly.nn.preact_resnet import PreActResNetEncoder


def count_bad_convs(kernel: int, stride: int, size: tuple[int, int], trials: int) -> int:
    """Trials of one bf16 conv weight gradient more than 5% off float64 (same bf16 inputs)."""
    torch.manual_seed(0)
    n, c, o, pad = 1024, 32, 64, kernel // 2
    bad = 0
    for _ in range(trials):
        x = torch.relu(torch.randn(n, c, *size)).bfloat16()
        w = (torch.randn(o, c, kernel, kernel) * 0.1).bfloat16()
        out = [(s + 2 * pad - kernel) // stride + 1 for s in size]
        grad = torch.randn(n, o, *out).bfloat16()
        args = ([o], [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [False, True, False])
        got = torch.ops.aten.convolution_backward(grad, x, w, *args)[1].double()
        truth = torch.ops.aten.convolution_backward(grad.double(), x.double(), w.double(), *args)[1]
        bad += int(not float((got - truth).abs().max() / truth.abs().max()) < 0.05)
    return bad


def plain_convs(module: nn.Module) -> nn.Module:
    """``module`` with every StrideSafeConv2d turned back into an ``nn.Conv2d`` (the same weights)."""
    for m in module.modules():
        if isinstance(m, StrideSafeConv2d):
            m.__class__ = nn.Conv2d
    return module


def count_bad(channels_last: bool, bf16: bool, trials: int, plain: bool = False) -> int:
    torch.manual_seed(0)
    encoder = PreActResNetEncoder(1, (16, 32, 64), (1, 1, 1), (1, 2, 2), "fast")
    if plain:
        plain_convs(encoder)
    x = torch.randn(3600, 1, 8, 8)
    if channels_last:
        encoder, x = encoder.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def grads(autocast: bool, weights: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        encoder.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = encoder(x).float()
        weights = torch.randn_like(y) if weights is None else weights
        (y * weights).sum().backward()
        return [p.grad.clone() for p in encoder.parameters()], weights

    bad = 0
    for _ in range(trials):
        got, weights = grads(bf16, None)
        truth, _ = grads(False, weights)
        bad += int(any(not float((g - t).norm() / t.norm()) < 0.5 for g, t in zip(got, truth)))
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
    for kernel in (3, 7):
        for stride in (1, 2):
            for size in ((1, 1), (2, 1), (1, 2), (2, 2), (3, 3), (4, 4)):
                print(json.dumps({
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_flags": flags,
                    "what": "one bf16 conv weight gradient", "kernel": kernel, "stride": stride, "size": size,
                    "trials": args.trials // 4, "bad_trials": count_bad_convs(kernel, stride, size, args.trials // 4),
                    "load": os.getloadavg()[0],
                }), flush=True)
    for conv in ("StrideSafeConv2d", "nn.Conv2d"):
        for channels_last in (True, False):
            for bf16 in (True, False):
                print(json.dumps({
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_flags": flags, "conv": conv,
                    "channels_last": channels_last, "precision": "bf16" if bf16 else "fp32", "trials": args.trials,
                    "bad_grad_trials": count_bad(channels_last, bf16, args.trials, plain=conv == "nn.Conv2d"),
                    "load": os.getloadavg()[0],
                }), flush=True)
    for precision in ("bf16", "fp32"):
        print(json.dumps({
            "torch": torch.__version__, "threads": torch.get_num_threads(), "what": "cpcad one-step fit",
            "precision": precision, "trials": args.trials // 2,
            "nonfinite_fits": count_bad_fits(precision, args.trials // 2), "load": os.getloadavg()[0],
        }), flush=True)


if __name__ == "__main__":
    main()
