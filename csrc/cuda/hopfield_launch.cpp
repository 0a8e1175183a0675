// CUDA glue of the Hopfield retrieval: checks, device guard, buffers, one kernel launch per step.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "pyanomaly/check.h"
#include "pyanomaly/hopfield_args.h"
#include "pyanomaly/cuda_glue.h"
#include "pyanomaly/hopfield_params.h"

namespace pyanomaly {
namespace {

using at::Tensor;

void check_retrieve_args(const Tensor& queries, const Tensor& memory, double beta, int64_t max_iter, double tol) {
  PYA_CHECK_DIM(queries, 2);
  PYA_CHECK_DIM(memory, 2);
  PYA_CHECK_CUDA(queries);
  PYA_CHECK_SAME_DEVICE(queries, memory);
  TORCH_CHECK(queries.scalar_type() == at::kHalf || queries.scalar_type() == at::kBFloat16 ||
                  queries.scalar_type() == at::kFloat,
              "queries must be float16, bfloat16 or float32 on CUDA, got ", queries.scalar_type());
  check_hopfield_retrieve_args(queries, memory, beta, max_iter, tol);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> hopfield_retrieve_cuda(const Tensor& queries_in, const Tensor& memory_in,
                                                                  double beta, int64_t max_iter, double tol,
                                                                  c10::string_view save) {
  check_retrieve_args(queries_in, memory_in, beta, max_iter, tol);
  TORCH_CHECK(save == "none" || save == "last" || save == "unrolled",
              "save must be 'none', 'last' or 'unrolled', got '", std::string(save), "'");
  const c10::cuda::CUDAGuard guard(queries_in.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the ATen ops below are the kernel, not a graph
  const Tensor queries = queries_in.contiguous();
  const Tensor memory = memory_in.contiguous();
  const int64_t num_queries = queries.size(0), dim = queries.size(1);
  const auto fp32 = queries.options().dtype(at::kFloat);
  const bool unrolled = save == "unrolled", last = save == "last";
  const int64_t saved_steps = unrolled ? max_iter : (last ? 1 : 0);

  Tensor iterations = at::zeros({num_queries}, queries.options().dtype(at::kInt));
  Tensor frozen = at::zeros({num_queries}, queries.options().dtype(at::kByte));
  Tensor states = at::empty({stored_states(save, max_iter), num_queries, dim}, fp32);
  Tensor lse = at::full({saved_steps, num_queries}, std::numeric_limits<float>::infinity(), fp32);
  // Unrolled: step t reads (t == 0 ? the fp32 queries : states[t - 1]) and writes states[t], the last
  // step a fresh final state; otherwise two buffers take turns. The kernel only reads state_in.
  const Tensor queries_fp32 = unrolled ? queries.to(at::kFloat) : Tensor();
  Tensor final_state = unrolled ? at::empty({num_queries, dim}, fp32) : Tensor();
  Tensor work = unrolled ? Tensor() : at::empty({2, num_queries, dim}, fp32);
  if (!unrolled) work[0].copy_(queries);

  HopfieldForwardStepParams params;
  params.memory = memory.data_ptr();
  params.memory_type = elem_type(memory.scalar_type(), "memory");
  params.iterations = iterations.data_ptr<int32_t>();
  params.frozen = frozen.data_ptr<uint8_t>();
  params.num_queries = num_queries;
  params.num_patterns = memory.size(0);
  params.dim = dim;
  params.beta = static_cast<float>(beta);
  params.tol = static_cast<float>(tol);
  params.previous = last ? states[0].data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int64_t step = 0; step < max_iter; ++step) {
    if (unrolled) {
      params.state_in = (step == 0 ? queries_fp32 : states[step - 1]).data_ptr<float>();
      params.state_out = (step + 1 == max_iter ? final_state : states[step]).data_ptr<float>();
    } else {
      params.state_in = work[step % 2].data_ptr<float>();
      params.state_out = work[(step + 1) % 2].data_ptr<float>();
    }
    params.lse = unrolled ? lse[step].data_ptr<float>() : (last ? lse[0].data_ptr<float>() : nullptr);
    check_launch(launch_hopfield_forward_step(params, stream), "pyanomaly::hopfield_retrieve");
  }
  // A fresh unrolled final state is the result itself for float32; a work buffer is copied out.
  Tensor retrieved = unrolled ? final_state.to(queries.scalar_type())
                              : work[max_iter % 2].to(queries.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  return {retrieved, iterations, states, lse};
}

std::tuple<Tensor, Tensor> hopfield_retrieve_backward_cuda(const Tensor& grad_retrieved, const Tensor& queries_in,
                                                           const Tensor& memory_in, const Tensor& states_in,
                                                           const Tensor& lse_in,
                                                           const Tensor& iterations_in, double beta, bool unrolled,
                                                           bool grad_queries, bool grad_memory) {
  PYA_CHECK_DIM(memory_in, 2);
  PYA_CHECK_DIM(states_in, 3);
  PYA_CHECK_DIM(lse_in, 2);
  PYA_CHECK_CUDA(memory_in);
  PYA_CHECK_SAME_DEVICE(grad_retrieved, memory_in);
  PYA_CHECK_SAME_DEVICE(queries_in, memory_in);
  PYA_CHECK_SAME_DEVICE(states_in, memory_in);
  PYA_CHECK_SAME_DEVICE(lse_in, memory_in);
  PYA_CHECK_SAME_DEVICE(iterations_in, memory_in);
  const int64_t saved_steps = lse_in.size(0), num_queries = queries_in.size(0), dim = memory_in.size(1);
  const int64_t num_patterns = memory_in.size(0);
  const ElemType memory_type = elem_type(memory_in.scalar_type(), "memory");
  TORCH_CHECK(num_patterns >= 1 && dim >= 1, "memory must not be empty, got shape ", memory_in.sizes());
  TORCH_CHECK(saved_steps >= 1 && (unrolled || saved_steps == 1),
              "lse must have shape (S, N) with S >= 1 saved steps (S = 1 when unrolled is false), got ",
              lse_in.sizes());
  check_hopfield_backward_states(queries_in, states_in, memory_in, saved_steps, unrolled);
  PYA_CHECK_SHAPE(lse_in, saved_steps, num_queries);
  PYA_CHECK_SHAPE(grad_retrieved, num_queries, dim);
  PYA_CHECK_SHAPE(iterations_in, num_queries);
  PYA_CHECK_DTYPE(iterations_in, at::kInt);
  PYA_CHECK_DTYPE(states_in, at::kFloat);
  PYA_CHECK_DTYPE(lse_in, at::kFloat);
  TORCH_CHECK(grad_retrieved.is_floating_point(), "grad_retrieved must be floating point, got ",
              grad_retrieved.scalar_type());
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "beta must be a finite number > 0, got ", beta);

  const c10::cuda::CUDAGuard guard(memory_in.device());
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor memory = memory_in.contiguous();
  const Tensor states = states_in.contiguous();
  const Tensor queries = unrolled ? queries_in.to(at::kFloat).contiguous() : Tensor();  // step 0's state
  const Tensor iterations = iterations_in.contiguous();
  const auto fp32 = memory.options().dtype(at::kFloat);

  Tensor grad_queries_out = at::zeros({num_queries, dim}, memory.options());
  Tensor grad_memory_out = at::zeros_like(memory, at::MemoryFormat::Contiguous);
  if (num_queries == 0 || (!grad_queries && !grad_memory)) return {grad_queries_out, grad_memory_out};

  int sm_count = 0;
  check_launch(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, memory.get_device()),
               "pyanomaly::hopfield_retrieve_backward");
  const int64_t splits = hopfield_grad_memory_splits(num_queries, num_patterns, sm_count);
  Tensor partial = grad_memory ? at::zeros({splits, num_patterns, dim}, fp32) : Tensor();
  Tensor grads = at::empty({2, num_queries, dim}, fp32);  // dL/d(state after), dL/d(state before): take turns
  grads[0].copy_(grad_retrieved);
  Tensor row_stats = at::empty({2, num_queries}, fp32);  // the backward's lse and sum_j P_j <g, X_j>

  HopfieldBackwardStepParams params;
  params.memory = memory.data_ptr();
  params.memory_type = memory_type;
  params.row_lse = row_stats[0].data_ptr<float>();
  params.grad_dot = row_stats[1].data_ptr<float>();
  params.grad_memory_partial = grad_memory ? partial.data_ptr<float>() : nullptr;
  params.iterations = iterations.data_ptr<int32_t>();
  params.unrolled = unrolled;
  params.num_queries = num_queries;
  params.num_patterns = num_patterns;
  params.dim = dim;
  params.splits = splits;
  params.beta = static_cast<float>(beta);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t current = 0;
  for (int64_t step = saved_steps - 1; step >= 0; --step) {
    const bool need_grad_state = grad_queries || step > 0;
    if (!need_grad_state && !grad_memory) break;
    params.step = step;
    params.state_in = step_start_state(queries, states, step, unrolled).data_ptr<float>();
    params.grad_in = grads[current].data_ptr<float>();
    params.grad_out = need_grad_state ? grads[1 - current].data_ptr<float>() : nullptr;
    check_launch(launch_hopfield_backward_step(params, stream), "pyanomaly::hopfield_retrieve_backward");
    if (need_grad_state) current = 1 - current;
  }
  if (grad_queries) grad_queries_out.copy_(grads[current]);
  if (grad_memory) {
    check_launch(launch_hopfield_reduce_partials(partial.data_ptr<float>(), grad_memory_out.data_ptr(), memory_type,
                                                 splits, num_patterns * dim, stream),
                 "pyanomaly::hopfield_retrieve_backward");
  }
  return {grad_queries_out, grad_memory_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyanomaly, CUDA, m) {
  m.impl("hopfield_retrieve", &hopfield_retrieve_cuda);
  m.impl("hopfield_retrieve_backward", &hopfield_retrieve_backward_cuda);
}

}  // namespace pyanomaly
