// Argument checks shared by the CPU and CUDA glue of the Hopfield retrieval (torch glue only; never
// include from a .cu file). Each device checks its own device and dtype set before calling this.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace pyanomaly {

// queries (N, D), memory (M, D) of one dtype, M, D >= 1; beta > 0, max_iter >= 1, tol >= 0.
inline void check_hopfield_retrieve_args(const at::Tensor& queries, const at::Tensor& memory, double beta,
                                         int64_t max_iter, double tol) {
  TORCH_CHECK(memory.scalar_type() == queries.scalar_type(), "memory must have the dtype of queries (",
              queries.scalar_type(), "), got ", memory.scalar_type());
  TORCH_CHECK(memory.size(0) >= 1 && memory.size(1) >= 1,
              "memory must hold at least one pattern of dimension >= 1, got shape ", memory.sizes());
  TORCH_CHECK(queries.size(1) == memory.size(1), "queries must have the pattern dimension D = ", memory.size(1),
              " of memory, got shape ", queries.sizes());
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "beta must be a finite number > 0, got ", beta);
  TORCH_CHECK(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0, "tol must be a finite number >= 0, got ", tol);
}

}  // namespace pyanomaly
