"""The whole CUDA side, validated and measured in one short call on a GPU machine.

    python -m bench.device_check --out DIR            # on a machine with one NVIDIA GPU, < 8 minutes
    python -m bench.device_check --dry-run --out DIR  # every stage on the CPU at tiny sizes (CI)

Stages, each in its own child process with a hard time limit (a hang costs that stage, not the run),
each writing its result as soon as it ends. After every stage ``DIR`` gets the report
(``<gpu>-device-check.json`` / ``.md``), the op tables (``<gpu>.json`` / ``.md``, once the ops stage
ran) and ``logs.tar.gz`` (every stage's JSON and log): five files at most.

1. ``environment``: GPU, capability, driver, torch, CUDA, nvcc and compute-sanitizer versions.
2. ``build``: ``pip install --no-build-isolation .`` for this GPU's architecture only, ninja with as
   many jobs as cores; then a fresh process must load the CUDA kernels.
3. ``tests``: the CUDA-marked tests, ``-x``, with a per-test timeout (pytest-timeout when present).
4. ``sanitizer``: ``compute-sanitizer --tool memcheck`` over one small forward + backward of every
   kernel, and ``--tool racecheck`` over the one that uses shared memory (Hopfield).
5. ``ops``: the op benchmarks at the headline shapes only (CPC-AD and AnoMem; fwd and fwd+bwd; fused
   vs reference vs ``torch.compile(reference)`` vs the SDPA loop), CUDA-event timing, peak memory
   from ``torch.cuda.max_memory_allocated``, roofline fractions; written in ``bench/results/``'s
   format as ``DIR/<gpu>.json`` / ``.md``.
6. ``training``: a few optimiser steps at the papers' sizes: CPCAD at 768 px (fast and GIM stems,
   grid layout, bf16 autocast, fused vs reference ops) and AnoMem with ResNet-50 at 32 px, batch
   256; step time, images/s, peak memory (an out-of-memory is a result, not a crash).

Every stage after ``build`` runs from a scratch folder with the repository appended to the *end* of
``sys.path``, so ``import pyanomaly`` finds the installed package (with its kernels), never the
source folder; each records which ``pyanomaly`` it imported and whether the CUDA kernels were loaded.
A stage that measured a reference fallback on a GPU has failed and says so. When the overall budget
runs out the remaining stages are skipped, and the report says so.

``--dry-run`` runs every stage on the CPU at tiny sizes, skipping the CUDA build and the sanitizer
(and saying so), so that CI proves the script end to end. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: (stage, seconds) on a GPU; the sum stays under the 8-minute target with room for the overhead.
STAGES = (
    ("environment", 20),
    ("build", 180),
    ("tests", 100),
    ("sanitizer", 60),
    ("ops", 60),
    ("training", 45),
)
DRY_RUN_LIMITS = {"tests": 240, "ops": 180, "training": 120}  # CPU stages are slower, sizes tiny
TOTAL_BUDGET_S = 480
_LAUNCH = (
    "import runpy, sys; sys.path.append(sys.argv.pop(1)); "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


# -- stage helpers (run inside the stage's child process) -------------------------------------------
def _device(dry_run: bool) -> str:
    return "cpu" if dry_run else "cuda"


def _kernels(device: str) -> dict:
    """Which pyanomaly this process imported and whether its kernels for ``device`` are loaded."""
    import pyanomaly
    from pyanomaly import _ext

    return {"pyanomaly": str(Path(pyanomaly.__file__).parent), "kernels": _ext.has_kernels(device),
            "kernel_load_error": _ext.load_error()}


def _require_kernels(result: dict, device: str) -> None:
    result.update(_kernels(device))
    if not result["kernels"]:
        result["status"] = "failed"
        result["error"] = (f"pyanomaly's {device} kernels are not loaded ({result['kernel_load_error']}); "
                           "this stage measured the reference fallback")


def _run(cmd: list[str], timeout: float, log: Path, env: dict | None = None, cwd: str | None = None) -> tuple[int, float]:
    """Run ``cmd`` with output to ``log``; (return code, seconds). A time-out kills it and returns 124."""
    tick = time.perf_counter()
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})}, cwd=cwd)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[device_check] timed out after {timeout:.0f} s\n")
            code = 124
    return code, time.perf_counter() - tick


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _version(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[-1] if text else None


def _python_in_scratch(module: str, *args: str) -> list[str]:
    """A command that runs ``python -m module args`` with the repository at the end of sys.path."""
    return [sys.executable, "-c", _LAUNCH, str(REPO), module, *args]


# -- stages -------------------------------------------------------------------------------------------
def stage_environment(out: Path, dry_run: bool, limit: float) -> dict:
    import torch

    result: dict = {"status": "ok", "python": platform.python_version(), "torch": torch.__version__,
                    "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                    "nvcc": _version(["nvcc", "--version"]),
                    "compute_sanitizer": _version(["compute-sanitizer", "--version"])}
    smi = _version(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    result["nvidia_smi"] = smi
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        result.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                       "sm_count": props.multi_processor_count, "gpu_memory_gib": props.total_memory / 2**30})
    elif not dry_run:
        result.update(status="failed", error="torch sees no CUDA device")
    return result


def stage_build(out: Path, dry_run: bool, limit: float) -> dict:
    if dry_run:
        return {"status": "skipped", "note": "dry run: no CUDA build (the installed package is used)"}
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    jobs = str(os.cpu_count() or 1)
    env = {"PYANOMALY_FORCE_CUDA": "1", "PYANOMALY_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": jobs}
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", str(REPO)]
    code, seconds = _run(cmd, limit - 20, out / "build.log", env=env)
    result = {"status": "ok" if code == 0 else "failed", "seconds": round(seconds, 1), "arch": f"{major}.{minor}",
              "jobs": int(jobs), "command": " ".join(cmd), "returncode": code}
    if code:
        result["error"] = "pip install failed (build.log): " + _tail(out / "build.log", 5)
        return result
    with tempfile.TemporaryDirectory() as scratch:  # a fresh process must load the CUDA kernels
        probe = "import json, pyanomaly; from pyanomaly import _ext; print(json.dumps([pyanomaly.__file__, _ext.has_kernels('cuda'), _ext.load_error()]))"
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=scratch, timeout=60)
    try:
        path, loaded, error = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        path, loaded, error = None, False, proc.stderr[-500:]
    result.update({"pyanomaly": path, "kernels": loaded, "kernel_load_error": error})
    if not loaded:
        result.update(status="failed", error=f"built, but the CUDA kernels do not load: {error}")
    return result


def stage_tests(out: Path, dry_run: bool, limit: float) -> dict:
    import importlib.util

    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests"), "-m", "cuda", "-x", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", f"--rootdir={REPO}"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append("--timeout=60")
    with tempfile.TemporaryDirectory() as scratch:
        code, seconds = _run(cmd, limit - 10, out / "tests.log", cwd=scratch)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    result = {"status": "ok" if code == 0 else "failed", "seconds": round(seconds, 1), "returncode": code,
              "passed": passed, **counts, "command": " ".join(cmd)}
    if dry_run:
        result["note"] = "dry run: the CUDA-marked tests are collected and skipped on the CPU"
    elif code == 0 and passed == 0:
        result.update(status="failed", error="no CUDA test ran (were the kernels built?)")
    if code:
        result["error"] = "pytest failed (tests.log): " + _tail(out / "tests.log", 8)
    result.update(_kernels(_device(dry_run)))
    return result


def smoke_kernels(device: str, ops: list[str] | None = None) -> dict:
    """One small forward + backward of every kernel, or of ``ops`` among patches, infonce, hopfield
    (the sanitizer's target; also run in the dry run)."""
    import torch

    from pyanomaly.ops import extract_patches, fold_patches, hopfield_retrieve, infonce, sample_negatives

    gen = torch.Generator().manual_seed(0)
    ops = ops or ["patches", "infonce", "hopfield"]
    checked = []
    if "patches" in ops:
        images = torch.randint(0, 256, (2, 3, 40, 40), generator=gen, dtype=torch.uint8).to(device)
        patches = extract_patches(images, 16, 8, sub_size=8, sub_stride=4, grayscale=True, mean=0.4, std=0.25)
        scores = torch.rand(2, 9, 9, generator=gen).to(device).requires_grad_()
        fold_patches(scores, 8, 4, (40, 40)).sum().backward()
        checked += [patches.float().sum(), scores.grad.sum()]
    if "infonce" in ops:
        q, p, b = (torch.randn(n, 24, generator=gen).to(device).requires_grad_() for n in (50, 50, 70))
        idx = sample_negatives(50, 5, 70, generator=torch.Generator(device=device).manual_seed(1), device=device)
        infonce(q, p, b, idx, temperature=0.7).sum().backward()
        checked += [q.grad.sum(), p.grad.sum(), b.grad.sum()]
    if "hopfield" in ops:
        queries = torch.randn(130, 40, generator=gen).to(device).requires_grad_()
        memory = torch.randn(70, 40, generator=gen).to(device).requires_grad_()
        retrieved, _ = hopfield_retrieve(queries, memory, beta=0.5, max_iter=3, tol=1e-4)
        retrieved.square().sum().backward()
        checked += [queries.grad.sum(), memory.grad.sum()]
    if device == "cuda":
        torch.cuda.synchronize()
    return {"ops": ops, "finite": bool(all(torch.isfinite(v) for v in checked))}


def stage_sanitizer(out: Path, dry_run: bool, limit: float) -> dict:
    target = _python_in_scratch("bench.device_check", "--smoke", _device(dry_run))
    if dry_run or shutil.which("compute-sanitizer") is None:
        with tempfile.TemporaryDirectory() as scratch:
            code, seconds = _run(target, limit, out / "sanitizer-target.log", cwd=scratch)
        why = "dry run" if dry_run else "compute-sanitizer not found"
        return {"status": ("skipped" if dry_run else "failed") if code == 0 else "failed",
                "note": f"{why}: the target ran without the sanitizer (rc {code}, {seconds:.1f} s)",
                **({} if code == 0 else {"error": _tail(out / "sanitizer-target.log", 5)})}
    result: dict = {"status": "ok", "tools": {}}
    tools = (("memcheck", []), ("racecheck", ["--racecheck-report", "all"]))
    for tool, extra in tools:
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "99", *extra, *target]
        if tool == "racecheck":  # the Hopfield kernels are the only ones with shared memory
            cmd += ["hopfield"]
        with tempfile.TemporaryDirectory() as scratch:
            code, seconds = _run(cmd, limit / 2, out / f"sanitizer-{tool}.log", cwd=scratch)
        log = (out / f"sanitizer-{tool}.log").read_text(errors="replace")
        summary = re.findall(r"ERROR SUMMARY: .*", log)
        result["tools"][tool] = {"returncode": code, "seconds": round(seconds, 1),
                                 "summary": summary[-1] if summary else None}
        if code:
            result["status"] = "failed"
            result["error"] = f"{tool}: rc {code}: " + _tail(out / f"sanitizer-{tool}.log", 6)
    return result


HEADLINE_SIZES = ("(cpcad)", "(anomem)")


def stage_ops(out: Path, dry_run: bool, limit: float) -> dict:
    """The op benchmarks at the headline sizes, rows appended to ``ops.jsonl`` as they finish."""
    import importlib

    from bench import _harness as H
    from bench import run as R

    device = _device(dry_run)
    result: dict = {"status": "ok"}
    _require_kernels(result, device)
    scale = "quick" if dry_run else "full"
    meta = H.device_info(device)
    meta.update(scale=scale, command=f"python -m bench.device_check (ops stage, {scale} sizes, headline only)")
    roof = H.roofline(device, quick=dry_run)
    meta["roofline"] = roof
    todo, kernels = [], {}
    for module in R.OP_MODULES.values():
        for spec in importlib.import_module(module).SPECS:
            kernels[spec.name] = H.probe_fused(spec, device)
            cases = H.cases_for(spec, scale, None, None if dry_run else ",".join(HEADLINE_SIZES))
            todo += [(spec, case) for case in cases]
    # compiled references last: their compile time is what a short budget can lose
    todo.sort(key=lambda item: item[1].provider == "compiled-ref")
    rows = []
    with open(out / "ops.jsonl", "w") as stream:
        for spec, case in todo:
            row = H.op_row(spec, case, H.measure(case, device, "quick" if dry_run else "default"), roof, kernels)
            rows.append(row)
            stream.write(json.dumps(row, default=str) + "\n")
            stream.flush()
    H.add_ratios(rows)
    meta.update(fused_ops=kernels, loadavg_end=H._loadavg(), wall_s=0.0,
                memory_method="cuda: max_memory_allocated over the timed calls minus memory_allocated with the "
                              "inputs alive" if device == "cuda" else "cpu: in-process RSS (dry run: indicative)")
    name = re.sub(r"[^a-z0-9-]+", "-", meta["device_name"])
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1, default=str))
    (out / f"{name}.md").write_text(R.markdown(meta, rows))
    fallbacks = sorted(k for k, v in kernels.items() if v != "kernel")
    errors = [f"{r['op']} {r['provider']} {r['mode']}: {r['error']}" for r in rows if r.get("error")]
    result.update(rows=len(rows), errors=errors[:10], table=f"{name}.md", fused_ops=kernels)
    if fallbacks and device == "cuda":
        result.update(status="failed", error=f"fused ops ran their reference fallback: {fallbacks}")
    elif errors and result["status"] == "ok":
        result["status"] = "failed" if any("fused" in e for e in errors) else "ok"
    return result


def training_cases(dry_run: bool) -> list[tuple[str, str, dict]]:
    """(label, provider, config) per measured training setting; tiny in the dry run."""
    if dry_run:
        cpcad = dict(image_size=64, patch_size=32, patch_stride=16, sub_size=8, sub_stride=4,
                     widths=(8, 16), blocks=(1, 1), prediction_steps=2, batch=2)
        return [(f"cpcad {stem} stem 64px (dry)", provider, {**cpcad, "stem": stem})
                for stem in ("fast", "gim") for provider in ("fused", "reference")] + [
            ("anomem resnet18 w8 32px bs8 (dry)", "fused", dict(backbone="resnet18", width=8, batch=8))]
    return [(f"cpcad {stem} stem 768px bs16 paper", provider, {"stem": stem, "batch": 16})
            for stem in ("fast", "gim") for provider in ("fused", "reference")] + [
        ("anomem resnet50 32px bs256 paper", "fused", dict(backbone="resnet50", batch=256))]


def _time_steps(step, device: str, steps: int) -> list[float]:
    from bench._harness import time_call

    step()  # warm-up
    return [time_call(step, device) for _ in range(steps)]


def _cpcad_step(config: dict, device: str):
    import torch

    from pyanomaly import CPCAD

    batch = config.pop("batch")
    detector = CPCAD(**config, device=device, verbose=False, seed=0)
    detector.model_ = detector._build_model()  # what fit builds first
    model = detector.model_.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=detector.lr)
    gen = torch.Generator().manual_seed(0)
    size = detector.image_size
    images = torch.randint(0, 256, (batch, 1, size, size), generator=gen, dtype=torch.uint8).to(device)
    neg_gen = torch.Generator(device=device).manual_seed(1)

    def step():
        flip = (torch.rand(batch, generator=gen) < 0.5).to(device)
        _, _, objective = model(detector._windows(images, flip), num_negatives=detector.num_negatives,
                                generator=neg_gen)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()

    return step, batch


def _anomem_step(config: dict, device: str):
    import torch

    from pyanomaly import AnoMem
    from pyanomaly.models.anomem.augment import AugmentConfig, simclr_view

    batch = config.pop("batch")
    detector = AnoMem(**config, image_size=32, batch_size=batch, device=device, seed=0)
    model = detector._build_model(3, (32, 32)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    normal = torch.ones(batch, dtype=torch.bool, device=device)
    augment = AugmentConfig()

    def step():
        first, first_crop = simclr_view(images, augment, gen)
        second, second_crop = simclr_view(images, augment, gen)
        with detector._autocast():
            loss, _ = model.contrastive_loss(first, first_crop, second, second_crop, normal,
                                             sampling_ratios=detector.sampling_ratios,
                                             scale_weights=detector.weights_, temperature=detector.temperature,
                                             variance_weight=detector.variance_weight, generator=gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, batch


def stage_training(out: Path, dry_run: bool, limit: float) -> dict:
    import torch

    from pyanomaly.ops import reference_mode

    device = _device(dry_run)
    result: dict = {"status": "ok", "runs": []}
    _require_kernels(result, device)
    steps = 2 if dry_run else 3
    for label, provider, config in training_cases(dry_run):
        run: dict = {"label": label, "provider": provider, "config": {k: v for k, v in config.items()}}
        ctx = reference_mode() if provider == "reference" else contextlib.nullcontext()
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with ctx:
                make = _anomem_step if label.startswith("anomem") else _cpcad_step
                step, batch = make(dict(config), device)
                times = _time_steps(step, device, steps)
            median = sorted(times)[len(times) // 2]
            run.update(step_s=median, images_per_s=batch / median, times_s=times)
            if device == "cuda":
                run["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.cuda.OutOfMemoryError as exc:
            run["out_of_memory"] = str(exc).splitlines()[0][:200]
        except Exception as exc:  # noqa: BLE001 - report and go on to the next setting
            run["error"] = f"{type(exc).__name__}: {exc}"[:300]
            run["traceback"] = traceback.format_exc(limit=4)[-1500:]
            result["status"] = "failed"
        finally:
            step = None
        result["runs"].append(run)
        (out / "training.partial.json").write_text(json.dumps(result, indent=1, default=str))
    return result


STAGE_FUNCTIONS = {name: globals()[f"stage_{name}"] for name, _ in STAGES}


# -- the orchestrator -----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def report_markdown(report: dict) -> str:
    lines = [f"### Device check: {report['device']}, {report['date'][:10]}", "",
             f"`{report['command']}`; {report['wall_s']:.0f} s of a {report['budget_s']} s budget"
             + (" (dry run: CPU, tiny sizes)" if report["dry_run"] else "") + ".", "",
             "| stage | status | seconds | limit | kernels | notes |", "|---|---|---|---|---|---|"]
    for name, stage in report["stages"].items():
        note = stage.get("error") or stage.get("note") or ""
        if name == "tests" and "passed" in stage:
            note = f"{stage['passed']} passed, {stage['failures']} failed, {stage['errors']} errors, " \
                   f"{stage['skipped']} skipped. " + note
        kernels = {True: "compiled", False: "REFERENCE FALLBACK", None: "-"}[stage.get("kernels")]
        lines.append(f"| {name} | {stage['status']} | {stage.get('wall_s', 0):.0f} | {stage.get('limit_s', 0):.0f} "
                     f"| {kernels} | {str(note).replace('|', '/').replace(chr(10), ' ')[:300]} |")
    training = report["stages"].get("training", {}).get("runs") or []
    if training:
        lines += ["", "| training setting | ops | step | images/s | peak GPU memory |", "|---|---|---|---|---|"]
        for run in training:
            if "step_s" in run:
                peak = f"{run['peak_gib']:.1f} GiB" if "peak_gib" in run else "-"
                lines.append(f"| {run['label']} | {run['provider']} | {run['step_s'] * 1e3:.0f} ms "
                             f"| {run['images_per_s']:.1f} | {peak} |")
            else:
                why = "out of memory" if "out_of_memory" in run else run.get("error", "")
                lines.append(f"| {run['label']} | {run['provider']} | - | - | {why} |")
    return "\n".join(lines) + "\n"


def _publish(work: Path, out: Path) -> None:
    """Copy the bench-format tables to ``out`` and pack every stage file and log into logs.tar.gz.

    Few files in ``out`` (the device tool brings back at most 8), rewritten after every stage.
    """
    for table in work.glob("*.md"):
        shutil.copy2(table, out / table.name)
        if table.with_suffix(".json").exists():
            shutil.copy2(table.with_suffix(".json"), out / table.with_suffix(".json").name)
    partial = out / "logs.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(work, arcname="logs")
    os.replace(partial, out / "logs.tar.gz")


def orchestrate(out: Path, dry_run: bool, budget: float, only: list[str] | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device-check-"))  # stage files and logs, packed after each stage
    start = time.perf_counter()
    env_probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    name = subprocess.run([sys.executable, "-c", env_probe], capture_output=True, text=True).stdout.strip() or "unknown"
    device = "cpu-dry-run" if dry_run else _slug(name)
    report = {"device": device, "gpu": None if dry_run else name, "dry_run": dry_run, "budget_s": budget,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m bench.device_check " + " ".join(sys.argv[1:]), "stages": {}, "wall_s": 0.0}
    failed = False

    def save() -> None:
        report["wall_s"] = time.perf_counter() - start
        (out / f"{device}-device-check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / f"{device}-device-check.md").write_text(report_markdown(report))
        _publish(work, out)

    for stage, limit in STAGES:
        if only and stage not in only:
            continue
        limit = DRY_RUN_LIMITS.get(stage, limit) if dry_run else limit
        left = budget - (time.perf_counter() - start)
        if left < 10:
            report["stages"][stage] = {"status": "skipped", "note": f"overall budget of {budget:.0f} s used up"}
            continue
        if failed and stage != "environment":
            report["stages"][stage] = {"status": "skipped", "note": "an earlier stage failed"}
            continue
        limit = min(limit, left)
        print(f"[device_check] {stage}: limit {limit:.0f} s", file=sys.stderr, flush=True)
        stage_file = work / f"stage-{stage}.json"
        cmd = _python_in_scratch("bench.device_check", "--stage", stage, "--out", str(work),
                                 "--limit", str(limit), *(["--dry-run"] if dry_run else []))
        with tempfile.TemporaryDirectory() as scratch:
            code, seconds = _run(cmd, limit, work / f"stage-{stage}.log", cwd=scratch)
        if stage_file.exists():
            result = json.loads(stage_file.read_text())
        elif code == 124:
            result = {"status": "timed out", "error": f"hit its {limit:.0f} s limit; partial files in logs.tar.gz"}
        else:
            result = {"status": "failed", "error": f"stage process rc {code}: " + _tail(work / f"stage-{stage}.log", 8)}
        result.update(wall_s=round(seconds, 1), limit_s=round(limit, 1))
        report["stages"][stage] = result
        # a broken build or environment makes everything after it meaningless; later stages go on
        failed = result["status"] not in ("ok", "skipped") and stage in ("environment", "build")
        save()
        print(f"[device_check] {stage}: {result['status']} in {seconds:.0f} s", file=sys.stderr, flush=True)
    save()
    print(report_markdown(report))
    shutil.rmtree(work, ignore_errors=True)
    bad = [s for s, r in report["stages"].items() if r["status"] not in ("ok", "skipped")]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="device-check", help="folder for the stage files and the report")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny sizes (CI)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="overall seconds (default 480)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(s for s, _ in STAGES))
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", help=argparse.SUPPRESS)  # internal: the sanitizer's target
    parser.add_argument("ops", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        result = smoke_kernels(args.smoke, args.ops or None)
        print(json.dumps(result))
        return 0 if result["finite"] else 1
    if args.stage:
        out = Path(args.out)
        try:
            result = STAGE_FUNCTIONS[args.stage](out, args.dry_run, args.limit)
        except Exception as exc:  # noqa: BLE001 - the report says what broke
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500],
                      "traceback": traceback.format_exc(limit=6)[-2000:]}
        (out / f"stage-{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))
        return 0
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    unknown = set(stages or []) - {s for s, _ in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    return orchestrate(Path(args.out), args.dry_run, args.budget, stages)


if __name__ == "__main__":
    sys.exit(main())
