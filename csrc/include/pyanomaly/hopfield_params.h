// Parameters of the CUDA Hopfield-retrieval kernels, shared by the torch glue and the .cu file.
// Plain pointers and sizes only (no torch). States, gradients and statistics are fp32; the stored
// patterns keep their input dtype (ElemType).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "pyanomaly/dtype.h"

namespace pyanomaly {

// One update xi <- softmax(beta * xi X^T) X of every query that is still active.
struct HopfieldForwardStepParams {
  const void* memory = nullptr;  // (M, D) contiguous, ElemType
  ElemType memory_type = ElemType::kFloat;
  const float* state_in = nullptr;  // (N, D) state before the step
  float* state_out = nullptr;       // (N, D) state after the step (frozen rows copied); != state_in
  float* previous = nullptr;        // (N, D) or null: active rows get state_in (grad="last")
  float* lse = nullptr;             // (N,) or null: logsumexp of the step's logits (+inf for frozen rows)
  int32_t* iterations = nullptr;    // (N,) updates taken so far, incremented for active rows
  uint8_t* frozen = nullptr;        // (N,) 1 once a query has stopped
  int64_t num_queries = 0;          // N
  int64_t num_patterns = 0;         // M >= 1
  int64_t dim = 0;                  // D >= 1
  float beta = 1.f;
  float tol = 0.f;                  // stop when ||new - old|| <= tol; 0 never stops early
};

// The backward of one saved step: x = state_in, y = softmax(beta x X^T) X, g = dL/dy. The step's
// softmax is recomputed from x (its statistics first, by the step's first kernel).
struct HopfieldBackwardStepParams {
  const void* memory = nullptr;  // (M, D) contiguous, ElemType
  ElemType memory_type = ElemType::kFloat;
  const float* state_in = nullptr;   // (N, D)
  const float* grad_in = nullptr;    // (N, D) dL/dy
  float* grad_out = nullptr;         // (N, D) dL/d state_in (may be null: not needed); != grad_in
  float* row_lse = nullptr;          // (N,) scratch: logsumexp of the recomputed logits per row
  float* grad_dot = nullptr;         // (N,) scratch: sum_j P_j <g, X_j> per row
  float* grad_memory_partial = nullptr;  // (splits, M, D) accumulated (+=) or null: not needed
  int32_t* iterations = nullptr;     // (N,) updates each query took
  int64_t step = 0;                  // this step's index: row n is active when unrolled ? step < it[n] : true
  bool unrolled = true;
  int64_t num_queries = 0;
  int64_t num_patterns = 0;
  int64_t dim = 0;
  int64_t splits = 1;  // query splits of the grad_memory partial sums (see hopfield_grad_memory_splits)
  float beta = 1.f;
};

// How many query splits the memory-gradient kernel uses (partials buffer (splits, M, D) fp32).
int64_t hopfield_grad_memory_splits(int64_t num_queries, int64_t num_patterns, int device_sm_count);

cudaError_t launch_hopfield_forward_step(const HopfieldForwardStepParams& params, cudaStream_t stream);
cudaError_t launch_hopfield_backward_step(const HopfieldBackwardStepParams& params, cudaStream_t stream);
// grad_memory (M, D) of memory_type = sum over splits of partial (splits, M, D) fp32, in split order.
cudaError_t launch_hopfield_reduce_partials(const float* partial, void* grad_memory, ElemType memory_type,
                                            int64_t splits, int64_t elements, cudaStream_t stream);

}  // namespace pyanomaly
