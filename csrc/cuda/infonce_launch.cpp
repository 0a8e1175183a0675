// CUDA glue of the fused InfoNCE op: checks, device guard, current stream, the params structs, and the
// sorted segments of neg_idx (torch ops) for the deterministic bank gradient.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "pyanomaly/check.h"
#include "pyanomaly/infonce_args.h"
#include "pyanomaly/cuda_glue.h"
#include "pyanomaly/infonce_params.h"

namespace pyanomaly {

namespace {

std::tuple<at::Tensor, at::Tensor> infonce_cuda(const at::Tensor& queries, const at::Tensor& positives,
                                                const at::Tensor& bank, const at::Tensor& neg_idx, double temperature,
                                                bool deterministic) {
  (void)deterministic;  // only the backward differs
  infonce_check_inputs(queries, positives, bank, neg_idx, temperature);
  PYA_CHECK_CUDA(queries);
  c10::cuda::CUDAGuard guard(queries.device());
  const auto acc_type = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = queries.size(0);
  at::Tensor loss = at::empty({n}, queries.options());
  at::Tensor lse = at::empty({n}, queries.options().dtype(acc_type));
  if (n == 0) return {loss, lse};
  const at::Tensor q = unit_inner_stride(queries);
  const at::Tensor p = unit_inner_stride(positives);
  const at::Tensor b = unit_inner_stride(bank);

  InfoNCEForwardParams params{};
  params.queries = q.const_data_ptr();
  params.positives = p.const_data_ptr();
  params.bank = b.const_data_ptr();
  params.neg_idx = neg_idx.const_data_ptr<int64_t>();
  params.loss = loss.data_ptr();
  params.lse = lse.data_ptr();
  params.num_queries = n;
  params.num_negatives = neg_idx.size(1);
  params.dim = q.size(1);
  params.bank_size = b.size(0);
  params.queries_row_stride = q.stride(0);
  params.positives_row_stride = p.stride(0);
  params.bank_row_stride = b.stride(0);
  params.neg_idx_row_stride = neg_idx.stride(0);
  params.neg_idx_col_stride = neg_idx.stride(1);
  params.inv_temperature = 1.0 / temperature;
  params.dtype = elem_type(queries.scalar_type(), "queries");
  check_launch(launch_infonce_forward(params, c10::cuda::getCurrentCUDAStream()), "pyanomaly::infonce");
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& queries, const at::Tensor& positives, const at::Tensor& bank,
    const at::Tensor& neg_idx, const at::Tensor& lse, double temperature, bool fold_positives, bool deterministic) {
  infonce_check_backward_inputs(grad_loss, queries, positives, bank, neg_idx, lse, temperature, fold_positives);
  PYA_CHECK_CUDA(queries);
  c10::cuda::CUDAGuard guard(queries.device());
  const int64_t n = queries.size(0);
  const int64_t k = neg_idx.size(1);
  const int64_t d = queries.size(1);
  const int64_t m = bank.size(0);
  const auto acc_type = lse.scalar_type();
  at::Tensor grad_queries = at::empty({n, d}, queries.options());
  at::Tensor grad_positives = at::empty({fold_positives ? 0 : n, d}, queries.options());
  if (n == 0) return {grad_queries, grad_positives, at::zeros({m, d}, queries.options())};
  if (!deterministic) {
    at::globalContext().alertNotDeterministic("pyanomaly::infonce_backward with deterministic=False");
  }
  const at::Tensor q = unit_inner_stride(queries);
  const at::Tensor p = unit_inner_stride(positives);
  const at::Tensor b = unit_inner_stride(bank);
  const at::Tensor grad = grad_loss.to(acc_type).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor coef = at::empty({n, k + 1}, queries.options().dtype(acc_type));

  // Atomic path: float atomics into an accumulator in the accumulation type (the output itself when
  // the dtypes agree). Deterministic path: a stable sort of the flat positions by bank row.
  at::Tensor grad_bank;
  at::Tensor grad_bank_accum;
  at::Tensor segment_offsets;
  at::Tensor segment_entries;
  if (deterministic) {
    grad_bank = at::empty({m, d}, queries.options());
    // Column 0 is the positive: bank row i when folded, else the key m, which sorts past every segment.
    at::Tensor keys = at::empty({n, k + 1}, neg_idx.options());
    if (fold_positives) {
      keys.select(1, 0).copy_(at::arange(n, neg_idx.options()));
    } else {
      keys.select(1, 0).fill_(m);
    }
    keys.narrow(1, 1, k).copy_(neg_idx);
    auto [sorted_keys, order] = at::sort(keys.view({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    segment_entries = order;
    segment_offsets = at::searchsorted(sorted_keys, at::arange(m + 1, neg_idx.options()));
  } else {
    grad_bank_accum = at::zeros({m, d}, queries.options().dtype(acc_type));
  }

  InfoNCEBackwardParams params{};
  params.queries = q.const_data_ptr();
  params.positives = p.const_data_ptr();
  params.bank = b.const_data_ptr();
  params.neg_idx = neg_idx.const_data_ptr<int64_t>();
  params.grad_loss = grad.const_data_ptr();
  params.lse = lse_c.const_data_ptr();
  params.grad_queries = grad_queries.data_ptr();
  params.grad_positives = fold_positives ? nullptr : grad_positives.data_ptr();
  params.coef = coef.data_ptr();
  params.grad_bank = deterministic ? grad_bank.data_ptr() : nullptr;
  params.grad_bank_accum = deterministic ? nullptr : grad_bank_accum.data_ptr();
  params.segment_offsets = deterministic ? segment_offsets.const_data_ptr<int64_t>() : nullptr;
  params.segment_entries = deterministic ? segment_entries.const_data_ptr<int64_t>() : nullptr;
  params.num_queries = n;
  params.num_negatives = k;
  params.dim = d;
  params.bank_size = m;
  params.queries_row_stride = q.stride(0);
  params.positives_row_stride = p.stride(0);
  params.bank_row_stride = b.stride(0);
  params.neg_idx_row_stride = neg_idx.stride(0);
  params.neg_idx_col_stride = neg_idx.stride(1);
  params.inv_temperature = 1.0 / temperature;
  params.fold_positives = fold_positives;
  params.dtype = elem_type(queries.scalar_type(), "queries");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(launch_infonce_backward_rows(params, stream), "pyanomaly::infonce_backward");
  if (deterministic) {
    check_launch(launch_infonce_backward_bank(params, stream), "pyanomaly::infonce_backward");
  } else {
    grad_bank = grad_bank_accum.scalar_type() == queries.scalar_type() ? grad_bank_accum
                                                                       : grad_bank_accum.to(queries.scalar_type());
  }
  return {grad_queries, grad_positives, grad_bank};
}

}  // namespace
}  // namespace pyanomaly

TORCH_LIBRARY_IMPL(pyanomaly, CUDA, m) {
  m.impl("infonce", &pyanomaly::infonce_cuda);
  m.impl("infonce_backward", &pyanomaly::infonce_backward_cuda);
}
