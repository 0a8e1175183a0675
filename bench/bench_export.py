"""Scoring throughput and peak memory of a fitted CPCAD: ``score()`` vs onnxruntime vs torch.export.

Same run, same images: a CPCAD fitted for one epoch on random images (the weights do not change the
cost) at the demo size (64 px, 8/4 sub-patches) and at a 256 px config (32/16 sub-patches), exported
to ONNX and to ``torch.export``; each provider scores the same batch of images ``--repeats`` times
(median) in a fresh process (peak RSS above the process's start belongs to that provider alone).
Providers run interleaved, then the load average is recorded before and after.

Run: ``python -m bench.bench_export [--repeats 5] [--images 16] [--out bench/results/export-cpu.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "demo 64px": dict(image_size=64, patch_size=32, patch_stride=16, sub_size=8, sub_stride=4, widths=(16, 32, 64),
                      blocks=(1, 1, 1), shared_encoder=True, prediction_steps=2),
    "256px": dict(image_size=256, patch_size=128, patch_stride=64, sub_size=32, sub_stride=16, stem="fast",
                  widths=(32, 64, 128), blocks=(1, 1, 1), shared_encoder=True, prediction_steps=3),
}
PROVIDERS = ("score", "onnxruntime", "torch.export")


def prepare(config: str, folder: str) -> dict:
    """Fit (1 epoch) and save + export; returns the file paths."""
    import torch

    from pyanomaly import CPCAD

    args = CONFIGS[config]
    images = torch.randint(0, 256, (8, 1, args["image_size"], args["image_size"]), dtype=torch.uint8)
    detector = CPCAD(**args, epochs=1, crop_fraction=1.0, verbose=False, device="cpu", seed=0).fit(images)
    base = Path(folder) / config.replace(" ", "_")
    detector.save(f"{base}.pt")
    return {"score": f"{base}.pt", "onnxruntime": str(detector.export(f"{base}.onnx", "onnx")),
            "torch.export": str(detector.export(f"{base}.pt2", "torch"))}


def measure(path: str, size: int, images: int, repeats: int) -> dict:
    """Median seconds per ``score`` of ``images`` images and the peak RSS above the start (child process)."""
    import torch

    from bench._harness import _peak_rss, _reset_hwm
    from pyanomaly.export import Inferencer

    batch = torch.randint(0, 256, (images, 1, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inferencer = Inferencer(path, device="cpu")
    inferencer.score(batch[:1])  # warm-up (session, first-call costs)
    _reset_hwm()
    start_rss = _peak_rss()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        inferencer.score(batch)
        times.append(time.perf_counter() - tick)
    return {"seconds": statistics.median(times), "peak_mb": (_peak_rss() - start_rss) / 2**20}


def main() -> None:
    from bench._harness import run_isolated

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out", default="bench/results/export-cpu.json")
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for config in CONFIGS:
            files = prepare(config, folder)
            size = CONFIGS[config]["image_size"]
            for provider in PROVIDERS:
                result = run_isolated("bench.bench_export:measure", {"path": files[provider], "size": size,
                                                                      "images": args.images, "repeats": args.repeats})
                row = {"config": config, "provider": provider, **result}
                if "seconds" in result:
                    row["images_per_s"] = args.images / result["seconds"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    record = {"threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)), "images": args.images,
              "repeats": args.repeats, "load_before": load_before, "load_after": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=2))
    print("| config | provider | images/s | peak MB above start |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['provider']} | {r.get('images_per_s', float('nan')):.1f} | {r.get('peak_mb', float('nan')):.0f} |")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
