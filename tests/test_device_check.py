"""bench/device_check.py proven without a GPU: the dry run (every stage on the CPU, tiny sizes).

Run from a temporary folder with the repository appended to ``sys.path`` (as the script runs its own
stages), so ``pyanomaly`` is the installed package, as on the GPU machine.
"""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = (
    "import runpy, sys; sys.path.append(sys.argv.pop(1)); "
    "runpy.run_module('bench.device_check', run_name='__main__', alter_sys=True)"
)
pytestmark = pytest.mark.skipif(not (REPO / "bench" / "device_check.py").exists(), reason="no bench/ here")


def device_check(tmp_path, *args):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(REPO), "--out", str(out), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    reports = list(out.glob("*-device-check.json"))
    assert len(reports) == 1, proc.stderr[-3000:]
    return proc, json.loads(reports[0].read_text()), out


def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    proc, report, out = device_check(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = report["stages"]
    assert list(stages) == ["environment", "build", "tests", "sanitizer", "ops", "training"]
    assert {s["status"] for s in stages.values()} <= {"ok", "skipped"}
    assert "dry run" in stages["build"]["note"] and "dry run" in stages["sanitizer"]["note"]
    assert stages["tests"]["skipped"] > 0 and stages["tests"]["failures"] == 0  # CUDA tests collected
    for name in ("ops", "training"):  # they measured the compiled CPU kernels, not a fallback
        assert stages[name]["kernels"] is True, stages[name]
    assert stages["ops"]["rows"] > 0 and not stages["ops"]["errors"]
    runs = stages["training"]["runs"]
    assert {r["provider"] for r in runs} == {"fused", "reference"} and all(r["step_s"] > 0 for r in runs)
    assert (out / stages["ops"]["table"]).exists()
    names = {Path(n).name for n in tarfile.open(out / "logs.tar.gz").getnames()}
    assert {"stage-tests.json", "tests.log", "ops.jsonl"} <= names
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files
    assert "| training |" in proc.stdout  # the markdown report is printed last


def test_exhausted_budget_skips_the_remaining_stages_and_says_so(tmp_path):
    proc, report, _ = device_check(tmp_path, "--dry-run", "--budget", "1", "--stages", "environment,ops")
    assert proc.returncode == 0
    assert list(report["stages"]) == ["environment", "ops"]
    for stage in report["stages"].values():
        assert stage["status"] == "skipped" and "budget" in stage["note"]
