// Argument checks shared by the CPU and CUDA glue of the Hopfield retrieval (torch glue only; never
// include from a .cu file). Each device checks its own device and dtype set before calling this.
#pragma once
#include <ATen/ATen.h>

#include <c10/util/string_view.h>

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

// States the forward saves beside the queries (save = "none", "last" or "unrolled"): unrolled, the
// start states of steps 1..max_iter-1 (step 0 starts from the queries); last, the start state of each
// query's final update. The final state is the result itself and is never saved.
inline int64_t stored_states(c10::string_view save, int64_t max_iter) {
  return save == "unrolled" ? max_iter - 1 : (save == "last" ? 1 : 0);
}

// The (N, D) start state of saved step `step` in the backward: unrolled, the queries for step 0 and
// states[step - 1] after it; otherwise the single saved step's states[0].
inline at::Tensor step_start_state(const at::Tensor& queries, const at::Tensor& states, int64_t step, bool unrolled) {
  if (!unrolled) return states[0];
  return step == 0 ? queries : states[step - 1];
}

// The backward's queries (N, D) and states (S - 1 or 1, N, D) for `saved_steps` = S saved steps.
inline void check_hopfield_backward_states(const at::Tensor& queries, const at::Tensor& states, const at::Tensor& memory,
                                           int64_t saved_steps, bool unrolled) {
  TORCH_CHECK(queries.dim() == 2 && queries.size(1) == memory.size(1), "queries must have shape (N, ", memory.size(1),
              "), got shape ", queries.sizes());
  TORCH_CHECK(queries.is_floating_point(), "queries must be floating point, got ", queries.scalar_type());
  const int64_t expected = unrolled ? saved_steps - 1 : 1;
  TORCH_CHECK(states.dim() == 3 && states.size(0) == expected && states.size(1) == queries.size(0) &&
                  states.size(2) == memory.size(1),
              "states must have shape (", expected, ", ", queries.size(0), ", ", memory.size(1), ") for ", saved_steps,
              unrolled ? " unrolled" : " last-update", " saved steps, got shape ", states.sizes());
}

}  // namespace pyanomaly
