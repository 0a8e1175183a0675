"""Run the benchmarks and print one table; write ``<out>/<device-name>.json`` and ``.md``.

    python -m bench.run [--quick | --full] [--ops patches,infonce,hopfield,e2e] [--device cpu|cuda]
                        [--providers fused,sdpa-loop] [--sizes cpcad,anomem] [--out DIR]

Run from the repository root (or with it on ``sys.path``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from bench import _harness as H

OP_MODULES = {
    "patches": "bench.bench_patches",
    "infonce": "bench.bench_infonce",
    "hopfield": "bench.bench_hopfield",
}
ALL_OPS = (*OP_MODULES, "e2e")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    scale = ap.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_const", const="quick", dest="scale",
                       help="tiny sizes, no torch.compile: about a minute on a CPU (CI)")
    scale.add_argument("--full", action="store_const", const="full", dest="scale",
                       help="the real CPC-AD / AnoMem shapes and full sweeps (meant for a GPU)")
    ap.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma-separated subset of {','.join(ALL_OPS)}")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--providers", default=None, help="keep only these providers (the reference is always run)")
    ap.add_argument("--sizes", default=None, help="keep only sizes whose label contains one of these substrings")
    ap.add_argument("--out", default=str(RESULTS), help="folder for <device-name>.json and .md (default bench/results)")
    ap.add_argument("--no-isolate", action="store_true",
                    help="CPU: measure in this process (faster; peak memory then means little)")
    args = ap.parse_args(argv)
    args.scale = args.scale or "default"
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(args.ops) - set(ALL_OPS)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(ALL_OPS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    args.providers = args.providers.split(",") if args.providers else None
    return args


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_ops(args, roof: dict) -> tuple[list, dict]:
    import importlib

    rows, kernels, todo = [], {}, []
    isolate = torch.device(args.device).type == "cpu" and not args.no_isolate
    for op in args.ops:
        if op == "e2e":
            continue
        for spec in importlib.import_module(OP_MODULES[op]).SPECS:
            kernels[spec.name] = H.probe_fused(spec, args.device)
            todo += [(spec, case) for case in H.cases_for(spec, args.scale, args.providers, args.sizes)]
    batch = None
    if isolate and args.scale == "quick" and todo:  # one child in all: CI speed; memory indicative
        t0 = time.perf_counter()
        batch = H.measure_batch([case for _, case in todo], args.device, args.scale)
        _log(f"  {len(todo)} cases in one child process  [{time.perf_counter() - t0:.1f} s]")
    for i, (spec, case) in enumerate(todo):
        t0 = time.perf_counter()
        if batch is not None:
            res = batch[i]
        elif isolate:  # a compile that takes longer than 10 minutes counts as a failure
            res = H.measure_isolated(case, args.device, args.scale,
                                     timeout=600 if case.provider == "compiled-ref" else 3600)
        else:
            res = H.measure(case, args.device, args.scale)
        rows.append(H.op_row(spec, case, res, roof, kernels))
        status = res.get("error") or f"{H.fmt_time(res.get('median_s'))}, {H.fmt_bytes(res.get('peak_bytes'))}"
        _log(f"  {case.id}: {status}  [{time.perf_counter() - t0:.1f} s]")
    interleave(args, [case for _, case in todo], rows)
    return rows, kernels


def interleave(args, cases: list, rows: list) -> None:
    """Time the providers of each (op, size, mode) once more, round-robin in one process (a fresh
    child on CPU), and add ``interleaved_median_s`` / ``interleaved_times_s`` to their rows."""
    groups: dict = {}
    for case in cases:
        groups.setdefault((case.op, case.size, case.mode), []).append(case)
    by_id = {f"{r['op']}[{r['size']}]-{r['provider']}-{r['mode']}": r for r in rows}
    isolate = torch.device(args.device).type == "cpu" and not args.no_isolate
    for (op, size, mode), group in groups.items():
        if len(group) < 2:
            continue
        t0 = time.perf_counter()
        if isolate:
            results = H.measure_interleaved_isolated(group, args.device, args.scale)
        else:
            results = H.measure_interleaved(group, args.device, args.scale)
        for case in group:
            res, row = results.get(case.id, {}), by_id[case.id]
            if res.get("median_s"):
                row["interleaved_median_s"], row["interleaved_times_s"] = res["median_s"], res["times_s"]
            elif res.get("error"):
                row["interleaved_error"] = res["error"]
        _log(f"  interleaved {op}[{size}] {mode}: {len(group)} providers  [{time.perf_counter() - t0:.1f} s]")


def run_e2e(args) -> list:
    if "e2e" not in args.ops:
        return []
    from bench import bench_end_to_end as E

    cases = [(m, p) for m, p in E.cases(args.scale)
             if not args.providers or p in args.providers or p == "reference"]
    t0 = time.perf_counter()
    if torch.device(args.device).type == "cpu" and args.scale == "quick" and not args.no_isolate:
        results = E.run_e2e_many(cases, args.device, args.scale)
    else:
        results = [E.run_e2e(m, p, args.device, args.scale, isolate=not args.no_isolate) for m, p in cases]
    rows = []
    for (model, provider), res in zip(cases, results):
        rows.append({"op": f"e2e-{model.lower()}", "group": "end_to_end",
                     "size": E.size_label(model, E.config(model, args.scale)),
                     "provider": provider, "mode": "train", **res})
        status = res.get("skipped") or res.get("error") or f"{res.get('steps_per_s', 0):.3g} steps/s"
        _log(f"  e2e {model} {provider}: {status}")
    _log(f"  e2e: {time.perf_counter() - t0:.1f} s")
    return rows


def _note(r: dict) -> str:
    if r.get("skipped"):
        return "skipped: " + r["skipped"]
    if r.get("error"):
        return "error: " + r["error"]
    notes = []
    if r.get("fused_is") == "fallback":
        notes.append("fused = reference fallback (no kernel)")
    if "steps_per_s" in r:
        notes.append(f"{r['steps_per_s']:.3g} steps/s")
    if r.get("copy_fraction") is not None:
        warm = f" ({100 * r['warm_copy_fraction']:.0f}% of warm copy)" if r.get("warm_copy_fraction") else ""
        notes.append(f"{100 * r['copy_fraction']:.0f}% of copy bandwidth{warm}")
    if r.get("roofline_fraction") is not None:
        notes.append(f"{100 * r['roofline_fraction']:.0f}% of {r['bound']} roofline")
    if r.get("hwm_reset") is False:
        notes.append("RSS peak reset failed")
    if r.get("note"):
        notes.append(r["note"])
    return "; ".join(notes)


COLUMNS = ("op", "size", "provider", "mode", "median", "interleaved", "peak mem", "speedup", "speedup (il.)",
           "mem vs ref", "notes")


def table_rows(rows: list) -> list:
    out = []
    for r in rows:
        failed = r.get("error") or r.get("skipped")
        out.append((r["op"], r["size"], r["provider"], r["mode"],
                    "-" if failed else H.fmt_time(r.get("median_s")),
                    H.fmt_time(r["interleaved_median_s"]) if r.get("interleaved_median_s") else "-",
                    "-" if failed else H.fmt_bytes(r.get("peak_bytes")),
                    H.fmt_ratio(r.get("speedup")), H.fmt_ratio(r.get("speedup_interleaved")),
                    H.fmt_ratio(r.get("mem_ratio")), _note(r)))
    return out


def text_table(rows: list) -> str:
    body = table_rows(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *body)] if body else [len(c) for c in COLUMNS]
    widths[-1] = min(widths[-1], 70)
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def markdown(meta: dict, rows: list) -> str:
    head = (f"### {meta['device_name']} ({meta.get('gpu') or meta.get('cpu')}), {meta['date'][:10]}\n\n"
            f"`{meta['command'].strip()}`")
    kern = ", ".join(f"{k}: {v}" for k, v in meta["fused_ops"].items()) or "-"
    threads = f", {meta['torch_threads']} threads" if "torch_threads" in meta else ""
    head += (f" on torch {meta['torch']}{threads}, "
             f"kernels loaded: {meta['kernels_loaded']} ({kern}); took {meta['wall_s']:.0f} s; "
             f"load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}.\n")
    if meta.get("roofline", {}).get("matmul_flops_per_s"):
        rf = meta["roofline"]
        head += (f"Roofline: copy {rf['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
                 f"fp32 matmul {rf['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s (measured this run).\n")
    elif meta.get("roofline"):
        rf = meta["roofline"]
        head += (f"Copy bandwidth: {rf['copy_bytes_per_s'] / 1e9:.1f} GB/s read + written "
                 f"(`torch.empty_like(x).copy_(x)`, {rf['copy_bytes'] / 2**20:.0f} MiB, measured this run)")
        if rf.get("warm_copy_bytes_per_s"):
            head += f"; warm copy (into one reused destination) {rf['warm_copy_bytes_per_s'] / 1e9:.1f} GB/s"
        head += ".\n"
    head += ("median: each row in its own process (CPU); interleaved: the providers of one op, size and mode "
             "timed round-robin in one process (median of every round). speedup = reference time / this "
             "time (il.: interleaved); mem vs ref = this peak / reference peak (same op, size and mode, "
             "same run).\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in table_rows(rows)]
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    meta = H.device_info(args.device)
    meta["scale"] = args.scale
    meta["command"] = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    _log(f"bench: {meta['device_name']}, torch {meta['torch']}, kernels loaded: {meta['kernels_loaded']}, "
         f"scale {args.scale}")
    roof = H.roofline(args.device, quick=args.scale == "quick")
    meta["roofline"] = roof
    rows, kernels = run_ops(args, roof)
    rows += run_e2e(args)
    meta["fused_ops"] = kernels
    meta["memory_method"] = (
        "cuda: max_memory_allocated over the timed calls minus memory_allocated with the inputs alive"
        if args.device.startswith("cuda") else
        "cpu: one child process per row; VmHWM (reset via /proc/self/clear_refs once the inputs exist) "
        "minus VmRSS at that moment"
    )
    H.add_ratios(rows)
    meta["loadavg_end"] = H._loadavg()
    meta["wall_s"] = time.perf_counter() - start
    print(text_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9-]+", "-", meta["device_name"])
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown(meta, rows))
    errors = [r for r in rows if r.get("error")]
    _log(f"bench: {len(rows)} rows, {len(errors)} errors, {meta['wall_s']:.0f} s; wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
