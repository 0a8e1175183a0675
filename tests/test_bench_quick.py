"""CI smoke run of the benchmarks (bench/): `python -m bench.run --quick` must finish and write results.

The subprocess runs in a temporary folder with the repository root appended to ``sys.path``, so it
imports ``bench`` from this checkout and ``pyanomaly`` from wherever the tests get it (the installed
package in CI).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = (
    "import runpy, sys; sys.path.append(sys.argv.pop(1)); "
    "runpy.run_module('bench.run', run_name='__main__', alter_sys=True)"
)


@pytest.mark.skipif(not (REPO / "bench" / "run.py").exists(), reason="bench/ is not in this checkout")
def test_bench_quick_runs_and_writes_results(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(REPO), "--quick", "--device", "cpu", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.glob("cpu-*.json"))
    assert len(files) == 1, f"expected one results JSON in {out}, got {files}\n{proc.stderr[-2000:]}"
    assert files[0].with_suffix(".md").exists()
    data = json.loads(files[0].read_text())
    assert data["meta"]["scale"] == "quick" and data["meta"]["torch"]
    rows = data["results"]
    ops = {r["op"] for r in rows}
    assert {"extract_patches", "fold_patches", "infonce", "hopfield", "e2e-cpcad", "e2e-anomem"} <= ops
    # the pure-PyTorch references are always available: they must measure cleanly
    for r in rows:
        if r["provider"] == "reference" and not r.get("skipped"):
            assert not r.get("error"), f"{r['op']} {r['size']} {r['mode']}: {r['error']}"
            assert r["median_s"] > 0 and r["peak_bytes"] is not None
    assert "op" in proc.stdout and "speedup" in proc.stdout  # the printed table
