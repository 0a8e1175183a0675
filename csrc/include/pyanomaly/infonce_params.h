// Parameters of the fused InfoNCE CUDA kernels, filled by csrc/cuda/infonce_launch.cpp and read by
// csrc/cuda/infonce.cu (no torch here). Pointers are device pointers; (N, D) matrices have unit
// inner stride and the given row stride in elements. Accumulation type "acc" is float, or double
// when dtype is kDouble.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "pyanomaly/dtype.h"

namespace pyanomaly {

struct InfoNCEForwardParams {
  const void* queries;    // (N, D) of dtype
  const void* positives;  // (N, D) of dtype
  const void* bank;       // (M, D) of dtype
  const int64_t* neg_idx; // (N, K), every value already checked to lie in [0, M)
  void* loss;             // (N,) of dtype, contiguous
  void* lse;              // (N,) of acc, contiguous: logsumexp of the K + 1 logits, saved for backward
  int64_t num_queries;    // N
  int64_t num_negatives;  // K >= 1
  int64_t dim;            // D
  int64_t bank_size;      // M
  int64_t queries_row_stride;
  int64_t positives_row_stride;
  int64_t bank_row_stride;
  int64_t neg_idx_row_stride;
  int64_t neg_idx_col_stride;
  double inv_temperature;  // 1 / T
  ElemType dtype;          // kHalf, kBFloat16, kFloat or kDouble
};

struct InfoNCEBackwardParams {
  const void* queries;
  const void* positives;
  const void* bank;
  const int64_t* neg_idx;
  const void* grad_loss;   // (N,) of acc, contiguous
  const void* lse;         // (N,) of acc, contiguous (from the forward)
  void* grad_queries;      // (N, D) of dtype, contiguous
  void* grad_positives;    // (N, D) of dtype, contiguous; nullptr when fold_positives
  void* coef;              // (N, K + 1) of acc scratch: coef[i, j] = grad_i / T * (softmax_ij - [j == 0])
  void* grad_bank;         // (M, D) of dtype, contiguous: written by launch_infonce_backward_bank
  void* grad_bank_accum;   // (M, D) of acc, zero-filled: atomic path only (nullptr when deterministic)
  const int64_t* segment_offsets;  // (M + 1,): entries of bank row m are [offsets[m], offsets[m + 1])
  const int64_t* segment_entries;  // flat positions i * (K + 1) + j, sorted by bank row, stably
  int64_t num_queries;
  int64_t num_negatives;
  int64_t dim;
  int64_t bank_size;
  int64_t queries_row_stride;
  int64_t positives_row_stride;
  int64_t bank_row_stride;
  int64_t neg_idx_row_stride;
  int64_t neg_idx_col_stride;
  double inv_temperature;
  bool fold_positives;  // positives is bank (N == M): the positive term's gradient goes to bank row i
  ElemType dtype;
};

// Loss and logsumexp per query: one warp per query row.
cudaError_t launch_infonce_forward(const InfoNCEForwardParams& params, cudaStream_t stream);
// coef, grad_queries, grad_positives, and with grad_bank_accum the atomic scatter into it.
cudaError_t launch_infonce_backward_rows(const InfoNCEBackwardParams& params, cudaStream_t stream);
// Deterministic bank gradient: one warp per bank row sums its segment in a fixed order.
cudaError_t launch_infonce_backward_bank(const InfoNCEBackwardParams& params, cudaStream_t stream);

}  // namespace pyanomaly
