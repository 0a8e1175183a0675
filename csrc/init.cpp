// The pybind11 module pyanomaly._C: importing it registers every op with the dispatcher
// (the TORCH_LIBRARY_FRAGMENT blocks in ops/, cpu/ and cuda/), and it reports how it was built.
#include <torch/extension.h>

#include "pyanomaly/huge_pages.h"

#ifndef PYANOMALY_TORCH_VERSION
#define PYANOMALY_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyanomaly compiled kernels (ops are registered under torch.ops.pyanomaly)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch_version"] = PYANOMALY_TORCH_VERSION;
#ifdef PYANOMALY_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_version"] = PYANOMALY_CUDA_VERSION;
#else
    info["with_cuda"] = false;
    info["cuda_version"] = pybind11::none();
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
  m.def("huge_pages_enabled", []() { return pyanomaly::huge_pages_enabled().load(); });
  m.def("set_huge_pages", [](bool enabled) { return pyanomaly::huge_pages_enabled().exchange(enabled); },
        "Switch the CPU kernels' huge-page advice for large outputs; returns the previous setting");
}
