// Shared by the CUDA torch glue (cuda/*_launch.cpp, never a .cu file): the kernels' element type of
// a tensor dtype, and the check that turns a launcher's cudaError_t into a Python error.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "pyanomaly/dtype.h"

namespace pyanomaly {

// Callers have already checked the dtype against what their op accepts; `arg` names the tensor.
inline ElemType elem_type(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kByte:
      return ElemType::kUInt8;
    case at::kHalf:
      return ElemType::kHalf;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kFloat:
      return ElemType::kFloat;
    case at::kDouble:
      return ElemType::kDouble;
    default:
      TORCH_CHECK(false, arg, " has a dtype the CUDA kernels do not support: ", t);
  }
}

// `what` names the op, e.g. "pyanomaly::infonce".
inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace pyanomaly
