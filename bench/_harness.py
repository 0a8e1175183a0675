"""Shared benchmark machinery: op specs, providers, timing, peak memory, rooflines, child processes.

Every op file (``bench_patches.py``, ``bench_infonce.py``, ``bench_hopfield.py``) declares its ops as
:class:`OpSpec` objects; both ``pytest bench/ --benchmark-only`` and ``python -m bench.run`` build
their measurements from these specs, so the two entry points cannot disagree on what they time.

Providers (the baselines are imported from ``pyanomaly.ops``: the same ``*_ref`` the tests use):

* ``reference``    the pure-PyTorch ``*_ref`` function;
* ``fused``        the public op (a compiled kernel when one is loaded, else its reference fallback:
                   :func:`probe_fused` says which, and the results record it);
* ``compiled-ref`` ``torch.compile`` of the reference (failures are caught and reported);
* op-specific extras, e.g. ``sdpa-loop`` for Hopfield.

Modes: ``fwd`` (forward under ``torch.no_grad()``, i.e. inference/scoring) and ``fwd+bwd`` (forward
with autograd, then ``torch.autograd.grad`` of the output against a fixed random output gradient).

Peak memory: see :func:`measure` and ``bench/README.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Optional
from unittest import mock

import torch

__all__ = [
    "SCALES",
    "Case",
    "OpSpec",
    "cases_for",
    "device_info",
    "measure",
    "measure_isolated",
    "probe_fused",
    "roofline",
    "add_ratios",
    "op_row",
    "time_call",
]

SCALES = ("quick", "default", "full")
BASELINE = "reference"

# timing budget per measurement: (warmup calls, min repeats, max repeats, seconds of repeats)
TIMING = {
    "quick": (1, 3, 5, 0.2),
    "default": (1, 5, 10, 1.0),
    "full": (2, 5, 30, 3.0),
}


@dataclasses.dataclass
class OpSpec:
    """What one op needs to be benchmarked.

    Attributes:
        name: op name in tables and JSON (e.g. ``"infonce"``).
        group: pytest-benchmark group / op file (e.g. ``"patches"``).
        module: the importable module that defines this spec (child processes re-import it).
        sizes: ``scale -> [(label, params)]``; params are JSON-able.
        make_inputs: ``(params, device, generator) -> dict`` of tensors (and plain values).
        providers: ``name -> fn(inputs, params)``; returns a tensor or a tuple whose first element is
            the differentiated output. Must contain ``"reference"``.
        out_shape: ``params -> shape`` of the differentiated output (for the output gradient).
        grad_inputs: names in ``inputs`` that require grad in ``fwd+bwd`` mode.
        bytes_moved / flops: ``(params, mode) -> float``: the fewest bytes a fused kernel must move
            through memory, and the arithmetic it must do (for the GPU roofline).
        modes: which of ``fwd`` / ``fwd+bwd`` apply.
        fused_module / ref_name: where the public op looks up its reference, for :func:`probe_fused`.
        compile_ref: whether to add a ``compiled-ref`` provider.
        memory_bound: a data-movement op (patches): on CPU its rows get ``copy_fraction``, the
            achieved bytes/s over the measured copy bandwidth (and ``warm_copy_fraction``, over that
            of a copy into a reused destination).
    """

    name: str
    group: str
    module: str
    sizes: Callable[[str], list]
    make_inputs: Callable[[dict, torch.device, torch.Generator], dict]
    providers: dict
    out_shape: Callable[[dict], tuple]
    grad_inputs: tuple = ()
    bytes_moved: Callable[[dict, str], float] = lambda p, m: 0.0
    flops: Callable[[dict, str], float] = lambda p, m: 0.0
    modes: tuple = ("fwd", "fwd+bwd")
    fused_module: str = ""
    ref_name: str = ""
    compile_ref: bool = True
    memory_bound: bool = False  # CPU rows then report the fraction of the measured copy bandwidth

    def provider_names(self, scale: str, headline: bool = True) -> list[str]:
        names = [BASELINE, "fused"] + [p for p in self.providers if p not in (BASELINE, "fused")]
        # torch.compile takes ~10-60 s per shape and mode on CPU: only on the headline sizes, never in quick
        if self.compile_ref and scale != "quick" and headline:
            names.append("compiled-ref")
        return names


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    module: str
    size: str
    params_json: str
    provider: str
    mode: str

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)

    @property
    def id(self) -> str:
        return f"{self.op}[{self.size}]-{self.provider}-{self.mode}"


def iter_sizes(spec: OpSpec, scale: str, with_modes: bool = False):
    """(label, params, headline[, modes]) per size. ``sizes`` entries are (label, params), optionally
    followed by ``headline`` (default True: gets the compiled-ref provider) and a tuple of modes
    (default ``spec.modes``)."""
    for entry in spec.sizes(scale):
        label, params = entry[0], entry[1]
        headline = entry[2] if len(entry) > 2 else True
        modes = tuple(m for m in (entry[3] if len(entry) > 3 else spec.modes) if m in spec.modes)
        yield (label, params, headline, modes) if with_modes else (label, params, headline)


def cases_for(spec: OpSpec, scale: str, providers: Optional[list] = None, sizes: Optional[str] = None) -> list[Case]:
    """All (size, provider, mode) cases of ``spec`` at ``scale``, reference first in each group.

    ``providers``: keep only these (the reference is always kept); ``sizes``: keep only the sizes
    whose label contains one of these comma-separated substrings.
    """
    out = []
    for label, params, headline, modes in iter_sizes(spec, scale, with_modes=True):
        if sizes and not any(s and s in label for s in sizes.split(",")):
            continue
        names = spec.provider_names(scale, headline)
        if providers:
            names = [n for n in names if n in providers or n == BASELINE]
        for mode in modes:
            for provider in names:
                out.append(Case(spec.name, spec.module, label, json.dumps(params, sort_keys=True), provider, mode))
    return out


def load_spec(module: str, name: str) -> OpSpec:
    mod = importlib.import_module(module)
    for spec in mod.SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"{module} defines no op {name!r}")


# --------------------------------------------------------------------------------------------
# building one callable


def _first(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def build(spec: OpSpec, case: Case, device: torch.device, seed: int = 0):
    """Inputs and a zero-argument callable running one iteration of ``case``.

    Returns (fn, inputs, input_bytes).
    """
    params = case.params
    gen = torch.Generator(device="cpu").manual_seed(seed)
    inputs = spec.make_inputs(params, device, gen)
    training = case.mode == "fwd+bwd"
    grad_tensors = []
    if training:
        for name in spec.grad_inputs:
            inputs[name].requires_grad_(True)
            grad_tensors.append(inputs[name])
        grad_out = torch.randn(spec.out_shape(params), generator=gen).to(device)
    if case.provider == "compiled-ref":
        impl = torch.compile(spec.providers[BASELINE], dynamic=False)
    else:
        impl = spec.providers[case.provider]

    if training:
        def fn():
            out = _first(impl(inputs, params))
            return torch.autograd.grad(out, grad_tensors, grad_outputs=grad_out.to(out.dtype))
    else:
        def fn():
            with torch.no_grad():
                return impl(inputs, params)

    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if training:
        tensors.append(grad_out)
    input_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return fn, inputs, input_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Seconds one ``fn()`` takes: CUDA events around it on a GPU (device time, no host-side
    jitter; earlier queued work is waited for first), the host clock on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def op_row(spec: OpSpec, case: Case, res: dict, roof: dict, kernels: dict) -> dict:
    """One result row of an op measurement (bench.run and bench.device_check write the same rows)."""
    res.pop("traceback", None)
    row = {"op": case.op, "group": spec.group, "size": case.size, "provider": case.provider,
           "mode": case.mode, "params": case.params, **res, **derived(spec, case, res, roof)}
    if case.provider == "fused":
        row["fused_is"] = res.get("fused_is", kernels[spec.name])
    return row


# --------------------------------------------------------------------------------------------
# resident memory (Linux): VmRSS / VmHWM of this process, and a reset of the high-water mark


def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # non-Linux fallback: ru_maxrss (kB on Linux, bytes on macOS)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# --------------------------------------------------------------------------------------------
# one measurement


def measure(case: Case, device: str, scale: str, seed: int = 0) -> dict:
    """Time ``case`` and measure its peak memory above its inputs, in this process.

    On CUDA: ``max_memory_allocated`` over the timed calls minus ``memory_allocated`` after the
    inputs exist. On CPU (meant to run in a fresh child process, see :func:`measure_isolated`): the
    resident-set high-water mark (VmHWM, reset through ``/proc/self/clear_refs`` once the inputs
    exist) minus the RSS at that moment.
    """
    dev = torch.device(device)
    spec = load_spec(case.module, case.op)
    warmup, min_rep, max_rep, budget = TIMING[scale]
    result: dict[str, Any] = {"error": None}
    try:
        fn, inputs, input_bytes = build(spec, case, dev, seed)
        result["input_bytes"] = input_bytes
        compiled = case.provider == "compiled-ref"
        if dev.type == "cuda":
            _sync(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            if compiled:  # keep the compiler's own memory out of the figure: compile first
                t0 = time.perf_counter()
                fn()
                result["first_call_s"] = time.perf_counter() - t0
                warmup = max(0, warmup - 1)
            base = _proc_status("VmRSS") or 0
            result["hwm_reset"] = _reset_hwm()
            floor = _peak_rss()
        for i in range(warmup):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            if i == 0 and "first_call_s" not in result:
                result["first_call_s"] = time.perf_counter() - t0
        if dev.type == "cuda":  # the caching allocator frees warmup memory: the peak of one call is kept
            torch.cuda.reset_peak_memory_stats(dev)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_rep and (len(times) < min_rep or time.perf_counter() - start < budget):
            times.append(time_call(fn, dev))
        result["times_s"] = times
        result["median_s"] = statistics.median(times)
        if dev.type == "cuda":
            result["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
        else:
            result["peak_bytes"] = _peak_rss() - base
            result["rss_floor_bytes"] = floor - base  # > 0 when the reset failed: peaks below are hidden
        del fn, inputs
        if case.provider == "fused":  # what this process really ran (kernels can appear mid-run)
            result["fused_is"] = probe_fused(spec, device)
    except Exception as exc:  # noqa: BLE001 - report every provider failure, keep going
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        result["error"] = msg[0][:300] if msg else type(exc).__name__
        result["traceback"] = traceback.format_exc(limit=6)[-2000:]
    return result


_CHILD_CODE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from bench._harness import _child_main; _child_main(sys.argv[2])"
)


# glibc: serve every allocation of 64 KiB or more with mmap and give freed memory back at once, so
# that a process running several cases in turn sees each case's allocations in its RSS again
_RELEASE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_isolated(target: str, kwargs: dict, timeout: float = 1800.0, shared: bool = False) -> dict:
    """Call ``target`` (``"module:function"``, returning a JSON-able dict) in a fresh Python process
    with this process's ``sys.path``, so that its peak resident memory belongs to that call alone.
    ``shared``: the call runs several cases in turn (glibc is told to return freed memory)."""
    payload = json.dumps({"target": target, "kwargs": kwargs})
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(_RELEASE_MEMORY_ENV if shared else {}))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CODE, json.dumps(sys.path), payload],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"child exited with {proc.returncode}: {tail[0][:300]}"}


def _child_main(payload: str) -> None:
    args = json.loads(payload)
    module, func = args["target"].split(":")
    result = getattr(importlib.import_module(module), func)(**args["kwargs"])
    print("BENCH_RESULT " + json.dumps(result), flush=True)


INTERLEAVED_REPEATS = {"quick": 3, "default": 7, "full": 9}


def measure_interleaved(cases: list[Case], device: str, scale: str, seed: int = 0) -> dict:
    """Time ``cases`` (the providers of one op, size and mode) round-robin in this process.

    Every case is built and warmed up first (compiles included), then each round times one call of
    every case, starting at a different case each round, so that a slow spell of a shared machine
    hits all providers alike. Returns ``{case.id: {"times_s", "median_s"} or {"error"}}``."""
    dev = torch.device(device)
    repeats = INTERLEAVED_REPEATS[scale]
    fns, out = {}, {}
    for case in cases:
        try:
            fn, _inputs, _ = build(load_spec(case.module, case.op), case, dev, seed)
            fn()
            _sync(dev)
            fns[case.id] = fn
        except Exception as exc:  # noqa: BLE001 - report every provider failure, keep going
            out[case.id] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    ids = list(fns)
    times: dict[str, list] = {i: [] for i in ids}
    for rep in range(repeats):
        for j in range(len(ids)):
            case_id = ids[(rep + j) % len(ids)]
            times[case_id].append(time_call(fns[case_id], dev))
    for case_id in ids:
        out[case_id] = {"times_s": times[case_id], "median_s": statistics.median(times[case_id])}
    return out


def _measure_interleaved_kw(cases: list, device: str, scale: str) -> dict:
    return {"results": measure_interleaved([Case(**c) for c in cases], device, scale)}


def measure_interleaved_isolated(cases: list[Case], device: str, scale: str, timeout: float = 3600.0) -> dict:
    """:func:`measure_interleaved` in one fresh child process (its own interpreter, like every CPU row)."""
    res = run_isolated(
        "bench._harness:_measure_interleaved_kw",
        {"cases": [dataclasses.asdict(c) for c in cases], "device": device, "scale": scale}, timeout,
    )
    return res["results"] if "results" in res else {c.id: dict(res) for c in cases}


def _measure_kw(case: dict, device: str, scale: str) -> dict:
    return measure(Case(**case), device, scale)


def _measure_many_kw(cases: list, device: str, scale: str) -> dict:
    return {"results": [measure(Case(**c), device, scale) for c in cases]}


def measure_batch(cases: list, device: str, scale: str, timeout: float = 1800.0) -> list:
    """All ``cases`` in one shared child process (quick mode: one interpreter start in all instead of
    one per case). Each case gets its own RSS baseline and high-water reset, and glibc is told to
    return freed memory at once; what the allocator still keeps can hide part of a later case's peak,
    and the extra mmap calls slow small ops: quick-mode figures are indicative."""
    res = run_isolated(
        "bench._harness:_measure_many_kw",
        {"cases": [dataclasses.asdict(c) for c in cases], "device": device, "scale": scale}, timeout, shared=True,
    )
    return res["results"] if "results" in res else [dict(res) for _ in cases]


def measure_isolated(case: Case, device: str, scale: str, timeout: float = 1800.0) -> dict:
    """:func:`measure` in a fresh child process (see :func:`run_isolated`). Used on CPU."""
    return run_isolated(
        "bench._harness:_measure_kw", {"case": dataclasses.asdict(case), "device": device, "scale": scale}, timeout
    )


# --------------------------------------------------------------------------------------------
# is the fused op a kernel or its reference fallback?


def probe_fused(spec: OpSpec, device: str) -> str:
    """``"kernel"`` if the public op ran without calling its ``*_ref``, ``"fallback"`` if it did,
    or ``"error: ..."`` if it raised (on the smallest quick size)."""
    _, params, _ = next(iter_sizes(spec, "quick"))
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    if not spec.fused_module:
        return "unknown"
    module = importlib.import_module(spec.fused_module)
    ref = getattr(module, spec.ref_name)
    called = []

    def spy(*a, **k):
        called.append(True)
        return ref(*a, **k)

    try:
        inputs = spec.make_inputs(params, dev, gen)
        with mock.patch.object(module, spec.ref_name, spy), torch.no_grad():
            spec.providers["fused"](inputs, params)
        _sync(dev)
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return "fallback" if called else "kernel"


# --------------------------------------------------------------------------------------------
# device description and GPU roofline


def _slug(text: str) -> str:
    text = re.sub(r"\((R|TM)\)|CPU @.*$|\d+-Core Processor", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_info(device: str) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        slug = _slug(name)
        extra = {"cuda": torch.version.cuda, "gpu": name}
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            if match:
                name = match.group(1).strip()
        except OSError:
            pass
        slug = "cpu-" + _slug(name)
        extra = {"cpu": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    from pyanomaly import _ext

    return {
        "device": device,
        "device_name": slug,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernels_loaded": _ext.has_kernels(dev),
        "kernel_load_error": _ext.load_error(),
        "build_info": _ext.build_info(),
        "loadavg_start": _loadavg(),
        **extra,
    }


def roofline(device: str, quick: bool = False) -> dict:
    """Measured device copy bandwidth (bytes read + written per second) and fp32 matmul rate.

    On CPU the copy is ``torch.empty_like(x).copy_(x)`` of a 256 MiB tensor (a fresh destination
    each time, as a kernel writing a new output gets; page faults included), median of 7, and the
    same copy into one reused destination (``warm_copy_bytes_per_s``: no page faults, the memory's
    own bandwidth); the matmul is left out (the CPU rows report fractions of the copies only)."""
    dev = torch.device(device)

    def best(fn, reps=10):
        fn()
        return statistics.median(time_call(fn, dev) for _ in range(reps))

    if dev.type != "cuda":
        src = torch.randn((16 if quick else 64) * 2**20)
        t_copy = best(lambda: torch.empty_like(src).copy_(src), reps=7)
        dst = torch.empty_like(src)
        t_warm = best(lambda: dst.copy_(src), reps=7)
        return {"copy_bytes_per_s": 2 * src.numel() * 4 / t_copy, "copy_bytes": src.numel() * 4,
                "warm_copy_bytes_per_s": 2 * src.numel() * 4 / t_warm}
    n = (64 if quick else 512) * 2**20  # floats
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    t_copy = best(lambda: dst.copy_(src))
    size = 4096 if quick else 8192
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    t_mm = best(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": 2 * n * 4 / t_copy,
        "matmul_flops_per_s": 2 * size**3 / t_mm,
        "matmul_dtype": "float32",
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def derived(spec: OpSpec, case: Case, result: dict, roof: dict) -> dict:
    """Achieved bytes/s and FLOP/s from the op's formulas, and the fraction of the roofline."""
    if result.get("error") or not result.get("median_s"):
        return {}
    t = result["median_s"]
    nbytes, nflops = spec.bytes_moved(case.params, case.mode), spec.flops(case.params, case.mode)
    out = {"model_bytes": nbytes, "model_flops": nflops, "gbytes_per_s": nbytes / t / 1e9,
           "gflops_per_s": nflops / t / 1e9}
    if roof and "matmul_flops_per_s" in roof:
        floor = max(nbytes / roof["copy_bytes_per_s"], nflops / roof["matmul_flops_per_s"])
        out["roofline_floor_s"] = floor
        out["roofline_fraction"] = floor / t
        out["bound"] = "memory" if nbytes / roof["copy_bytes_per_s"] >= nflops / roof["matmul_flops_per_s"] else "compute"
    elif roof and spec.memory_bound:  # CPU: the fraction of the measured copy bandwidth (read + written)
        out["copy_fraction"] = nbytes / t / roof["copy_bytes_per_s"]
        if roof.get("warm_copy_bytes_per_s"):
            out["warm_copy_fraction"] = nbytes / t / roof["warm_copy_bytes_per_s"]
    return out


def add_ratios(rows: list[dict]) -> None:
    """Per row: time and memory relative to the reference of the same (op, size, mode) in ``rows``.

    ``speedup`` = reference time / this time (> 1: faster than the reference), from the rows' own
    processes; ``speedup_interleaved`` the same from the round-robin timings in one process;
    ``mem_ratio`` = this peak / reference peak (< 1: less memory).
    """
    refs = {(r["op"], r["size"], r["mode"]): r for r in rows if r["provider"] == BASELINE and not r.get("error")}
    for r in rows:
        ref = refs.get((r["op"], r["size"], r["mode"]))
        if ref is None or r.get("error"):
            continue
        if r.get("median_s"):
            r["speedup"] = ref["median_s"] / r["median_s"]
        if r.get("interleaved_median_s") and ref.get("interleaved_median_s"):
            r["speedup_interleaved"] = ref["interleaved_median_s"] / r["interleaved_median_s"]
        if ref.get("peak_bytes", 0) > 0 and r.get("peak_bytes") is not None:
            r["mem_ratio"] = r["peak_bytes"] / ref["peak_bytes"]


# --------------------------------------------------------------------------------------------
# formatting


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-6:.3g} us"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    sign = "-" if b < 0 else ""
    b = abs(b)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{sign}{b:.3g} {unit}" if unit != "B" else f"{sign}{int(b)} B"
        b /= 1024
    return f"{sign}{b:.3g} GiB"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


# --------------------------------------------------------------------------------------------
# pytest-benchmark glue (used by the test_* function of each op file)

_ROOFLINE_CACHE: dict = {}


def cached_roofline(device: str) -> dict:
    if device not in _ROOFLINE_CACHE:
        _ROOFLINE_CACHE[device] = roofline(device)
    return _ROOFLINE_CACHE[device]


def peak_memory(case: Case, device: str, fn=None) -> dict:
    """Peak memory above inputs: one extra call in-process on CUDA, a child process on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and fn is not None:
        _sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        _sync(dev)
        return {"peak_bytes": torch.cuda.max_memory_allocated(dev) - base}
    res = measure_isolated(case, device, "quick")
    return {k: res[k] for k in ("peak_bytes", "error", "fused_is") if res.get(k) is not None}


def pytest_benchmark(benchmark, case: Case, device: str, scale: str) -> None:
    """Time ``case`` with pytest-benchmark; memory, rates and roofline go to ``extra_info``.

    A ``compiled-ref`` that fails to compile is skipped (with the error); any other failure fails.
    """
    import pytest

    spec = load_spec(case.module, case.op)
    dev = torch.device(device)
    try:
        fn, _, input_bytes = build(spec, case, dev)
        t0 = time.perf_counter()
        fn()  # warmup (and compilation)
        _sync(dev)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        second = time.perf_counter() - t0
    except Exception as exc:
        if case.provider == "compiled-ref":
            pytest.skip(f"torch.compile of the reference failed: {type(exc).__name__}: {exc}"[:300])
        raise
    warmup, min_rep, max_rep, budget = TIMING[scale]

    def run():
        fn()
        _sync(dev)

    rounds = int(min(max_rep, max(min_rep, budget / max(second, 1e-6))))
    benchmark.group = spec.group
    benchmark.extra_info.update(
        op=case.op, size=case.size, provider=case.provider, mode=case.mode, params=case.params,
        input_bytes=input_bytes, first_call_s=first,
    )
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=max(0, warmup - 1), iterations=1)
    benchmark.extra_info.update(peak_memory(case, device, fn))
    if case.provider == "fused" and "fused_is" not in benchmark.extra_info:
        benchmark.extra_info["fused_is"] = probe_fused(spec, device)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(derived(spec, case, {"median_s": median}, cached_roofline(device)))
