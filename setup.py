"""Build pyanomaly and its compiled kernels, ``pyanomaly._C``.

The extension is compiled against the torch that is already installed, so install with
``pip install --no-build-isolation .`` (pip's isolated build environment has no torch).

CUDA kernels are built when ``torch.version.cuda is not None and CUDA_HOME is not None``.
Environment overrides: ``PYANOMALY_FORCE_CPU=1`` builds the CPU kernels only;
``PYANOMALY_FORCE_CUDA=1`` builds the CUDA kernels too and fails if that is impossible.
``PYANOMALY_CUDA_ARCH_LIST`` (default ``8.0;9.0``) picks the GPU architectures.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

REBUILD_HINT = "pip install --no-build-isolation ."

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "pyanomaly: torch is not importable in this build environment.\n"
        "pyanomaly's kernels are compiled against the torch you have installed, so pip's build\n"
        "isolation (which builds in an empty environment) cannot work. Install torch first, then:\n"
        f"    {REBUILD_HINT}\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def decide_cuda() -> tuple[bool, str]:
    """Return (build CUDA kernels?, the reason), printed by setup."""
    if _flag("PYANOMALY_FORCE_CPU"):
        return False, "PYANOMALY_FORCE_CPU is set"
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("PYANOMALY_FORCE_CUDA"):
        if not has_cuda:
            sys.exit(
                "pyanomaly: PYANOMALY_FORCE_CUDA is set but "
                f"torch.version.cuda={torch.version.cuda!r} and CUDA_HOME={CUDA_HOME!r}; "
                "install a CUDA build of torch and the CUDA toolkit (nvcc)."
            )
        return True, "PYANOMALY_FORCE_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"


def write_build_info(with_cuda: bool) -> None:
    """Record which torch the extension is compiled against (checked before it is imported)."""
    path = os.path.join(ROOT, "pyanomaly", "_build_info.py")
    text = (
        "# Written by setup.py at build time; do not edit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def make_extension():
    with_cuda, reason = decide_cuda()
    print(f"pyanomaly: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels ({reason})")
    write_build_info(with_cuda)

    csrc = os.path.join("csrc")
    sources = sorted(
        glob.glob(os.path.join(csrc, "*.cpp"))
        + glob.glob(os.path.join(csrc, "ops", "*.cpp"))
        + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    )
    include_dirs = [os.path.join(ROOT, csrc, "include")]
    define_macros = [("PYANOMALY_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3"]  # torch picks the C++ standard its headers need
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"]

    if not with_cuda:
        return CppExtension(
            "pyanomaly._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
        )

    arch_list = os.environ.get("PYANOMALY_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")) + glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    define_macros += [("PYANOMALY_WITH_CUDA", "1"), ("PYANOMALY_CUDA_VERSION", f'"{torch.version.cuda}"')]
    return CUDAExtension(
        "pyanomaly._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
    )


setup(
    packages=find_packages(include=["pyanomaly", "pyanomaly.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
