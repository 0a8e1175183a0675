"""``python -m pyanomaly info``: what was built and what this machine can run."""

from __future__ import annotations

import platform

import torch

from pyanomaly import _ext

__all__ = ["info_text"]


def info_text() -> str:
    """A human-readable report of the torch, build and device setup."""
    build = _ext.build_info()
    lines = [
        f"pyanomaly {__import__('pyanomaly').__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})",
        f"compiled kernels: {'loaded' if build else 'NOT loaded: ' + str(_ext.load_error())}",
    ]
    if build:
        lines += [
            f"  built against torch {build['torch_version']}",
            "  CPU kernels: yes" + (" (OpenMP)" if build.get("openmp") else ""),
            f"  CUDA kernels: {'yes, CUDA ' + str(build['cuda_version']) if build['with_cuda'] else 'no'}",
        ]
        if hasattr(_ext._C, "huge_pages_enabled"):
            on = _ext._C.huge_pages_enabled()
            reclaimed = not on and _ext.host_reclaims_free_memory()
            why = " (this VM's host takes back freed memory)" if reclaimed else ""
            lines.append(f"  huge pages for large CPU patch outputs: {'on' if on else 'off'}{why}; "
                         "PYANOMALY_HUGE_PAGES=0/1 sets it")
    else:
        lines.append(f"  rebuild with: {_ext.REBUILD_COMMAND}")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(
                f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}"
            )
    else:
        lines.append("CUDA devices: none visible")
    return "\n".join(lines)
