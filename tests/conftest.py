from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_report_header(config):
    import pyanomaly
    from pyanomaly import _ext

    kernels = "yes" if _ext.has_kernels("cpu") else f"no ({_ext.load_error()})"
    return f"pyanomaly imported from {Path(pyanomaly.__file__).parent}; compiled CPU kernels: {kernels}"


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda`` tests without a GPU and ``kernels`` tests without the compiled CPU kernels (as
    when the uncompiled source tree is imported); tests/test_ext.py's build check still fails then."""
    from pyanomaly import _ext

    skips = {
        "cuda": (torch.cuda.is_available() and _ext.has_kernels("cuda"),
                 "needs a CUDA device and pyanomaly's CUDA kernels"),
        "kernels": (_ext.has_kernels("cpu"),
                    f"needs pyanomaly's compiled CPU kernels, not loaded: {_ext.load_error()}"),
    }
    for item in items:
        for marker, (ready, reason) in skips.items():
            if marker in item.keywords and not ready:
                item.add_marker(pytest.mark.skip(reason=reason))
