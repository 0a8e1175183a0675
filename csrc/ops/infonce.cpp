// Schemas of the fused InfoNCE op, and the argument checks its CPU and CUDA kernels share
// (declared in pyanomaly/infonce_args.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "pyanomaly/check.h"
#include "pyanomaly/infonce_args.h"

namespace pyanomaly {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

}  // namespace

// Shapes, dtypes, devices and the range of neg_idx (one min/max pass; a host sync on CUDA), so no
// kernel ever reads outside bank.
void infonce_check_inputs(const at::Tensor& queries, const at::Tensor& positives, const at::Tensor& bank,
                          const at::Tensor& neg_idx, double temperature) {
  TORCH_CHECK(queries.dim() == 2, "queries must have shape (N, D), got shape ", queries.sizes());
  const int64_t n = queries.size(0);
  const int64_t d = queries.size(1);
  TORCH_CHECK(positives.dim() == 2 && positives.size(0) == n && positives.size(1) == d,
              "positives must have the queries' shape (N, D) = (", n, ", ", d, "), got shape ", positives.sizes());
  TORCH_CHECK(bank.dim() == 2 && bank.size(1) == d, "bank must have shape (M, D) with D = ", d,
              " like queries, got shape ", bank.sizes());
  TORCH_CHECK(neg_idx.dim() == 2 && neg_idx.size(0) == n, "neg_idx must have shape (N, K) with N = ", n,
              ", got shape ", neg_idx.sizes());
  TORCH_CHECK(neg_idx.size(1) >= 1, "neg_idx must have at least one column (K >= 1 negatives), got shape ",
              neg_idx.sizes());
  PYA_CHECK_SAME_DEVICE(positives, queries);
  PYA_CHECK_SAME_DEVICE(bank, queries);
  PYA_CHECK_SAME_DEVICE(neg_idx, queries);
  TORCH_CHECK(is_supported_float(queries.scalar_type()),
              "queries must be float16, bfloat16, float32 or float64, got ", queries.scalar_type());
  PYA_CHECK_DTYPE(positives, queries.scalar_type());
  PYA_CHECK_DTYPE(bank, queries.scalar_type());
  PYA_CHECK_DTYPE(neg_idx, at::kLong);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0, got ",
              temperature);
  if (neg_idx.numel() > 0) {
    const int64_t m = bank.size(0);
    auto [lo, hi] = at::aminmax(neg_idx);
    const int64_t lo_value = lo.item<int64_t>();
    const int64_t hi_value = hi.item<int64_t>();
    TORCH_CHECK_INDEX(lo_value >= 0 && hi_value < m, "neg_idx must hold rows of bank in [0, ", m,
                      "), got values in [", lo_value, ", ", hi_value, "]");
  }
}

void infonce_check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& queries,
                                   const at::Tensor& positives, const at::Tensor& bank, const at::Tensor& neg_idx,
                                   const at::Tensor& lse, double temperature, bool fold_positives) {
  infonce_check_inputs(queries, positives, bank, neg_idx, temperature);
  const int64_t n = queries.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == n, "grad_loss must have shape (N,) = (", n,
              ",), got shape ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.is_floating_point(), "grad_loss must be floating point, got ", grad_loss.scalar_type());
  PYA_CHECK_SAME_DEVICE(grad_loss, queries);
  const auto acc = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == n, "lse must have shape (N,) = (", n, ",), got shape ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc, "lse must have dtype ", acc, " (the forward's second output), got ",
              lse.scalar_type());
  PYA_CHECK_SAME_DEVICE(lse, queries);
  TORCH_CHECK(!fold_positives || bank.size(0) == n,
              "fold_positives=True needs positives to be the bank (M == N), got N = ", n, " and M = ",
              bank.size(0));
}

}  // namespace pyanomaly

TORCH_LIBRARY_FRAGMENT(pyanomaly, m) {
  // loss (N,) in the inputs' dtype, lse (N,) in float32 (float64 for float64 inputs).
  // deterministic only selects how the backward reduces the bank gradient.
  m.def(
      "infonce(Tensor queries, Tensor positives, Tensor bank, Tensor neg_idx, float temperature=1.0, "
      "bool deterministic=True) -> (Tensor loss, Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  // fold_positives: positives is bank, so the positive term's gradient is added to grad_bank row i and
  // grad_positives comes back with shape (0, D).
  m.def(
      "infonce_backward(Tensor grad_loss, Tensor queries, Tensor positives, Tensor bank, Tensor neg_idx, "
      "Tensor lse, float temperature, bool fold_positives=False, bool deterministic=True) -> "
      "(Tensor grad_queries, Tensor grad_positives, Tensor grad_bank)",
      {at::Tag::pt2_compliant_tag});
}
