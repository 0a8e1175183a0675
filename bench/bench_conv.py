"""The encoders' convs on CPU: oneDNN vs the matrix-product path of ``pyanomaly.nn.conv``.

``StrideSafeConv2d`` runs a CPU conv whose input map is no larger than its kernel as one dense
matrix product (``SMALL_MAPS_AS_MATMUL``). This times one training step of an encoder alone
(forward, then backward of a fixed random output gradient) both ways, interleaved round by round
in one process (median of ``--repeats`` rounds), at CPC-AD's sub-patch geometries and AnoMem's
ImageNet-stem ResNet-18 on small images; the load average is recorded before and after.

Run: ``python -m bench.bench_conv [--repeats 7] [--out bench/results/conv-cpu.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pyanomaly.nn import conv
from pyanomaly.nn.preact_resnet import PreActResNetEncoder
from pyanomaly.nn.resnet import resnet18


def _cpcad(widths: tuple, blocks: tuple, stem: str):
    return lambda: PreActResNetEncoder(1, widths, blocks, (1, 2, 2), stem)


# (label, builder, input shape): CPC-AD's encoders get one step's distinct sub-patches of a batch
# of 16 images (15 x 15 per image at stride sub/2): the README demo (pyanomaly.demo.DEMO_CONFIG,
# the GIM stem), the `cpu` preset, issue 21's 256 px config and the paper's geometry (fewer
# sub-patches: 64 px through the GIM stem costs about 1.7 G multiply-adds each).
CASES = (
    ("CPC-AD demo: 8 px sub-patches, GIM stem, 16/32/64",
     _cpcad((16, 32, 64), (1, 1, 1), "gim"), (3600, 1, 8, 8)),
    ("CPC-AD cpu preset: 16 px, fast stem, 32/64/128",
     _cpcad((32, 64, 128), (1, 1, 1), "fast"), (3600, 1, 16, 16)),
    ("CPC-AD 256 px config: 32 px, fast stem, 32/64/128",
     _cpcad((32, 64, 128), (1, 1, 1), "fast"), (3600, 1, 32, 32)),
    ("CPC-AD paper: 64 px, GIM stem, 64/128/256 x 2",
     _cpcad((64, 128, 256), (2, 2, 2), "gim"), (16, 1, 64, 64)),
    ("AnoMem ResNet-18 width 16, ImageNet stem, 64 px",
     lambda: resnet18(in_channels=3, width=16), (64, 3, 64, 64)),
)
PATHS = {"onednn": False, "matmul": True}


def step_fn(build, shape):
    """One fwd+bwd of the encoder on a channels_last input of ``shape``; returns the callable."""
    torch.manual_seed(0)
    encoder = build().to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)

    def output() -> torch.Tensor:
        out = encoder(x)
        return out[-1] if isinstance(out, (list, tuple)) else out

    with torch.no_grad():  # the fixed output gradient, drawn once (not inside the timed step)
        grad = torch.randn(output().shape, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        torch.autograd.backward(output(), grad)

    return step


def measure(repeats: int) -> list[dict]:
    rows = []
    for label, build, shape in CASES:
        step = step_fn(build, shape)
        times = {path: [] for path in PATHS}
        for _ in range(repeats + 1):  # round 0 is the warm-up (caches, first-call costs)
            for path, as_matmul in PATHS.items():
                conv.SMALL_MAPS_AS_MATMUL = as_matmul
                tick = time.perf_counter()
                step()
                times[path].append(time.perf_counter() - tick)
        conv.SMALL_MAPS_AS_MATMUL = True
        median = {path: statistics.median(t[1:]) for path, t in times.items()}
        rows.append({"case": label, "shape": list(shape), "median_s": median,
                     "speedup": median["onednn"] / median["matmul"], "times_s": times})
        print(f"| {label} | {tuple(shape)} | {median['onednn'] * 1e3:.1f} ms "
              f"| {median['matmul'] * 1e3:.1f} ms | {rows[-1]['speedup']:.2f}x |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "conv-cpu.json"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load before {load_before}")
    print("| encoder | input | oneDNN fwd+bwd | matmul fwd+bwd | speedup |\n|---|---|---|---|---|")
    rows = measure(args.repeats)
    load_after = os.getloadavg()
    print(f"load after {load_after}")
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                          "repeats": args.repeats, "load_before": load_before,
                                          "load_after": load_after, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
