"""Converging modern-Hopfield retrieval: AnoMem's memory layers.

AnoMem shapes: N up to 65,536 queries, M = 256..4096 stored patterns, D = 256..2048, 1..10 update
steps. ``tol = 0`` so that every provider runs all ``iters`` steps (the worst case; a kernel that
stops converged queries early can only do better on real data). Extra baseline ``sdpa-loop``:
``iters`` calls of ``scaled_dot_product_attention(state, memory, memory, scale=beta)``, without the
per-query freezing, i.e. what a user would write with stock PyTorch.

Run: ``pytest bench/bench_hopfield.py --benchmark-only [--quick|--full]`` or
``python -m bench.run --ops hopfield``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench import _harness as H
from pyanomaly.ops import hopfield_retrieve, hopfield_retrieve_ref

TOL = 0.0


def _sizes(scale: str) -> list:
    def case(n, m, d, iters):
        return f"N={n} M={m} D={d} it={iters}", {"N": n, "M": m, "D": d, "iters": iters}

    if scale == "quick":
        return [case(1024, 256, 64, 3)]
    if scale == "full":
        heads = [case(65_536, 4096, 256, 5), case(65_536, 1024, 512, 3), case(65_536, 4096, 2048, 10)]
        base = (16_384, 1024, 512, 3)
        sweeps = [case(n, *base[1:]) for n in (4_096, 65_536)]
        sweeps += [case(base[0], m, *base[2:]) for m in (256, 4_096)]
        sweeps += [case(*base[:2], d, base[3]) for d in (256, 1024, 2048)]
        sweeps += [case(*base[:3], it) for it in (1, 10)]
        sweeps.insert(0, case(*base))
    else:  # default (CPU): N, M, D scaled down ~16x in work
        heads = [case(4_096, 1024, 256, 3)]
        base = (4_096, 1024, 256, 3)
        sweeps = [case(n, *base[1:]) for n in (1_024, 16_384)]
        sweeps += [case(base[0], m, *base[2:]) for m in (256, 4_096)]
        sweeps += [case(*base[:2], d, base[3]) for d in (1024,)]
        sweeps += [case(*base[:3], it) for it in (1, 10)]
    # default (CPU): the sweeps run fwd+bwd only (training, where time and memory grow most)
    sweep_modes = ("fwd+bwd",) if scale == "default" else ("fwd", "fwd+bwd")
    return [(label + " (anomem)", p, True) for label, p in heads] + [
        (label, p, False, sweep_modes) for label, p in sweeps
    ]


def _inputs(p: dict, device, gen) -> dict:
    return {
        "queries": torch.randn(p["N"], p["D"], generator=gen).to(device),
        "memory": torch.randn(p["M"], p["D"], generator=gen).to(device),
    }


def _beta(p: dict) -> float:
    return p["D"] ** -0.5


def _sdpa_loop(x: dict, p: dict) -> torch.Tensor:
    state, memory = x["queries"][None, None], x["memory"][None, None]  # 1 1 N D, 1 1 M D
    for _ in range(p["iters"]):
        state = F.scaled_dot_product_attention(state, memory, memory, scale=_beta(p))
    return state[0, 0]


def _bytes(p: dict, mode: str) -> float:
    n, m, d = p["N"], p["M"], p["D"]
    fwd = (2 * n * d + m * d) * 4 + n * 4  # read queries and memory, write states and iteration counts
    return fwd if mode == "fwd" else fwd + (2 * n * d + m * d) * 4 + (n * d + m * d) * 4


def _flops(p: dict, mode: str) -> float:
    fwd = p["iters"] * 4 * p["N"] * p["M"] * p["D"]  # per step: scores (2NMD) and the weighted sum (2NMD)
    return fwd if mode == "fwd" else 3 * fwd


def _kwargs(p: dict) -> dict:
    return {"beta": _beta(p), "max_iter": p["iters"], "tol": TOL}


SPEC = H.OpSpec(
    name="hopfield",
    group="hopfield",
    module=__name__,
    sizes=_sizes,
    make_inputs=_inputs,
    providers={
        "reference": lambda x, p: hopfield_retrieve_ref(x["queries"], x["memory"], **_kwargs(p)),
        "fused": lambda x, p: hopfield_retrieve(x["queries"], x["memory"], **_kwargs(p)),
        "sdpa-loop": _sdpa_loop,
    },
    out_shape=lambda p: (p["N"], p["D"]),
    grad_inputs=("queries", "memory"),
    bytes_moved=_bytes,
    flops=_flops,
    fused_module="pyanomaly.ops.hopfield",
    ref_name="hopfield_retrieve_ref",
)

SPECS = [SPEC]


def test_hopfield(benchmark, bench_case, bench_device, bench_scale):
    H.pytest_benchmark(benchmark, bench_case, bench_device, bench_scale)
