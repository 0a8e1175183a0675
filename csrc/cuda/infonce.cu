// CUDA kernels of the fused InfoNCE op: one warp per query row (forward, and the backward's per-row
// part), one warp per bank row for the deterministic bank gradient. Half and bfloat16 are loaded and
// accumulated in float32; float64 accumulates in float64. No (N, K, D) tensor is ever built.
#include <cuda_runtime.h>

#include <cstdint>

#include "pyanomaly/cuda_utils.cuh"
#include "pyanomaly/infonce_params.h"

namespace pyanomaly {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpSize * kWarpsPerBlock;
constexpr int kGroup = 4;  // negatives whose dot products a warp computes together (memory-level parallelism)
constexpr int kTile = 8;   // elements of D per lane held in registers by the accumulating loops

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v, float) { return v; }
__device__ __forceinline__ float to_acc(__half v, float) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v, double) { return v; }

template <typename Acc, typename T>
__device__ __forceinline__ Acc load(const T* p) {
  return to_acc(*p, Acc{});
}

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  return from_float<T>(v);
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) {
  return v;
}

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// <a, b> over D, every lane of the warp gets the total.
template <typename Acc, typename T>
__device__ __forceinline__ Acc warp_dot(const T* a, const T* b, int64_t dim, int lane) {
  Acc part = 0;
  for (int64_t t = lane; t < dim; t += kWarpSize) part += load<Acc>(a + t) * load<Acc>(b + t);
  return warp_sum(part);
}

// Dot products of q with the negatives j0 .. j0 + kGroup - 1 (the tail repeats the last valid one).
template <typename Acc, typename T, typename Params>
__device__ __forceinline__ void warp_dot_group(const Params& p, const T* q, const T* bank, const int64_t* idx,
                                               int64_t j0, int lane, Acc out[kGroup]) {
  const T* rows[kGroup];
#pragma unroll
  for (int u = 0; u < kGroup; ++u) {
    const int64_t j = j0 + u < p.num_negatives ? j0 + u : p.num_negatives - 1;
    rows[u] = bank + idx[j * p.neg_idx_col_stride] * p.bank_row_stride;
  }
  Acc part[kGroup];
#pragma unroll
  for (int u = 0; u < kGroup; ++u) part[u] = 0;
  for (int64_t t = lane; t < p.dim; t += kWarpSize) {
    const Acc qv = load<Acc>(q + t);
#pragma unroll
    for (int u = 0; u < kGroup; ++u) part[u] += qv * load<Acc>(rows[u] + t);
  }
#pragma unroll
  for (int u = 0; u < kGroup; ++u) out[u] = warp_sum(part[u]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_forward_kernel(const InfoNCEForwardParams p) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (i >= p.num_queries) return;  // whole warps leave together
  const T* q = static_cast<const T*>(p.queries) + i * p.queries_row_stride;
  const T* pos = static_cast<const T*>(p.positives) + i * p.positives_row_stride;
  const T* bank = static_cast<const T*>(p.bank);
  const int64_t* idx = p.neg_idx + i * p.neg_idx_row_stride;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);

  const Acc s0 = warp_dot<Acc>(q, pos, p.dim, lane) * inv_t;
  Acc run_max = s0;
  Acc run_sum = 1;  // sum of exp(s - run_max)
  for (int64_t j0 = 0; j0 < p.num_negatives; j0 += kGroup) {
    Acc s[kGroup];
    warp_dot_group<Acc>(p, q, bank, idx, j0, lane, s);
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      if (j0 + u >= p.num_negatives) break;
      const Acc logit = s[u] * inv_t;
      if (logit > run_max) {
        run_sum = run_sum * acc_exp(run_max - logit) + 1;
        run_max = logit;
      } else {
        run_sum += acc_exp(logit - run_max);
      }
    }
  }
  if (lane == 0) {
    const Acc lse = run_max + acc_log(run_sum);
    static_cast<Acc*>(p.lse)[i] = lse;
    static_cast<T*>(p.loss)[i] = from_acc<T>(lse - s0);
  }
}

template <typename T, bool kAtomic>
__global__ void __launch_bounds__(kThreads) infonce_backward_rows_kernel(const InfoNCEBackwardParams p) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (i >= p.num_queries) return;
  const T* q = static_cast<const T*>(p.queries) + i * p.queries_row_stride;
  const T* pos = static_cast<const T*>(p.positives) + i * p.positives_row_stride;
  const T* bank = static_cast<const T*>(p.bank);
  const int64_t* idx = p.neg_idx + i * p.neg_idx_row_stride;
  const Acc inv_t = static_cast<Acc>(p.inv_temperature);
  const Acc g = static_cast<const Acc*>(p.grad_loss)[i] * inv_t;
  const Acc lse = static_cast<const Acc*>(p.lse)[i];
  const int64_t k1 = p.num_negatives + 1;
  Acc* coef = static_cast<Acc*>(p.coef) + i * k1;

  // Pass 1: the K + 1 coefficients g (softmax_ij - [j == 0]), recomputed from the saved logsumexp.
  const Acc c0 = g * (acc_exp(warp_dot<Acc>(q, pos, p.dim, lane) * inv_t - lse) - 1);
  if (lane == 0) coef[0] = c0;
  for (int64_t j0 = 0; j0 < p.num_negatives; j0 += kGroup) {
    Acc s[kGroup];
    warp_dot_group<Acc>(p, q, bank, idx, j0, lane, s);
#pragma unroll
    for (int u = 0; u < kGroup; ++u) {
      if (j0 + u < p.num_negatives && lane == 0) coef[1 + j0 + u] = g * acc_exp(s[u] * inv_t - lse);
    }
  }
  __syncwarp();  // lane 0's coefficients are visible to the whole warp

  // Pass 2: grad_q = c0 p + sum_j c_j bank[idx_j], grad_p = c0 q, in tiles of kTile * 32 elements.
  T* grad_q = static_cast<T*>(p.grad_queries) + i * p.dim;
  T* grad_p = p.grad_positives != nullptr ? static_cast<T*>(p.grad_positives) + i * p.dim : nullptr;
  Acc* bank_accum = static_cast<Acc*>(p.grad_bank_accum);
  for (int64_t base = 0; base < p.dim; base += kTile * kWarpSize) {
    Acc acc[kTile];
    Acc qv[kTile];
#pragma unroll
    for (int v = 0; v < kTile; ++v) {
      const int64_t t = base + v * kWarpSize + lane;
      acc[v] = t < p.dim ? c0 * load<Acc>(pos + t) : Acc(0);
      qv[v] = t < p.dim ? load<Acc>(q + t) : Acc(0);
    }
    for (int64_t j = 0; j < p.num_negatives; ++j) {
      const Acc c = coef[1 + j];
      const int64_t row = idx[j * p.neg_idx_col_stride];
      const T* r = bank + row * p.bank_row_stride;
#pragma unroll
      for (int v = 0; v < kTile; ++v) {
        const int64_t t = base + v * kWarpSize + lane;
        if (t < p.dim) {
          acc[v] += c * load<Acc>(r + t);
          if (kAtomic) atomicAdd(bank_accum + row * p.dim + t, c * qv[v]);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < kTile; ++v) {
      const int64_t t = base + v * kWarpSize + lane;
      if (t < p.dim) {
        grad_q[t] = from_acc<T>(acc[v]);
        if (grad_p != nullptr) grad_p[t] = from_acc<T>(c0 * qv[v]);
        if (kAtomic && p.fold_positives) atomicAdd(bank_accum + i * p.dim + t, c0 * qv[v]);
      }
    }
  }
}

// grad_bank[m] = sum over the segment of m, in its sorted order, of coef[e] q_{e / (K + 1)}.
template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_backward_bank_kernel(const InfoNCEBackwardParams p) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (m >= p.bank_size) return;
  const T* queries = static_cast<const T*>(p.queries);
  const Acc* coef = static_cast<const Acc*>(p.coef);
  const int64_t k1 = p.num_negatives + 1;
  const int64_t begin = p.segment_offsets[m];
  const int64_t end = p.segment_offsets[m + 1];
  T* out = static_cast<T*>(p.grad_bank) + m * p.dim;
  for (int64_t base = 0; base < p.dim; base += kTile * kWarpSize) {
    Acc acc[kTile];
#pragma unroll
    for (int v = 0; v < kTile; ++v) acc[v] = 0;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t flat = p.segment_entries[e];
      const Acc c = coef[flat];
      const T* q = queries + (flat / k1) * p.queries_row_stride;
#pragma unroll
      for (int v = 0; v < kTile; ++v) {
        const int64_t t = base + v * kWarpSize + lane;
        if (t < p.dim) acc[v] += c * load<Acc>(q + t);
      }
    }
#pragma unroll
    for (int v = 0; v < kTile; ++v) {
      const int64_t t = base + v * kWarpSize + lane;
      if (t < p.dim) out[t] = from_acc<T>(acc[v]);
    }
  }
}

unsigned int blocks_for(int64_t rows) { return ceil_div(rows, kWarpsPerBlock); }

}  // namespace
}  // namespace cuda

cudaError_t launch_infonce_forward(const InfoNCEForwardParams& params, cudaStream_t stream) {
  if (params.num_queries == 0) return cudaSuccess;
  return cuda::dispatch_elem_type</*kAllowUInt8=*/false>(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::infonce_forward_kernel<T><<<cuda::blocks_for(params.num_queries), cuda::kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_infonce_backward_rows(const InfoNCEBackwardParams& params, cudaStream_t stream) {
  if (params.num_queries == 0) return cudaSuccess;
  return cuda::dispatch_elem_type</*kAllowUInt8=*/false>(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned int blocks = cuda::blocks_for(params.num_queries);
    if (params.grad_bank_accum != nullptr) {
      cuda::infonce_backward_rows_kernel<T, true><<<blocks, cuda::kThreads, 0, stream>>>(params);
    } else {
      cuda::infonce_backward_rows_kernel<T, false><<<blocks, cuda::kThreads, 0, stream>>>(params);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_infonce_backward_bank(const InfoNCEBackwardParams& params, cudaStream_t stream) {
  if (params.bank_size == 0) return cudaSuccess;
  return cuda::dispatch_elem_type</*kAllowUInt8=*/false>(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::infonce_backward_bank_kernel<T><<<cuda::blocks_for(params.bank_size), cuda::kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace pyanomaly
