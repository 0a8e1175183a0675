// CPU kernels of the fused InfoNCE op. Each query row computes its K + 1 dot products and a streamed
// logsumexp; nothing of size (N, K, D) is ever built. The bank gradient is a segment reduction over a
// counting sort of neg_idx, summed per bank row in a fixed order (deterministic for any thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "pyanomaly/check.h"
#include "pyanomaly/cpu_isa.h"
#include "pyanomaly/infonce_args.h"

namespace pyanomaly {

namespace {

// Rows handled per parallel task: about 64K multiply-adds each.
int64_t row_grain(int64_t k, int64_t d) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (k + 1) * d)); }

template <typename acc_t, typename scalar_t>
PYA_INLINE acc_t dot(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t d) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < d; ++t) sum += static_cast<acc_t>(a[t]) * static_cast<acc_t>(b[t]);
  return sum;
}

// Four dot products at once: four independent accumulators and four memory streams in flight.
template <typename acc_t, typename scalar_t>
PYA_INLINE void dot4(const scalar_t* __restrict q, const scalar_t* __restrict r0, const scalar_t* __restrict r1,
                 const scalar_t* __restrict r2, const scalar_t* __restrict r3, int64_t d, acc_t* out) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t t = 0; t < d; ++t) {
    const acc_t qt = static_cast<acc_t>(q[t]);
    s0 += qt * static_cast<acc_t>(r0[t]);
    s1 += qt * static_cast<acc_t>(r1[t]);
    s2 += qt * static_cast<acc_t>(r2[t]);
    s3 += qt * static_cast<acc_t>(r3[t]);
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// acc[t] += c * row[t]
template <typename acc_t, typename scalar_t>
PYA_INLINE void axpy(acc_t* __restrict acc, acc_t c, const scalar_t* __restrict row, int64_t d) {
#pragma omp simd
  for (int64_t t = 0; t < d; ++t) acc[t] += c * static_cast<acc_t>(row[t]);
}

// acc[t] += c[0] r0[t] + c[1] r1[t] + c[2] r2[t] + c[3] r3[t]: four memory streams, one pass over acc.
template <typename acc_t, typename scalar_t>
PYA_INLINE void axpy4(acc_t* __restrict acc, const acc_t* c, const scalar_t* __restrict r0, const scalar_t* __restrict r1,
                  const scalar_t* __restrict r2, const scalar_t* __restrict r3, int64_t d) {
  const acc_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
#pragma omp simd
  for (int64_t t = 0; t < d; ++t) {
    acc[t] += c0 * static_cast<acc_t>(r0[t]) + c1 * static_cast<acc_t>(r1[t]) + c2 * static_cast<acc_t>(r2[t]) +
              c3 * static_cast<acc_t>(r3[t]);
  }
}

template <typename scalar_t, typename acc_t>
PYA_INLINE void store(scalar_t* __restrict out, const acc_t* __restrict acc, int64_t d) {
#pragma omp simd
  for (int64_t t = 0; t < d; ++t) out[t] = static_cast<scalar_t>(acc[t]);
}

// Software prefetch of one row: random bank rows otherwise stall on memory latency (the hardware
// prefetcher only follows a row once it has started).
template <typename scalar_t>
PYA_INLINE void prefetch_row(const scalar_t* row, int64_t d) {
#if defined(__GNUC__) || defined(__clang__)
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = d * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset, 0, 3);
#else
  (void)row;
  (void)d;
#endif
}

// Negatives are visited in flat order (i, j); prefetch the one this many places ahead.
// Four was enough on an EPYC; sixteen (~4 dot4 groups ahead) hides the latency on a Xeon too:
// measured at the CPC-AD shape, forward 88 -> 66 ms (AVX-512 clone).
constexpr int64_t kPrefetchDistance = 16;

// Views of the inputs shared by the forward and backward kernels.
template <typename scalar_t>
struct Inputs {
  const scalar_t* queries;
  const scalar_t* positives;
  const scalar_t* bank;
  const int64_t* neg_idx;
  int64_t n, k, d, m;
  int64_t q_stride, p_stride, bank_stride, idx_row_stride, idx_col_stride;

  Inputs(const at::Tensor& q, const at::Tensor& p, const at::Tensor& b, const at::Tensor& idx)
      : queries(q.const_data_ptr<scalar_t>()),
        positives(p.const_data_ptr<scalar_t>()),
        bank(b.const_data_ptr<scalar_t>()),
        neg_idx(idx.const_data_ptr<int64_t>()),
        n(q.size(0)),
        k(idx.size(1)),
        d(q.size(1)),
        m(b.size(0)),
        q_stride(q.stride(0)),
        p_stride(p.stride(0)),
        bank_stride(b.stride(0)),
        idx_row_stride(idx.stride(0)),
        idx_col_stride(idx.stride(1)) {}

  const scalar_t* query(int64_t i) const { return queries + i * q_stride; }
  const scalar_t* positive(int64_t i) const { return positives + i * p_stride; }
  int64_t negative_row(int64_t i, int64_t j) const { return neg_idx[i * idx_row_stride + j * idx_col_stride]; }
  const scalar_t* negative(int64_t i, int64_t j) const { return bank + negative_row(i, j) * bank_stride; }
  // Prefetch the negative kPrefetchDistance places after (i, j), if it belongs to a row before end.
  PYA_INLINE void prefetch_ahead(int64_t i, int64_t j, int64_t end) const {
    const int64_t ahead = j + kPrefetchDistance;
    const int64_t row = i + ahead / k;
    if (row < end) prefetch_row(negative(row, ahead % k), d);
  }
  // dots[j] = <q_i, bank[neg_idx[i, j]]> for j < K (not yet divided by T); rows before end are prefetched.
  template <typename acc_t>
  PYA_INLINE void negative_dots(int64_t i, int64_t end, acc_t* dots) const {
    const scalar_t* q = query(i);
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
      for (int64_t u = 0; u < 4; ++u) prefetch_ahead(i, j + u, end);
      dot4(q, negative(i, j), negative(i, j + 1), negative(i, j + 2), negative(i, j + 3), d, dots + j);
    }
    for (; j < k; ++j) {
      prefetch_ahead(i, j, end);
      dots[j] = dot<acc_t>(q, negative(i, j), d);
    }
  }
};

// Rows [begin, end) of the forward. A logit that is not finite (a NaN or infinite input value it read,
// or an overflow) makes the row's loss NaN, even where the logsumexp would hide it (a -inf negative):
// the Python wrapper then only has to look at the (N,) losses to find bad inputs.
template <typename scalar_t>
PYA_CPU_CLONES void forward_rows(const Inputs<scalar_t>& in, at::opmath_type<scalar_t> inv_t, scalar_t* loss,
                                 at::opmath_type<scalar_t>* lse, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> dots(static_cast<size_t>(in.k));
  for (int64_t i = begin; i < end; ++i) {
    const acc_t s0 = dot<acc_t>(in.query(i), in.positive(i), in.d) * inv_t;
    in.negative_dots(i, end, dots.data());
    acc_t run_max = s0;
    acc_t run_sum = 1;  // sum of exp(s - run_max)
    bool finite = std::isfinite(s0);
    for (int64_t j = 0; j < in.k; ++j) {
      const acc_t s = dots[j] * inv_t;
      finite = finite && std::isfinite(s);
      if (s > run_max) {
        run_sum = run_sum * std::exp(run_max - s) + 1;
        run_max = s;
      } else {
        run_sum += std::exp(s - run_max);
      }
    }
    const acc_t row_lse = finite ? run_max + std::log(run_sum) : std::numeric_limits<acc_t>::quiet_NaN();
    lse[i] = row_lse;
    loss[i] = static_cast<scalar_t>(row_lse - s0);
  }
}

template <typename scalar_t>
void forward_kernel(const Inputs<scalar_t>& in, double temperature, scalar_t* loss, at::opmath_type<scalar_t>* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  at::parallel_for(0, in.n, row_grain(in.k, in.d),
                   [&](int64_t begin, int64_t end) { forward_rows<scalar_t>(in, inv_t, loss, lse, begin, end); });
}

// Per query row: coef[i, j] = g_i (softmax_ij - [j == 0]) with g_i = grad_i / T, then
// grad_q_i = sum_j coef_ij r_ij (r_i0 = p_i) and grad_p_i = coef_i0 q_i. Rows [begin, end).
template <typename scalar_t>
PYA_CPU_CLONES void backward_rows(const Inputs<scalar_t>& in, at::opmath_type<scalar_t> inv_t,
                                  const at::opmath_type<scalar_t>* grad, const at::opmath_type<scalar_t>* lse,
                                  at::opmath_type<scalar_t>* coef, scalar_t* grad_queries, scalar_t* grad_positives,
                                  int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k1 = in.k + 1;
  const int64_t d = in.d;
  std::vector<acc_t> acc(static_cast<size_t>(d));
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* q = in.query(i);
    const scalar_t* p = in.positive(i);
    const acc_t g = grad[i] * inv_t;
    acc_t* c = coef + i * k1;
    c[0] = g * (std::exp(dot<acc_t>(q, p, d) * inv_t - lse[i]) - 1);
    in.negative_dots(i, end, c + 1);
    for (int64_t j = 1; j < k1; ++j) c[j] = g * std::exp(c[j] * inv_t - lse[i]);
    std::fill(acc.begin(), acc.end(), acc_t(0));
    axpy(acc.data(), c[0], p, d);
    int64_t j = 0;
    for (; j + 4 <= in.k; j += 4) {
      axpy4(acc.data(), c + 1 + j, in.negative(i, j), in.negative(i, j + 1), in.negative(i, j + 2),
            in.negative(i, j + 3), d);
    }
    for (; j < in.k; ++j) axpy(acc.data(), c[j + 1], in.negative(i, j), d);
    store(grad_queries + i * d, acc.data(), d);
    if (grad_positives != nullptr) {
      scalar_t* out = grad_positives + i * d;
#pragma omp simd
      for (int64_t t = 0; t < d; ++t) out[t] = static_cast<scalar_t>(c[0] * static_cast<acc_t>(q[t]));
    }
  }
}

template <typename scalar_t>
void backward_rows_kernel(const Inputs<scalar_t>& in, double temperature, const at::opmath_type<scalar_t>* grad,
                          const at::opmath_type<scalar_t>* lse, at::opmath_type<scalar_t>* coef,
                          scalar_t* grad_queries, scalar_t* grad_positives) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  at::parallel_for(0, in.n, row_grain(in.k, in.d), [&](int64_t begin, int64_t end) {
    backward_rows<scalar_t>(in, inv_t, grad, lse, coef, grad_queries, grad_positives, begin, end);
  });
}

// Segments of the flat positions e = i * (K + 1) + j by bank row (a stable counting sort): column 0
// is the positive, bank row i when fold_positives and no bank row otherwise.
std::pair<std::vector<int64_t>, std::vector<int64_t>> bank_segments(const int64_t* neg_idx, int64_t idx_row_stride,
                                                                    int64_t idx_col_stride, int64_t n, int64_t k,
                                                                    int64_t m, bool fold_positives) {
  const int64_t k1 = k + 1;
  std::vector<int64_t> offsets(static_cast<size_t>(m) + 1, 0);
  auto bank_row = [&](int64_t i, int64_t j) { return neg_idx[i * idx_row_stride + j * idx_col_stride]; };
  for (int64_t i = 0; i < n; ++i) {
    if (fold_positives) ++offsets[i + 1];
    for (int64_t j = 0; j < k; ++j) ++offsets[bank_row(i, j) + 1];
  }
  for (int64_t r = 0; r < m; ++r) offsets[r + 1] += offsets[r];
  std::vector<int64_t> entries(static_cast<size_t>(offsets[m]));
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    if (fold_positives) entries[next[i]++] = i * k1;
    for (int64_t j = 0; j < k; ++j) entries[next[bank_row(i, j)]++] = i * k1 + j + 1;
  }
  return {std::move(offsets), std::move(entries)};
}

// grad_bank[r] = sum over the segment of r, in increasing flat position, of coef[e] q_{e / (K + 1)}, for
// bank rows [begin, end).
template <typename scalar_t>
PYA_CPU_CLONES void backward_bank_rows(const Inputs<scalar_t>& in, const at::opmath_type<scalar_t>* coef,
                                       const int64_t* offsets, const int64_t* entries, scalar_t* grad_bank,
                                       int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k1 = in.k + 1;
  const int64_t d = in.d;
  std::vector<acc_t> acc(static_cast<size_t>(d));
  const int64_t prefetch_end = offsets[end];
  for (int64_t r = begin; r < end; ++r) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    const int64_t seg_end = offsets[r + 1];
    int64_t e = offsets[r];
    for (; e + 4 <= seg_end; e += 4) {
      for (int64_t u = 0; u < 4; ++u) {
        if (e + u + kPrefetchDistance < prefetch_end) prefetch_row(in.query(entries[e + u + kPrefetchDistance] / k1), d);
      }
      const acc_t c[4] = {coef[entries[e]], coef[entries[e + 1]], coef[entries[e + 2]], coef[entries[e + 3]]};
      axpy4(acc.data(), c, in.query(entries[e] / k1), in.query(entries[e + 1] / k1), in.query(entries[e + 2] / k1),
            in.query(entries[e + 3] / k1), d);
    }
    for (; e < seg_end; ++e) {
      if (e + kPrefetchDistance < prefetch_end) prefetch_row(in.query(entries[e + kPrefetchDistance] / k1), d);
      axpy(acc.data(), coef[entries[e]], in.query(entries[e] / k1), d);
    }
    store(grad_bank + r * d, acc.data(), d);
  }
}

template <typename scalar_t>
void backward_bank_kernel(const Inputs<scalar_t>& in, const at::opmath_type<scalar_t>* coef,
                          const std::vector<int64_t>& offsets, const std::vector<int64_t>& entries,
                          scalar_t* grad_bank) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (in.k + 1) * in.d));
  at::parallel_for(0, in.m, grain, [&](int64_t begin, int64_t end) {
    backward_bank_rows<scalar_t>(in, coef, offsets.data(), entries.data(), grad_bank, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> infonce_cpu(const at::Tensor& queries, const at::Tensor& positives,
                                               const at::Tensor& bank, const at::Tensor& neg_idx, double temperature,
                                               bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  infonce_check_inputs(queries, positives, bank, neg_idx, temperature);
  PYA_CHECK_CPU(queries);
  const auto acc_type = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = queries.size(0);
  at::Tensor loss = at::empty({n}, queries.options());
  at::Tensor lse = at::empty({n}, queries.options().dtype(acc_type));
  if (n == 0) return {loss, lse};
  const at::Tensor q = unit_inner_stride(queries);
  const at::Tensor p = unit_inner_stride(positives);
  const at::Tensor b = unit_inner_stride(bank);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "infonce_cpu", [&] {
    forward_kernel<scalar_t>(Inputs<scalar_t>(q, p, b, neg_idx), temperature, loss.data_ptr<scalar_t>(),
                             lse.data_ptr<at::opmath_type<scalar_t>>());
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& queries, const at::Tensor& positives, const at::Tensor& bank,
    const at::Tensor& neg_idx, const at::Tensor& lse, double temperature, bool fold_positives, bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  infonce_check_backward_inputs(grad_loss, queries, positives, bank, neg_idx, lse, temperature, fold_positives);
  PYA_CHECK_CPU(queries);
  const int64_t n = queries.size(0);
  const int64_t k = neg_idx.size(1);
  const int64_t d = queries.size(1);
  const int64_t m = bank.size(0);
  const auto acc_type = lse.scalar_type();
  at::Tensor grad_queries = at::empty({n, d}, queries.options());
  at::Tensor grad_positives = at::empty({fold_positives ? 0 : n, d}, queries.options());
  at::Tensor grad_bank = at::empty({m, d}, queries.options());
  if (n == 0) {
    grad_bank.zero_();
    return {grad_queries, grad_positives, grad_bank};
  }
  const at::Tensor q = unit_inner_stride(queries);
  const at::Tensor p = unit_inner_stride(positives);
  const at::Tensor b = unit_inner_stride(bank);
  const at::Tensor grad = grad_loss.to(acc_type).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor coef = at::empty({n, k + 1}, queries.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queries.scalar_type(), "infonce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t> in(q, p, b, neg_idx);
    backward_rows_kernel<scalar_t>(in, temperature, grad.const_data_ptr<acc_t>(), lse_c.const_data_ptr<acc_t>(),
                                   coef.data_ptr<acc_t>(), grad_queries.data_ptr<scalar_t>(),
                                   fold_positives ? nullptr : grad_positives.data_ptr<scalar_t>());
    const auto [offsets, entries] =
        bank_segments(in.neg_idx, in.idx_row_stride, in.idx_col_stride, n, k, m, fold_positives);
    backward_bank_kernel<scalar_t>(in, coef.const_data_ptr<acc_t>(), offsets, entries,
                                   grad_bank.data_ptr<scalar_t>());
  });
  return {grad_queries, grad_positives, grad_bank};
}

}  // namespace
}  // namespace pyanomaly

TORCH_LIBRARY_IMPL(pyanomaly, CPU, m) {
  m.impl("infonce", &pyanomaly::infonce_cpu);
  m.impl("infonce_backward", &pyanomaly::infonce_backward_cpu);
}
