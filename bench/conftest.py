"""pytest-benchmark entry point: ``pytest bench/ --benchmark-only [--quick | --full]``.

Collects ``bench/bench_*.py``, parametrizes each op's ``test_*`` over the cases of its ``SPECS`` at
the chosen scale, and after the run writes the speedup and memory ratio against the reference of the
same (op, size, mode) into every benchmark's ``extra_info`` of the ``--benchmark-json`` output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `import bench` from anywhere, without shadowing an installed pyanomaly
    sys.path.append(str(ROOT))

from bench import _harness as H  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("pyanomaly-bench", "pyanomaly benchmarks")
    group.addoption("--quick", action="store_true", help="tiny sizes (about a minute on a CPU)")
    group.addoption("--full", action="store_true", help="the real CPC-AD / AnoMem shapes and full sweeps")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-providers", default=None, help="comma-separated providers to keep")


def _scale(config) -> str:
    if config.getoption("--quick") and config.getoption("--full"):
        raise pytest.UsageError("--quick and --full exclude each other")
    return "quick" if config.getoption("--quick") else "full" if config.getoption("--full") else "default"


def pytest_collect_file(file_path, parent):
    here = Path(__file__).parent
    if (file_path.parent == here and file_path.name.startswith("bench_") and file_path.suffix == ".py"
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        scale = _scale(metafunc.config)
        providers = metafunc.config.getoption("--bench-providers")
        providers = providers.split(",") if providers else None
        cases = [c for spec in metafunc.module.SPECS for c in H.cases_for(spec, scale, providers)]
        metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def bench_scale(request) -> str:
    return _scale(request.config)


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    device = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but torch sees no CUDA device")
    return device


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Ratios against the reference measured in the same run, plus the device and build."""
    rows = []
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "op" in info:
            rows.append({"op": info["op"], "size": info["size"], "mode": info["mode"],
                         "provider": info["provider"], "median_s": bench["stats"]["median"],
                         "peak_bytes": info.get("peak_bytes"), "_info": info})
    H.add_ratios(rows)
    for row in rows:
        for key in ("speedup", "mem_ratio"):
            if key in row:
                row["_info"][f"{key}_vs_reference"] = row[key]
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    output_json["pyanomaly_bench"] = {**H.device_info(device), "scale": _scale(config)}
