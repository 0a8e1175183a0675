"""extract_patches and fold_patches: CPC-AD's input pipeline and its score map.

CPC-AD cuts 16 gray 768x768 uint8 images into 256/128 patches and each patch into 64/32 sub-patches
(5x5 patches of 7x7 sub-patches), normalised and randomly flipped; scores per sub-patch are folded
back onto a 768x768 map (a 23x23 grid of 64/32 windows).

Run: ``pytest bench/bench_patches.py --benchmark-only [--quick|--full]`` or
``python -m bench.run --ops patches``.
"""

from __future__ import annotations

import torch

from bench import _harness as H
from pyanomaly.ops import extract_patches, extract_patches_ref, fold_patches, fold_patches_ref, huge_pages


def _with_huge_pages(enabled: bool, op, *args, **kwargs):
    """The fused op with its huge-page advice (`pyanomaly.ops.huge_pages`) forced on or off, whatever
    this machine's default (off: the earlier path)."""
    with huge_pages(enabled):
        return op(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# extract_patches


def _extract_sizes(scale: str) -> list:
    def case(b, c=1, hw=768, size=256, stride=128, sub=(64, 32)):
        p = {"B": b, "C": c, "H": hw, "W": hw, "size": size, "stride": stride,
             "sub_size": sub[0] if sub else None, "sub_stride": sub[1] if sub else None,
             "grayscale": c == 3, "mean": 0.5, "std": 0.25, "hflip": True}
        return p

    if scale == "quick":
        return [("B2 128^2 64/32+16/8", case(2, hw=128, size=64, stride=32, sub=(16, 8)))]
    sizes = [
        ("cpcad B16 768^2 256/128+64/32", case(16)),
        ("B16 768^2 256/128 (one level)", case(16, sub=None), False),
        ("B4 RGB->gray 768^2 256/128+64/32", case(4, c=3), False),
    ]
    if scale == "full":
        sizes += [
            ("sweep B=4", case(4), False),
            ("sweep B=64", case(64), False),
            ("B16 RGB->gray 768^2 256/128+64/32", case(16, c=3), False),
        ]
    else:
        sizes += [("sweep B=4", case(4), False)]
    return sizes


def _extract_inputs(p: dict, device, gen) -> dict:
    images = torch.randint(0, 256, (p["B"], p["C"], p["H"], p["W"]), generator=gen, dtype=torch.uint8)
    flips = torch.rand(p["B"], generator=gen) < 0.5
    return {"images": images.to(device), "hflip": flips.to(device) if p["hflip"] else None}


def _extract_kwargs(inputs: dict, p: dict) -> dict:
    return {"sub_size": p["sub_size"], "sub_stride": p["sub_stride"], "grayscale": p["grayscale"],
            "mean": [p["mean"]], "std": [p["std"]], "hflip": inputs["hflip"]}


def _extract_out_numel(p: dict) -> int:
    nh = (p["H"] - p["size"]) // p["stride"] + 1
    nw = (p["W"] - p["size"]) // p["stride"] + 1
    if p["sub_size"] is None:
        return p["B"] * nh * nw * p["size"] ** 2
    m = (p["size"] - p["sub_size"]) // p["sub_stride"] + 1
    return p["B"] * nh * nw * m * m * p["sub_size"] ** 2


EXTRACT = H.OpSpec(
    name="extract_patches",
    group="patches",
    module=__name__,
    sizes=_extract_sizes,
    make_inputs=_extract_inputs,
    providers={
        "reference": lambda x, p: extract_patches_ref(x["images"], p["size"], p["stride"], **_extract_kwargs(x, p)),
        "fused": lambda x, p: extract_patches(x["images"], p["size"], p["stride"], **_extract_kwargs(x, p)),
        "fused-4k-pages": lambda x, p: _with_huge_pages(False, extract_patches, x["images"], p["size"],
                                                        p["stride"], **_extract_kwargs(x, p)),
        "fused-huge-pages": lambda x, p: _with_huge_pages(True, extract_patches, x["images"], p["size"],
                                                          p["stride"], **_extract_kwargs(x, p)),
    },
    out_shape=lambda p: (_extract_out_numel(p),),
    modes=("fwd",),  # uint8 images: nothing to differentiate
    # read the uint8 images once, write the float32 patches once
    bytes_moved=lambda p, m: p["B"] * p["C"] * p["H"] * p["W"] + 4 * _extract_out_numel(p),
    flops=lambda p, m: 3 * _extract_out_numel(p) + (5 * p["B"] * p["H"] * p["W"] if p["C"] == 3 else 0),
    fused_module="pyanomaly.ops.patches",
    ref_name="extract_patches_ref",
    memory_bound=True,
)

# --------------------------------------------------------------------------------------------
# fold_patches


def _fold_sizes(scale: str) -> list:
    def case(b, hw=768, size=64, stride=32, c=None):
        n = (hw - size) // stride + 1
        return {"B": b, "nh": n, "nw": n, "C": c, "size": size, "stride": stride, "H": hw, "W": hw}

    if scale == "quick":
        return [("B2 15x15 16/8 -> 128^2", case(2, hw=128, size=16, stride=8))]
    # the reference's backward costs one full-image copy per window (minutes for the CPC-AD grid on a
    # CPU): on the default (CPU) scale fwd+bwd runs on the 5x5 grid of 4 images only
    fwd = ("fwd",)
    sizes = [
        ("cpcad B16 23x23 64/32 -> 768^2", case(16), True, fwd if scale == "default" else ("fwd", "fwd+bwd")),
        ("B16 5x5 256/128 -> 768^2", case(16, size=256, stride=128), False, fwd if scale == "default" else None),
    ]
    if scale == "full":
        sizes += [("sweep B=64", case(64), False), ("B16 C=8 23x23 64/32", case(16, c=8), False)]
    else:
        sizes += [("sweep B=4", case(4), False, fwd), ("B4 5x5 256/128 -> 768^2", case(4, size=256, stride=128), False)]
    return [s if len(s) < 4 or s[3] is not None else s[:3] for s in sizes]


def _fold_shape(p: dict) -> tuple:
    return (p["B"], p["nh"], p["nw"]) + ((p["C"],) if p["C"] else ())


def _fold_inputs(p: dict, device, gen) -> dict:
    return {"scores": torch.randn(_fold_shape(p), generator=gen).to(device)}


def _fold_bytes(p: dict, mode: str) -> float:
    c = p["C"] or 1
    scores, image = p["B"] * p["nh"] * p["nw"] * c * 4, p["B"] * c * p["H"] * p["W"] * 4
    return scores + image if mode == "fwd" else 2 * (scores + image)


FOLD = H.OpSpec(
    name="fold_patches",
    group="patches",
    module=__name__,
    sizes=_fold_sizes,
    make_inputs=_fold_inputs,
    providers={
        "reference": lambda x, p: fold_patches_ref(x["scores"], p["size"], p["stride"], (p["H"], p["W"])),
        "fused": lambda x, p: fold_patches(x["scores"], p["size"], p["stride"], (p["H"], p["W"])),
        "fused-4k-pages": lambda x, p: _with_huge_pages(False, fold_patches, x["scores"], p["size"],
                                                        p["stride"], (p["H"], p["W"])),
        "fused-huge-pages": lambda x, p: _with_huge_pages(True, fold_patches, x["scores"], p["size"],
                                                          p["stride"], (p["H"], p["W"])),
    },
    out_shape=lambda p: (p["B"],) + ((p["C"],) if p["C"] else ()) + (p["H"], p["W"]),
    grad_inputs=("scores",),
    bytes_moved=_fold_bytes,
    flops=lambda p, m: (1 if m == "fwd" else 2) * p["B"] * (p["C"] or 1) * p["nh"] * p["nw"] * p["size"] ** 2,
    fused_module="pyanomaly.ops.patches",
    ref_name="fold_patches_ref",
    # the reference is a Python loop over the nh*nw windows: dynamo unrolls it into that many in-place
    # slice updates and compiling did not finish in 4 minutes even for a 15x15 grid (CPU, 2026-11-23)
    compile_ref=False,
    memory_bound=True,
)

SPECS = [EXTRACT, FOLD]


def test_patches(benchmark, bench_case, bench_device, bench_scale):
    H.pytest_benchmark(benchmark, bench_case, bench_device, bench_scale)
