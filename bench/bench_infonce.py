"""InfoNCE with sampled negatives: CPC-AD's loss (fwd+bwd, training) and anomaly score (fwd).

CPC-AD shape: N = 78,400 queries (16 images x 25 patches x 196 predictions), D = 256, K = 16
negatives per query drawn from a bank of M = N encodings. The reference gathers an (N, K, D) tensor
(1.3 GB at that shape); a fused kernel need not.

Run: ``pytest bench/bench_infonce.py --benchmark-only [--quick|--full]`` or
``python -m bench.run --ops infonce``.
"""

from __future__ import annotations

import torch

from bench import _harness as H
from pyanomaly.ops import infonce, infonce_ref, sample_negatives

TEMPERATURE = 0.1
CPCAD = {"N": 78_400, "D": 256, "K": 16, "M": 78_400}


def _sizes(scale: str) -> list:
    def case(**kw):
        p = dict(CPCAD, **kw)
        return f"N={p['N']} D={p['D']} K={p['K']} M={p['M']}", p

    if scale == "quick":
        return [case(N=2048, D=64, K=8, M=2048)]
    if scale == "full":
        head = case()
        sweeps = [case(N=n, M=n) for n in (4_900, 19_600, 313_600)]
        sweeps += [case(K=k) for k in (4, 64)]
        sweeps += [case(D=d) for d in (64, 1024)]
        sweeps += [case(M=m) for m in (4_096, 627_200)]
    else:  # default (CPU): the CPC-AD shape, then sweeps around N = M = 4,900 (1/16 of it)
        head = case()
        base = {"N": 4_900, "M": 4_900}
        sweeps = [case(**base), case(N=19_600, M=19_600)]
        sweeps += [case(**base, K=k) for k in (4, 64)]
        sweeps += [case(**base, D=d) for d in (64, 1024)]
        sweeps += [case(N=4_900, M=m) for m in (1_024, 78_400)]
    # default (CPU): the sweeps run fwd+bwd only (training, where time and memory grow most)
    sweep_modes = ("fwd+bwd",) if scale == "default" else ("fwd", "fwd+bwd")
    return [(head[0] + " (cpcad)", head[1], True)] + [(label, p, False, sweep_modes) for label, p in sweeps]


def _inputs(p: dict, device, gen) -> dict:
    n, d, m, k = p["N"], p["D"], p["M"], p["K"]
    scale = d**-0.5
    return {
        "queries": (torch.randn(n, d, generator=gen) * scale).to(device),
        "positives": (torch.randn(n, d, generator=gen) * scale).to(device),
        "bank": (torch.randn(m, d, generator=gen) * scale).to(device),
        "neg_idx": sample_negatives(n, k, m, generator=gen).to(device),
    }


def _args(x: dict) -> tuple:
    return x["queries"], x["positives"], x["bank"], x["neg_idx"]


def _bytes(p: dict, mode: str) -> float:
    n, d, m, k = p["N"], p["D"], p["M"], p["K"]
    floats = (2 * n * d + m * d) * 4  # queries, positives, bank
    fwd = floats + n * k * 8 + n * 4  # + indices read, losses written
    # backward: read the inputs, indices and output gradient again, write the three input gradients
    return fwd if mode == "fwd" else fwd + floats + n * k * 8 + n * 4 + floats


def _flops(p: dict, mode: str) -> float:
    fwd = 2 * p["N"] * (p["K"] + 1) * p["D"]  # one dot product per logit
    return fwd if mode == "fwd" else 3 * fwd  # backward: d/dq and d/d(bank, positives)


SPEC = H.OpSpec(
    name="infonce",
    group="infonce",
    module=__name__,
    sizes=_sizes,
    make_inputs=_inputs,
    providers={
        "reference": lambda x, p: infonce_ref(*_args(x), temperature=TEMPERATURE),
        "fused": lambda x, p: infonce(*_args(x), temperature=TEMPERATURE),
    },
    out_shape=lambda p: (p["N"],),
    grad_inputs=("queries", "positives", "bank"),
    bytes_moved=_bytes,
    flops=_flops,
    fused_module="pyanomaly.ops.infonce",
    ref_name="infonce_ref",
)

SPECS = [SPEC]


def test_infonce(benchmark, bench_case, bench_device, bench_scale):
    H.pytest_benchmark(benchmark, bench_case, bench_device, bench_scale)
