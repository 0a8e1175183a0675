// CUDA kernels of the Hopfield retrieval. One launch per update step; a block owns 64 queries (or,
// for the memory gradient, 64 stored patterns) and walks the other operand in tiles of 64 rows:
// logits tile = A B^T over D in chunks of 16 (shared-memory tiles, 4x4 register micro-tiles on a
// 16x16 thread grid), an online softmax in fp32, then acc (64 x D, fp32, in global memory: any D
// works) += P (64 x 64, shared) * tile rows, over D in chunks of 64. No (N, M) matrix is stored.
// The memory gradient is accumulated per (pattern tile, query split) into fp32 partial sums that
// a last kernel adds in split order: deterministic, no atomics.
// Plain SIMT fp32 (no tensor cores: the state is kept in fp32); tuning is left for later.
#include <cstdint>

#include "pyanomaly/cuda_utils.cuh"
#include "pyanomaly/hopfield_params.h"

namespace pyanomaly {
namespace {

using cuda::from_float;
using cuda::to_float;

constexpr int kThreads = 256;   // 16 x 16 thread grid
constexpr int kRows = 64;       // rows of a block (queries, or patterns for the memory gradient)
constexpr int kCols = 64;       // rows of a tile of the other operand
constexpr int kDepth = 16;      // D chunk of the logits product
constexpr int kChunk = 64;      // D chunk of the accumulation
constexpr int kLd = 64 + 4;     // padded leading dimension of the shared tiles (keeps float4 alignment)
constexpr int kTileFloats = kRows * kLd;           // one 64 x 68 tile
constexpr int kDepthFloats = kDepth * kLd;         // one 16 x 68 tile

// Shared memory: a scratch region (4 depth tiles during the logits product, the value chunk during
// the accumulation; they never overlap in time), then `tiles` 64 x 68 probability tiles, then 64-row
// statistics.
struct Shared {
  float* scratch;
  float* probs;    // (64, kLd) P or dS, row-major: [block row][tile row]
  float* probs2;   // second one (memory gradient) or null
  float* row_a;    // per block row: alpha (forward), the backward's lse (backward)
  float* row_b;    // per block row: sum_j P_j <g, X_j> (backward)
  int* row_active;
};

constexpr int kScratchFloats = (4 * kDepthFloats > kTileFloats) ? 4 * kDepthFloats : kTileFloats;

// Rows of a 64-row tile that exist when `remaining` rows are left.
__device__ __forceinline__ int tile_extent(int64_t remaining) { return remaining < 64 ? static_cast<int>(remaining) : 64; }

__device__ __forceinline__ float infinity() { return __int_as_float(0x7f800000); }

// beta * logit, rounded on its own (never fused into the subtraction that follows), so the statistics
// and the gradient kernels see the very same scaled logits.
__device__ __forceinline__ float scaled_logit(float logit, float beta) { return __fmul_rn(logit, beta); }

__host__ __device__ constexpr size_t shared_bytes(int prob_tiles) {
  return sizeof(float) * (kScratchFloats + prob_tiles * kTileFloats + 2 * kRows) + sizeof(int) * kRows;
}

__device__ Shared carve_shared(float* base, int prob_tiles) {
  Shared s;
  s.scratch = base;
  s.probs = base + kScratchFloats;
  s.probs2 = prob_tiles > 1 ? s.probs + kTileFloats : nullptr;
  s.row_a = s.probs + prob_tiles * kTileFloats;
  s.row_b = s.row_a + kRows;
  s.row_active = reinterpret_cast<int*>(s.row_b + kRows);
  return s;
}

// dst[k][r] = src[(row0 + r) * dim + d0 + k] for r < 64, k < 16; zero outside rows < nrows, d < dim.
template <typename T>
__device__ __forceinline__ void load_depth_tile(float* dst, const T* src, int64_t row0, int nrows, int64_t d0,
                                                int64_t dim) {
#pragma unroll
  for (int i = 0; i < (kRows * kDepth) / kThreads; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int r = e / kDepth, k = e % kDepth;
    float v = 0.f;
    if (r < nrows && d0 + k < dim) v = to_float(src[(row0 + r) * dim + d0 + k]);
    dst[k * kLd + r] = v;
  }
}

// c1 = A1[a rows] . B1[b rows]^T and, when kTwo, c2 = A2[a rows] . B2[b rows]^T (64 x 64 each, over D).
// Thread (ty, tx) holds rows ty*4 + i and columns tx*4 + j. Ends with a barrier.
template <bool kTwo, typename TA1, typename TB1, typename TA2, typename TB2>
__device__ void tile_products(const TA1* a1, const TB1* b1, const TA2* a2, const TB2* b2, int64_t a_row0, int a_rows,
                              int64_t b_row0, int b_rows, int64_t dim, float* scratch, float (&c1)[4][4],
                              float (&c2)[4][4]) {
  float* as1 = scratch;
  float* bs1 = as1 + kDepthFloats;
  float* as2 = bs1 + kDepthFloats;
  float* bs2 = as2 + kDepthFloats;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) c1[i][j] = c2[i][j] = 0.f;
  for (int64_t d0 = 0; d0 < dim; d0 += kDepth) {
    load_depth_tile(as1, a1, a_row0, a_rows, d0, dim);
    load_depth_tile(bs1, b1, b_row0, b_rows, d0, dim);
    if (kTwo) {
      load_depth_tile(as2, a2, a_row0, a_rows, d0, dim);
      load_depth_tile(bs2, b2, b_row0, b_rows, d0, dim);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(as1 + k * kLd + ty * 4);
      const float4 b = *reinterpret_cast<const float4*>(bs1 + k * kLd + tx * 4);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c1[i][j] = fmaf(av[i], bv[j], c1[i][j]);
      if (kTwo) {
        const float4 a2v = *reinterpret_cast<const float4*>(as2 + k * kLd + ty * 4);
        const float4 b2v = *reinterpret_cast<const float4*>(bs2 + k * kLd + tx * 4);
        const float av2[4] = {a2v.x, a2v.y, a2v.z, a2v.w}, bv2[4] = {b2v.x, b2v.y, b2v.z, b2v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) c2[i][j] = fmaf(av2[i], bv2[j], c2[i][j]);
      }
    }
    __syncthreads();
  }
}

// acc[r * dim + d] = (first ? 0 : acc * alpha[r]) + sum_k probs[r][k] * B[(b_row0 + k) * dim + d]
// for r < acc_rows, k < b_rows (alpha null: 1). `acc` points at the block's first row. Ends with a barrier.
template <typename TB>
__device__ void accumulate_rows(float* acc, int acc_rows, const float* probs, const TB* b, int64_t b_row0, int b_rows,
                                int64_t dim, const float* alpha, bool first, float* values) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
#pragma unroll 4
    for (int i = 0; i < (kCols * kChunk) / kThreads; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const int k = e / kChunk, c = e % kChunk;
      float v = 0.f;
      if (k < b_rows && d0 + c < dim) v = to_float(b[(b_row0 + k) * dim + d0 + c]);
      values[k * kLd + c] = v;
    }
    __syncthreads();
    float sum[4][4] = {};
#pragma unroll 8
    for (int k = 0; k < kCols; ++k) {
      const float4 v = *reinterpret_cast<const float4*>(values + k * kLd + tx * 4);
      const float vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = probs[(ty * 4 + i) * kLd + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) sum[i][j] = fmaf(p, vv[j], sum[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty * 4 + i;
      if (r >= acc_rows) continue;
      const float scale = alpha ? alpha[r] : 1.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t d = d0 + tx * 4 + j;
        if (d >= dim) continue;
        float* out = acc + static_cast<int64_t>(r) * dim + d;
        *out = first ? sum[i][j] : fmaf(*out, scale, sum[i][j]);
      }
    }
    __syncthreads();
  }
}

// Reductions over the 16 threads (tx) that share a block row: a half warp, lanes xor 1..8.
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset, 16));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, 16);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Forward: one update of every active query.
template <typename T>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(HopfieldForwardStepParams p) {
  extern __shared__ float4 shared_raw[];
  const Shared s = carve_shared(reinterpret_cast<float*>(shared_raw), 1);
  const T* memory = static_cast<const T*>(p.memory);
  const int64_t dim = p.dim;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = tile_extent(p.num_queries - q0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  int active = 0;
  if (threadIdx.x < kRows) {
    active = threadIdx.x < rows && !p.frozen[q0 + threadIdx.x];
    s.row_active[threadIdx.x] = active;
  }
  if (!__syncthreads_or(active)) {  // every query here has stopped: carry the states over
    for (int64_t e = threadIdx.x; e < rows * dim; e += kThreads)
      p.state_out[q0 * dim + e] = p.state_in[q0 * dim + e];
    return;
  }

  float running_max[4], running_sum[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) running_max[i] = -infinity(), running_sum[i] = 0.f;
  float* acc = p.state_out + q0 * dim;
  for (int64_t j0 = 0; j0 < p.num_patterns; j0 += kCols) {
    const int cols = tile_extent(p.num_patterns - j0);
    float logits[4][4], unused[4][4];
    tile_products<false>(p.state_in, memory, p.state_in, memory, q0, rows, j0, cols, dim, s.scratch, logits, unused);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float tile_max = -infinity();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        logits[i][j] = (tx * 4 + j < cols) ? logits[i][j] * p.beta : -infinity();
        tile_max = fmaxf(tile_max, logits[i][j]);
      }
      const float new_max = fmaxf(running_max[i], row_max(tile_max));  // finite: the tile has a column
      float tile_sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = expf(logits[i][j] - new_max);  // 0 for padded columns
        s.probs[(ty * 4 + i) * kLd + tx * 4 + j] = e;
        tile_sum += e;
      }
      const float rescale = expf(running_max[i] - new_max);  // 0 on the first tile
      running_sum[i] = running_sum[i] * rescale + row_sum(tile_sum);
      running_max[i] = new_max;
      if (tx == 0) s.row_a[ty * 4 + i] = rescale;
    }
    __syncthreads();
    accumulate_rows(acc, rows, s.probs, memory, j0, cols, dim, s.row_a, j0 == 0, s.scratch);
  }

  // Normalise, measure the move, freeze. The 16 threads of a row split its D columns; every lane
  // reaches the row reduction (full-warp shuffles).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    const bool valid = r < rows, updated_row = valid && s.row_active[r];
    const int64_t base = (q0 + r) * dim;
    float moved_sq = 0.f;
    if (updated_row) {
      const float inv_sum = 1.f / running_sum[i];
      for (int64_t d = tx; d < dim; d += 16) {
        const float old = p.state_in[base + d];
        const float updated = p.state_out[base + d] * inv_sum;
        const float diff = updated - old;
        moved_sq = fmaf(diff, diff, moved_sq);
        p.state_out[base + d] = updated;
        if (p.previous) p.previous[base + d] = old;
      }
    } else if (valid) {
      for (int64_t d = tx; d < dim; d += 16) p.state_out[base + d] = p.state_in[base + d];
    }
    moved_sq = row_sum(moved_sq);
    if (updated_row && tx == 0) {
      const int64_t n = q0 + r;
      if (p.lse) p.lse[n] = running_max[i] + logf(running_sum[i]);
      p.iterations[n] += 1;
      if (p.tol > 0.f && !(sqrtf(moved_sq) > p.tol)) p.frozen[n] = 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward helpers.

__device__ __forceinline__ bool row_takes_step(const HopfieldBackwardStepParams& p, int64_t n) {
  return !p.unrolled || p.step < p.iterations[n];
}

// The backward's own softmax statistics of one step, from the same tile products (bit for bit) as
// the two gradient kernels below: row_lse[n] = logsumexp_j(beta x_n X_j) and
// grad_dot[n] = sum_j P_nj <g_n, X_j> with P normalised from these logits. The plain loop's softmax
// backward, so a saturated row (P one-hot) gets exactly dS = 0 (the forward's saved lse and
// <g, y> would leave rounding noise there that earlier soft steps amplify by orders of magnitude).
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_stats_kernel(HopfieldBackwardStepParams p) {
  extern __shared__ float4 shared_raw[];
  const Shared s = carve_shared(reinterpret_cast<float*>(shared_raw), 0);
  const T* memory = static_cast<const T*>(p.memory);
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = tile_extent(p.num_queries - q0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  int active = 0;
  if (threadIdx.x < kRows) active = threadIdx.x < rows && row_takes_step(p, q0 + threadIdx.x);
  if (!__syncthreads_or(active)) return;  // uniform: nothing here takes this step

  float running_max[4], running_sum[4], running_dot[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) running_max[i] = -infinity(), running_sum[i] = 0.f, running_dot[i] = 0.f;
  for (int64_t j0 = 0; j0 < p.num_patterns; j0 += kCols) {
    const int cols = tile_extent(p.num_patterns - j0);
    float logits[4][4], dprob[4][4];
    tile_products<true>(p.state_in, memory, p.grad_in, memory, q0, rows, j0, cols, p.dim, s.scratch, logits, dprob);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float tile_max = -infinity();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        logits[i][j] = (tx * 4 + j < cols) ? scaled_logit(logits[i][j], p.beta) : -infinity();
        tile_max = fmaxf(tile_max, logits[i][j]);
      }
      const float new_max = fmaxf(running_max[i], row_max(tile_max));  // finite: the tile has a column
      float tile_sum = 0.f, tile_dot = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = expf(logits[i][j] - new_max);  // 0 for padded columns
        tile_sum += e;
        tile_dot = fmaf(e, dprob[i][j], tile_dot);
      }
      const float rescale = expf(running_max[i] - new_max);  // 0 on the first tile
      running_sum[i] = running_sum[i] * rescale + row_sum(tile_sum);
      running_dot[i] = running_dot[i] * rescale + row_sum(tile_dot);
      running_max[i] = new_max;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    if (tx == 0 && r < rows) {
      p.row_lse[q0 + r] = running_max[i] + logf(running_sum[i]);
      p.grad_dot[q0 + r] = running_dot[i] / running_sum[i];
    }
  }
}

// grad_out[n] = beta * sum_j dS_nj X_j for rows that took this step, grad_in[n] for the others, with
// P = exp(beta x X^T - row_lse) and dS = P * (g X^T - grad_dot) (statistics from backward_stats_kernel).
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_state_kernel(HopfieldBackwardStepParams p) {
  extern __shared__ float4 shared_raw[];
  const Shared s = carve_shared(reinterpret_cast<float*>(shared_raw), 1);
  const T* memory = static_cast<const T*>(p.memory);
  const int64_t dim = p.dim;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = tile_extent(p.num_queries - q0);
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  int active = 0;
  if (threadIdx.x < kRows) {
    active = threadIdx.x < rows && row_takes_step(p, q0 + threadIdx.x);
    s.row_active[threadIdx.x] = active;
    s.row_a[threadIdx.x] = active ? p.row_lse[q0 + threadIdx.x] : infinity();  // +inf lse: P = 0
    s.row_b[threadIdx.x] = active ? p.grad_dot[q0 + threadIdx.x] : 0.f;
  }
  if (!__syncthreads_or(active)) {  // the gradient passes straight through rows that did not update
    for (int64_t e = threadIdx.x; e < rows * dim; e += kThreads) p.grad_out[q0 * dim + e] = p.grad_in[q0 * dim + e];
    return;
  }
  float* acc = p.grad_out + q0 * dim;
  for (int64_t j0 = 0; j0 < p.num_patterns; j0 += kCols) {
    const int cols = tile_extent(p.num_patterns - j0);
    float logits[4][4], dprob[4][4];
    tile_products<true>(p.state_in, memory, p.grad_in, memory, q0, rows, j0, cols, dim, s.scratch, logits, dprob);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float prob = (tx * 4 + j < cols) ? expf(scaled_logit(logits[i][j], p.beta) - s.row_a[r]) : 0.f;
        s.probs[r * kLd + tx * 4 + j] = p.beta * prob * (dprob[i][j] - s.row_b[r]);
      }
    }
    __syncthreads();
    accumulate_rows(acc, rows, s.probs, memory, j0, cols, dim, nullptr, j0 == 0, s.scratch);
  }
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    if (r >= rows || s.row_active[r]) continue;
    const int64_t base = (q0 + r) * dim;
    for (int64_t d = tx; d < dim; d += 16) p.grad_out[base + d] = p.grad_in[base + d];
  }
}

// partial[split][m] += sum_n P_nm g_n + beta * dS_nm x_n over the split's query blocks, for the
// block's 64 patterns (rows) m. Query blocks are split evenly over gridDim.y.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_memory_kernel(HopfieldBackwardStepParams p) {
  extern __shared__ float4 shared_raw[];
  const Shared s = carve_shared(reinterpret_cast<float*>(shared_raw), 2);
  const T* memory = static_cast<const T*>(p.memory);
  const int64_t dim = p.dim;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int patterns = tile_extent(p.num_patterns - j0);
  const int64_t query_blocks = (p.num_queries + kCols - 1) / kCols;
  const int64_t qb_begin = query_blocks * blockIdx.y / p.splits;
  const int64_t qb_end = query_blocks * (blockIdx.y + 1) / p.splits;
  float* acc = p.grad_memory_partial + (static_cast<int64_t>(blockIdx.y) * p.num_patterns + j0) * dim;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
    const int64_t q0 = qb * kCols;
    const int queries = tile_extent(p.num_queries - q0);
    int active = 0;
    if (threadIdx.x < kCols) {
      active = threadIdx.x < queries && row_takes_step(p, q0 + threadIdx.x);
      s.row_active[threadIdx.x] = active;
      s.row_a[threadIdx.x] = active ? p.row_lse[q0 + threadIdx.x] : infinity();
      s.row_b[threadIdx.x] = active ? p.grad_dot[q0 + threadIdx.x] : 0.f;
    }
    if (!__syncthreads_or(active)) continue;  // uniform: the whole block skips
    // Transposed tiles: rows are patterns, columns are queries.
    float logits[4][4], dprob[4][4];
    tile_products<true>(memory, p.state_in, memory, p.grad_in, j0, patterns, q0, queries, dim, s.scratch, logits,
                        dprob);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int q = tx * 4 + j;
        const float prob = (m < patterns) ? expf(scaled_logit(logits[i][j], p.beta) - s.row_a[q]) : 0.f;
        s.probs[m * kLd + q] = prob;
        s.probs2[m * kLd + q] = p.beta * prob * (dprob[i][j] - s.row_b[q]);
      }
    }
    __syncthreads();
    accumulate_rows(acc, patterns, s.probs, p.grad_in, q0, queries, dim, nullptr, false, s.scratch);
    accumulate_rows(acc, patterns, s.probs2, p.state_in, q0, queries, dim, nullptr, false, s.scratch);
  }
}

template <typename T>
__global__ void reduce_partials_kernel(const float* partial, T* out, int64_t splits, int64_t elements) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int64_t split = 0; split < splits; ++split) sum += partial[split * elements + e];
    out[e] = from_float<T>(sum);
  }
}

template <typename T>
cudaError_t forward_step(const HopfieldForwardStepParams& p, cudaStream_t stream) {
  const size_t shared = shared_bytes(1);
  cudaError_t err =
      cudaFuncSetAttribute(forward_step_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (err != cudaSuccess) return err;
  forward_step_kernel<T><<<cuda::ceil_div(p.num_queries, kRows), kThreads, shared, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_step(const HopfieldBackwardStepParams& p, cudaStream_t stream) {
  const size_t stats_shared = shared_bytes(0);
  cudaError_t err = cudaFuncSetAttribute(backward_stats_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(stats_shared));
  if (err != cudaSuccess) return err;
  backward_stats_kernel<T><<<cuda::ceil_div(p.num_queries, kRows), kThreads, stats_shared, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.grad_memory_partial) {
    const size_t shared = shared_bytes(2);
    err = cudaFuncSetAttribute(grad_memory_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared));
    if (err != cudaSuccess) return err;
    const dim3 grid(cuda::ceil_div(p.num_patterns, kRows), static_cast<unsigned int>(p.splits));
    grad_memory_kernel<T><<<grid, kThreads, shared, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.grad_out) {
    const size_t shared = shared_bytes(1);
    err = cudaFuncSetAttribute(grad_state_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(shared));
    if (err != cudaSuccess) return err;
    grad_state_kernel<T><<<cuda::ceil_div(p.num_queries, kRows), kThreads, shared, stream>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

int64_t hopfield_grad_memory_splits(int64_t num_queries, int64_t num_patterns, int device_sm_count) {
  const int64_t tiles = (num_patterns + kRows - 1) / kRows;
  const int64_t query_blocks = (num_queries + kCols - 1) / kCols;
  const int64_t wanted = (2 * static_cast<int64_t>(device_sm_count) + tiles - 1) / tiles;  // ~2 blocks per SM
  int64_t splits = wanted < 32 ? wanted : 32;
  if (splits > query_blocks) splits = query_blocks;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_hopfield_forward_step(const HopfieldForwardStepParams& params, cudaStream_t stream) {
  if (params.num_queries == 0) return cudaSuccess;
  switch (params.memory_type) {
    case ElemType::kFloat: return forward_step<float>(params, stream);
    case ElemType::kHalf: return forward_step<__half>(params, stream);
    case ElemType::kBFloat16: return forward_step<__nv_bfloat16>(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_hopfield_backward_step(const HopfieldBackwardStepParams& params, cudaStream_t stream) {
  if (params.num_queries == 0) return cudaSuccess;
  switch (params.memory_type) {
    case ElemType::kFloat: return backward_step<float>(params, stream);
    case ElemType::kHalf: return backward_step<__half>(params, stream);
    case ElemType::kBFloat16: return backward_step<__nv_bfloat16>(params, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_hopfield_reduce_partials(const float* partial, void* grad_memory, ElemType memory_type,
                                            int64_t splits, int64_t elements, cudaStream_t stream) {
  if (elements == 0) return cudaSuccess;
  const unsigned int blocks = cuda::ceil_div(elements, kThreads) < 4096u ? cuda::ceil_div(elements, kThreads) : 4096u;
  switch (memory_type) {
    case ElemType::kFloat:
      reduce_partials_kernel<float><<<blocks, kThreads, 0, stream>>>(partial, static_cast<float*>(grad_memory), splits,
                                                              elements);
      break;
    case ElemType::kHalf:
      reduce_partials_kernel<__half><<<blocks, kThreads, 0, stream>>>(partial, static_cast<__half*>(grad_memory), splits,
                                                              elements);
      break;
    case ElemType::kBFloat16:
      reduce_partials_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(partial, static_cast<__nv_bfloat16*>(grad_memory),
                                                              splits, elements);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace pyanomaly
