// Argument checks and input layout shared by the CPU and CUDA glue of the fused InfoNCE op (torch
// glue only; never include from a .cu file). The checks are defined in csrc/ops/infonce.cpp.
#pragma once
#include <ATen/ATen.h>

namespace pyanomaly {

// Shapes, dtypes, devices and the range of neg_idx; errors name the argument.
void infonce_check_inputs(const at::Tensor& queries, const at::Tensor& positives, const at::Tensor& bank,
                          const at::Tensor& neg_idx, double temperature);
void infonce_check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& queries,
                                   const at::Tensor& positives, const at::Tensor& bank, const at::Tensor& neg_idx,
                                   const at::Tensor& lse, double temperature, bool fold_positives);

// Rows are read with unit inner stride; any row stride (slices, expand) is kept without a copy.
inline at::Tensor unit_inner_stride(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
}

}  // namespace pyanomaly
