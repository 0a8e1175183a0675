// Schemas of the converging modern-Hopfield retrieval (kernels in cpu/ and cuda/).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyanomaly, m) {
  // save: "none" (inference), "last" (the state before each query's last update, for grad="last"), or
  // "unrolled" (the state before every step after the first, for the exact gradient).
  // Returns retrieved (N, D), iterations (N,) int32, states (0, 1 or max_iter - 1, N, D) and lse (S, N)
  // in the compute dtype (float64 for float64 input, else float32); S = 0, 1 or max_iter saved steps.
  m.def(
      "hopfield_retrieve(Tensor queries, Tensor memory, float beta, int max_iter, float tol, str save)"
      " -> (Tensor retrieved, Tensor iterations, Tensor states, Tensor lse)");
  // Gradients of the saved steps; unrolled=False backpropagates through the single saved step. queries
  // are the forward's (the start state of step 0 when unrolled).
  m.def(
      "hopfield_retrieve_backward(Tensor grad_retrieved, Tensor queries, Tensor memory, Tensor states, Tensor lse,"
      " Tensor iterations, float beta, bool unrolled, bool grad_queries, bool grad_memory)"
      " -> (Tensor grad_queries, Tensor grad_memory)");
}
