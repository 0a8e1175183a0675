"""End to end: training steps per second and peak memory of CPCAD and AnoMem, fused ops against the
same model under ``pyanomaly.ops.reference_mode()`` (same images, batch and seed, same run).

Kept deliberately defensive: the detectors are built from whatever of ``epochs``, ``batch_size``,
``image_size``, ``device``, ``seed`` their constructor accepts, trained with ``fit(images)`` on
random uint8 images (N, C, H, W); a detector that raises ``NotImplementedError`` is reported as
skipped.

Steps per second are differential, after one warmup fit: fit(epochs=1 + E) minus fit(epochs=1), divided by E epochs'
steps (ceil(N / batch_size) each), so model setup and the training-score/threshold pass after
training cancel out. Peak memory covers all three fits (RSS or CUDA memory above the images).

Run: ``pytest bench/bench_end_to_end.py --benchmark-only [--quick|--full]`` or
``python -m bench.run --ops e2e``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time

import torch

from bench import _harness as H
from pyanomaly.demo import DEMO_CONFIG
from pyanomaly.models import _precision
from pyanomaly.nn import conv as _conv

MODELS = ("CPCAD", "AnoMem")
PROVIDERS = ("reference", "fused")

# Per model and scale: data, batch, and constructor hints (only those the constructor accepts are
# passed, so renamed or missing arguments degrade gracefully; the JSON records what was used).
CONFIGS = {
    "CPCAD": {  # gray images; the paper: 16 images of 768x768, 256/128 patches, 64/32 sub-patches
        "quick": {"n_images": 4, "channels": 1, "image_size": 64, "batch_size": 2, "extra_epochs": 1,
                  "model": {"patch_size": 32, "patch_stride": 16, "sub_size": 16, "sub_stride": 8,
                            "widths": (8, 16), "blocks": (1, 1), "prediction_steps": 2, "num_negatives": 4,
                            "bank_size": 256, "test_draws": 1, "score_batch_size": 4}},
        "default": {"n_images": 8, "channels": 1, "image_size": 128, "batch_size": 4, "extra_epochs": 1,
                    "model": {"patch_size": 64, "patch_stride": 32, "sub_size": 16, "sub_stride": 8,
                              "widths": (16, 32), "blocks": (1, 1), "test_draws": 1}},
        "full": {"n_images": 32, "channels": 1, "image_size": 768, "batch_size": 16, "extra_epochs": 1,
                 "model": {}},
    },
    "AnoMem": {  # RGB images, ResNet backbone with Hopfield memories
        "quick": {"n_images": 8, "channels": 3, "image_size": 32, "batch_size": 4, "extra_epochs": 1,
                  "model": {"backbone": "resnet18", "width": 8, "memory_sizes": (32, 16),
                            "eval_batch_size": 8}},
        "default": {"n_images": 32, "channels": 3, "image_size": 64, "batch_size": 16, "extra_epochs": 1,
                    "model": {"backbone": "resnet18", "width": 32, "memory_sizes": (256, 128),
                              "eval_batch_size": 32}},
        "full": {"n_images": 512, "channels": 3, "image_size": 256, "batch_size": 256, "extra_epochs": 1,
                 "model": {}},
    },
}


# Issue 20/21's training shapes (``python -m bench.bench_end_to_end --precision``): "nchw" is the
# earlier path (fp32, encoders in torch.contiguous_format, every conv through oneDNN), "cl" the
# session-12 default (channels_last, every conv through oneDNN), "fp32" today's CPU default
# (channels_last, CPU convs over maps no larger than their kernel as one matrix product:
# ``pyanomaly.nn.conv``), "bf16" bf16 autocast of today's encoders. AnoMem's full-width
# CIFAR ResNet-18 at 32 px, batch 256; CPC-AD's README demo (``CPCAD@demo``, 64 px), the ``cpu``
# preset geometry at 128 px, batch 16, and issue 21's 256 px config (patches 128/64, sub-patches
# 32/16), key ``CPCAD@256``. A scale is a case with the config's suffix appended ("bf16@256").
PRECISION_CONFIGS = {
    "AnoMem": {"n_images": 512, "channels": 3, "image_size": 32, "batch_size": 256, "extra_epochs": 1,
               "model": {"backbone": "resnet18", "width": 64, "small_input": True, "eval_batch_size": 256}},
    "CPCAD": {"n_images": 32, "channels": 1, "image_size": 128, "batch_size": 16, "extra_epochs": 2,
              "model": {"patch_size": 64, "patch_stride": 32, "sub_size": 16, "sub_stride": 8, "stem": "fast",
                        "widths": (32, 64, 128), "blocks": (1, 1, 1), "shared_encoder": True, "prediction_steps": 3,
                        "test_draws": 1, "bank_size": 4096}},
    "CPCAD@256": {"n_images": 16, "channels": 1, "image_size": 256, "batch_size": 16, "extra_epochs": 2,
                  "model": {"patch_size": 128, "patch_stride": 64, "sub_size": 32, "sub_stride": 16, "stem": "fast",
                            "widths": (32, 64, 128), "blocks": (1, 1, 1), "shared_encoder": True,
                            "prediction_steps": 3, "test_draws": 1, "bank_size": 4096}},
}
PRECISION_CONFIGS["CPCAD@demo"] = {  # the README's demo (pyanomaly.demo.DEMO_CONFIG): 64 px, batch 16
    "n_images": 48, "channels": 1, "image_size": 64, "batch_size": 16, "extra_epochs": 4,
    "model": {k: v for k, v in DEMO_CONFIG.items() if k not in ("image_size", "batch_size", "epochs")},
}
PRECISIONS = ("nchw", "cl", "fp32", "bf16")
DETECTOR_PRECISION = {"nchw": "fp32", "cl": "fp32", "fp32": "fp32", "bf16": "bf16"}  # `precision` argument
ONEDNN_CASES = ("nchw", "cl")  # every conv through oneDNN (no matrix-product path for small maps)
PRECISION_CASES = (("AnoMem", ""), ("CPCAD", "@demo"), ("CPCAD", ""), ("CPCAD", "@256"))  # (model, config suffix)


def precision_of(scale: str) -> str | None:
    """The case a ``--precision`` scale ("nchw", "fp32", "bf16@256", ...) asks for, else None."""
    precision = scale.split("@")[0]
    return precision if precision in PRECISIONS else None


def config(model: str, scale: str) -> dict:
    precision = precision_of(scale)
    if precision:
        return PRECISION_CONFIGS[model + scale[len(precision):]]
    return CONFIGS[model][scale]


def size_label(model: str, cfg: dict) -> str:
    s = cfg["image_size"]
    return f"{cfg['n_images']}x{cfg['channels']}x{s}^2 bs{cfg['batch_size']}"


def _images(cfg: dict) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    s = cfg["image_size"]
    return torch.randint(0, 256, (cfg["n_images"], cfg["channels"], s, s), generator=gen, dtype=torch.uint8)


def _kwargs(cfg: dict, device: str, precision: str | None = None) -> dict:
    extra = {} if precision is None else {"precision": precision}
    return {"batch_size": cfg["batch_size"], "image_size": cfg["image_size"], "device": device, "seed": 0,
            "verbose": False, **cfg["model"], **extra}


class Skip(Exception):
    """The detector is not available (not implemented yet)."""


def make_detector(model: str, **kwargs):
    """Instantiate ``pyanomaly.<model>`` with the keyword arguments its constructor accepts."""
    import pyanomaly

    cls = getattr(pyanomaly, model)
    try:
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_any = {}, True
    accepted = {k: v for k, v in kwargs.items() if takes_any or k in params}
    try:
        return cls(**accepted), sorted(accepted)
    except NotImplementedError as exc:
        raise Skip(f"pyanomaly.{model} is not implemented yet ({exc})") from exc


def _fit(detector, images: torch.Tensor) -> float:
    t0 = time.perf_counter()
    try:
        detector.fit(images)
    except NotImplementedError as exc:
        raise Skip(f"{type(detector).__name__}.fit is not implemented yet ({exc})") from exc
    if images.device.type == "cuda" or str(getattr(detector, "device", "")).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_e2e(model: str, provider: str, device: str, scale: str) -> dict:
    """After a warmup fit, train ``model`` twice (1 and 1 + E epochs) with ``provider``'s ops; steps/s and peak memory."""
    from pyanomaly.ops import reference_mode

    cfg = config(model, scale)
    dev = torch.device(device)
    images = _images(cfg)
    result: dict = {"error": None, "input_bytes": images.numel()}
    case = precision_of(scale)
    common = _kwargs(cfg, device, DETECTOR_PRECISION.get(case))
    ctx = reference_mode() if provider == "reference" else contextlib.nullcontext()
    memory_format, small_maps_as_matmul = _precision.ENCODER_MEMORY_FORMAT, _conv.SMALL_MAPS_AS_MATMUL
    if case == "nchw":
        _precision.ENCODER_MEMORY_FORMAT = torch.contiguous_format
    if case in ONEDNN_CASES:
        _conv.SMALL_MAPS_AS_MATMUL = False
    result["memory_format"] = str(_precision.ENCODER_MEMORY_FORMAT).removeprefix("torch.")
    result["small_maps_as_matmul"] = _conv.SMALL_MAPS_AS_MATMUL
    try:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            base = H._proc_status("VmRSS") or 0
            H._reset_hwm()
        with ctx:
            detector, result["kwargs_used"] = make_detector(model, epochs=1, **common)
            if scale == "quick":  # CI smoke run: one fit, setup and threshold pass included
                t1, t2 = 0.0, _fit(detector, images)
            else:
                result["warmup_fit_s"] = _fit(detector, images)  # first-call costs: lazy init, caches
                del detector
                t1 = _fit(make_detector(model, epochs=1, **common)[0], images)
                t2 = _fit(make_detector(model, epochs=1 + cfg["extra_epochs"], **common)[0], images)
        steps_per_epoch = math.ceil(cfg["n_images"] / cfg["batch_size"])
        steps = cfg["extra_epochs"] * steps_per_epoch
        if scale == "quick":
            step_s = t2 / steps_per_epoch
            result["note"] = "quick: one fit, step time includes setup"
        elif t2 > t1:
            step_s = (t2 - t1) / steps
        else:  # noise larger than the extra epochs: fall back to the whole fit (includes setup)
            step_s = t2 / ((1 + cfg["extra_epochs"]) * steps_per_epoch)
            result["note"] = "step time includes setup (differential timing was below noise)"
        result.update(median_s=step_s, steps_per_s=1.0 / step_s, fit_1_epoch_s=t1, times_s=[t1, t2])
        if dev.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        else:
            result["peak_bytes"] = H._peak_rss() - base
    except Skip as exc:
        result["skipped"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - report and keep going
        msg = str(exc).splitlines()
        result["error"] = f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"
    finally:
        _precision.ENCODER_MEMORY_FORMAT, _conv.SMALL_MAPS_AS_MATMUL = memory_format, small_maps_as_matmul
    return result


def run_e2e(model: str, provider: str, device: str, scale: str, isolate: bool = True) -> dict:
    """:func:`measure_e2e`, in a child process on CPU (so peak RSS is this model's alone)."""
    if torch.device(device).type == "cuda" or not isolate:
        return measure_e2e(model, provider, device, scale)
    return H.run_isolated(
        "bench.bench_end_to_end:measure_e2e",
        {"model": model, "provider": provider, "device": device, "scale": scale},
    )


def _measure_e2e_many(cases: list, device: str, scale: str) -> dict:
    return {"results": [measure_e2e(m, p, device, scale) for m, p in cases]}


def run_e2e_many(cases: list, device: str, scale: str) -> list:
    """All ``cases`` in one shared child process (quick mode; memory figures indicative)."""
    res = H.run_isolated("bench.bench_end_to_end:_measure_e2e_many",
                         {"cases": cases, "device": device, "scale": scale}, shared=True)
    return res["results"] if "results" in res else [dict(res) for _ in cases]


def cases(scale: str) -> list:
    return [(m, p) for m in MODELS for p in PROVIDERS]


def pytest_generate_tests(metafunc):
    if "e2e_case" in metafunc.fixturenames:
        cs = cases("quick")
        metafunc.parametrize("e2e_case", cs, ids=[f"{m}-{p}" for m, p in cs])


def test_end_to_end(benchmark, e2e_case, bench_device, bench_scale):
    import pytest

    model, provider = e2e_case
    result = run_e2e(model, provider, bench_device, bench_scale)
    if result.get("skipped"):
        pytest.skip(result["skipped"])
    if result.get("error"):
        pytest.fail(f"{model} with {provider} ops: {result['error']}")
    cfg = config(model, bench_scale)
    benchmark.group = "end_to_end"
    benchmark.extra_info.update(
        op=f"e2e-{model.lower()}", size=size_label(model, cfg), provider=provider, mode="train",
        steps_per_s=result["steps_per_s"], peak_bytes=result["peak_bytes"], step_s=result["median_s"],
    )
    # pytest-benchmark's own timing: the whole of one 1-epoch fit (setup and threshold pass included)
    from pyanomaly.ops import reference_mode

    images = _images(cfg)
    ctx = reference_mode() if provider == "reference" else contextlib.nullcontext()
    with ctx:
        benchmark.pedantic(
            lambda: _fit(make_detector(model, epochs=1, **_kwargs(cfg, bench_device))[0], images),
            rounds=1, iterations=1,
        )


def main() -> None:
    """``--precision``: nchw vs cl vs fp32 vs bf16 training steps of both detectors at issue 20/21's
    shapes, each in its own child process, interleaved by model; writes
    bench/results/e2e-precision-<device>.json."""
    import argparse
    import json
    import os
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--precision", action="store_true", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="AnoMem,CPCAD@demo,CPCAD,CPCAD@256", help="which of the cases to run")
    parser.add_argument("--out", help="the JSON file (default bench/results/e2e-precision-<device>.json)")
    args = parser.parse_args()
    wanted = args.models.split(",")
    rows = []
    load_before = os.getloadavg()[0]
    for model, suffix in PRECISION_CASES:
        if model + suffix not in wanted:
            continue
        for precision in PRECISIONS:
            res = run_e2e(model, "fused", args.device, precision + suffix)
            cfg = config(model, precision + suffix)
            rows.append({"op": f"e2e-{model.lower()}", "size": size_label(model, cfg), "case": precision,
                         "precision": DETECTOR_PRECISION[precision], "threads": torch.get_num_threads(), **res})
            keys = ("op", "size", "case", "memory_format", "small_maps_as_matmul", "steps_per_s", "peak_bytes",
                    "error")
            print(json.dumps({k: rows[-1].get(k) for k in keys}), flush=True)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"e2e-precision-{args.device}.json"
    out.write_text(json.dumps({"load_before": load_before, "load_after": os.getloadavg()[0], "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
