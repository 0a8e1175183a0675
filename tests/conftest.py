from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and pyanomaly's CUDA kernels")
    from pyanomaly import _ext

    cuda_ready = torch.cuda.is_available() and _ext.has_kernels("cuda")
    for item in items:
        if "cuda" in item.keywords and not cuda_ready:
            item.add_marker(skip_cuda)
