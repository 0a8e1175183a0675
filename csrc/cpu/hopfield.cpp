// CPU kernels of the Hopfield retrieval: blocks of queries run in parallel, each with the plain loop's
// arithmetic (BLAS matmuls and softmax on a (block, M) scratch per thread, allocated once per thread),
// so no (N, M) matrix is ever held. The backward recomputes each step's softmax from the saved state
// the same way (its logits and dP = g X^T in one GEMM) and applies the plain softmax backward: a
// saturated step then gives the plain loop's exact zero state gradient, not rounding noise that the
// soft steps before it would amplify (issue 12). Half and bfloat16 inputs run in float32 throughout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "pyanomaly/check.h"
#include "pyanomaly/hopfield_args.h"

namespace pyanomaly {
namespace {

using at::Tensor;

constexpr int64_t kGradPartials = 8;   // most grad_memory partial sums (one per thread)
constexpr int64_t kBlockScratch = int64_t{1} << 18;  // elements of one (block, M) scratch matrix

// Queries per block: the (block, M) logits, probabilities and their gradient stay near kBlockScratch
// elements each (per thread; never (N, M)). Depends on M only, so results are deterministic.
int64_t block_rows_for(int64_t num_patterns) {
  return std::clamp<int64_t>(kBlockScratch / num_patterns, 32, 256);
}

enum class SaveMode { kNone, kLast, kUnrolled };

SaveMode parse_save(c10::string_view save) {
  if (save == "none") return SaveMode::kNone;
  if (save == "last") return SaveMode::kLast;
  if (save == "unrolled") return SaveMode::kUnrolled;
  TORCH_CHECK(false, "save must be 'none', 'last' or 'unrolled', got '", std::string(save), "'");
}

at::ScalarType compute_type(at::ScalarType type) { return type == at::kDouble ? at::kDouble : at::kFloat; }

void check_floating(const Tensor& tensor, const char* name) {
  const auto type = tensor.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, name,
              " must be float16, bfloat16, float32 or float64 on CPU, got ", type);
}

void check_retrieve_args(const Tensor& queries, const Tensor& memory, double beta, int64_t max_iter, double tol) {
  PYA_CHECK_DIM(queries, 2);
  PYA_CHECK_DIM(memory, 2);
  PYA_CHECK_CPU(queries);
  PYA_CHECK_CPU(memory);
  check_floating(queries, "queries");
  check_hopfield_retrieve_args(queries, memory, beta, max_iter, tol);
}

Tensor rows_where(const std::vector<int64_t>& rows) {
  return at::tensor(rows, at::TensorOptions().dtype(at::kLong));
}

// Half and bfloat16 inputs: only the results are rounded to the input dtype (as on CUDA).
std::tuple<Tensor, Tensor, Tensor, Tensor> hopfield_retrieve_cpu(const Tensor& queries_in, const Tensor& memory_in,
                                                                 double beta, int64_t max_iter, double tol,
                                                                 c10::string_view save_name) {
  check_retrieve_args(queries_in, memory_in, beta, max_iter, tol);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the ATen ops below are the kernel, not a graph
  const SaveMode save = parse_save(save_name);
  const auto compute = compute_type(queries_in.scalar_type());
  const Tensor queries = queries_in.contiguous();
  const Tensor memory = memory_in.to(compute).contiguous();
  const int64_t num_queries = queries.size(0), dim = queries.size(1);
  const int64_t saved_steps = save == SaveMode::kUnrolled ? max_iter : (save == SaveMode::kLast ? 1 : 0);

  Tensor retrieved = at::empty_like(queries);
  Tensor iterations = at::zeros({num_queries}, queries.options().dtype(at::kInt));
  // The start state of each saved step the backward cannot get elsewhere: unrolled, steps 1..S-1
  // (step 0 starts from the queries, which autograd keeps anyway); last, each query's final update.
  Tensor states = at::empty({stored_states(save_name, max_iter), num_queries, dim}, memory.options());
  Tensor lse = at::empty({saved_steps, num_queries}, memory.options());
  if (save == SaveMode::kUnrolled) lse.fill_(std::numeric_limits<double>::infinity());
  int32_t* iterations_ptr = iterations.data_ptr<int32_t>();

  const int64_t block_rows = block_rows_for(memory.size(0));
  const int64_t num_blocks = (num_queries + block_rows - 1) / block_rows;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    at::AutoDispatchBelowADInplaceOrView worker_no_autograd;  // dispatch guards are thread-local
    // This thread's scratch, reused by all its blocks (the ops below write into it: no allocation
    // per step): the scaled state, the (rows, M) logits and probabilities, the next state.
    const auto options = memory.options();
    Tensor scaled = at::empty({block_rows, dim}, options), next = at::empty({block_rows, dim}, options);
    Tensor logits = at::empty({block_rows, memory.size(0)}, options), prob = at::empty_like(logits);
    Tensor state = at::empty({block_rows, dim}, options);
    const Tensor beta_tensor = at::scalar_tensor(beta, options);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t n0 = block * block_rows, rows = std::min(block_rows, num_queries - n0);
      Tensor state_rows = state.narrow(0, 0, rows);
      state_rows.copy_(queries.narrow(0, n0, rows));
      Tensor previous = save == SaveMode::kLast ? states[0].narrow(0, n0, rows) : Tensor();
      std::vector<bool> active(rows, true);
      for (int64_t step = 0; step < max_iter; ++step) {
        std::vector<int64_t> active_rows;
        for (int64_t r = 0; r < rows; ++r)
          if (active[r]) active_rows.push_back(r);
        if (active_rows.empty()) {
          if (save == SaveMode::kUnrolled)  // the start states of the steps left (never read: defined anyway)
            for (int64_t s = step; s + 1 < max_iter; ++s) states[s].narrow(0, n0, rows).copy_(state_rows);
          break;
        }
        const int64_t num_active = static_cast<int64_t>(active_rows.size());
        const bool all = num_active == rows;
        const Tensor index = all ? Tensor() : rows_where(active_rows);
        const Tensor x = all ? state_rows : state_rows.index_select(0, index);
        // One update, the plain loop's arithmetic on the (rows, M) scratch: softmax(beta x X^T) X.
        Tensor step_scaled = scaled.narrow(0, 0, num_active), step_logits = logits.narrow(0, 0, num_active);
        Tensor step_prob = prob.narrow(0, 0, num_active), updated = next.narrow(0, 0, num_active);
        at::mul_out(step_scaled, x, beta_tensor);
        at::mm_out(step_logits, step_scaled, memory.t());
        at::_softmax_out(step_prob, step_logits, 1, false);
        at::mm_out(updated, step_prob, memory);
        if (save != SaveMode::kNone) {
          // logsumexp from the softmax's own maximum: max_j s_j - log(max_j p_j) (no second exp pass).
          const Tensor step_lse = step_logits.amax({1}).sub_(step_prob.amax({1}).log_());
          Tensor lse_rows = lse[save == SaveMode::kLast ? 0 : step].narrow(0, n0, rows);
          all ? lse_rows.copy_(step_lse) : lse_rows.index_copy_(0, index, step_lse);
        }
        if (save == SaveMode::kLast) all ? previous.copy_(x) : previous.index_copy_(0, index, x);
        std::vector<bool> stopped(active_rows.size(), false);
        if (tol > 0) {  // tol = 0: exactly max_iter updates, nothing to measure
          const Tensor moved = (updated - x).norm(2, {1}).to(at::kDouble).contiguous();
          const double* moved_ptr = moved.data_ptr<double>();
          for (int64_t i = 0; i < num_active; ++i) stopped[i] = !(moved_ptr[i] > tol);
        }
        if (all) {
          std::swap(state, next);  // the new state is in `next`: no copy
          state_rows = state.narrow(0, 0, rows);
        } else {
          state_rows.index_copy_(0, index, updated);
        }
        for (int64_t i = 0; i < num_active; ++i) {
          iterations_ptr[n0 + active_rows[i]] += 1;
          if (stopped[i]) active[active_rows[i]] = false;
        }
        if (save == SaveMode::kUnrolled && step + 1 < max_iter) states[step].narrow(0, n0, rows).copy_(state_rows);
      }
      retrieved.narrow(0, n0, rows).copy_(state_rows);
    }
  });
  return {retrieved, iterations, states, lse};
}

std::tuple<Tensor, Tensor> hopfield_retrieve_backward_cpu(const Tensor& grad_retrieved, const Tensor& queries_in,
                                                          const Tensor& memory_in, const Tensor& states_in,
                                                          const Tensor& lse_in,
                                                          const Tensor& iterations_in, double beta, bool unrolled,
                                                          bool grad_queries, bool grad_memory) {
  PYA_CHECK_DIM(memory_in, 2);
  PYA_CHECK_DIM(states_in, 3);
  PYA_CHECK_DIM(lse_in, 2);
  PYA_CHECK_CPU(memory_in);
  PYA_CHECK_CPU(queries_in);
  PYA_CHECK_CPU(grad_retrieved);
  PYA_CHECK_CPU(states_in);
  PYA_CHECK_CPU(lse_in);
  PYA_CHECK_CPU(iterations_in);
  const int64_t saved_steps = lse_in.size(0), num_queries = queries_in.size(0), dim = memory_in.size(1);
  check_floating(memory_in, "memory");
  const auto compute = compute_type(memory_in.scalar_type());
  TORCH_CHECK(memory_in.size(0) >= 1 && dim >= 1, "memory must not be empty, got shape ", memory_in.sizes());
  TORCH_CHECK(saved_steps >= 1 && (unrolled || saved_steps == 1),
              "lse must have shape (S, N) with S >= 1 saved steps (S = 1 when unrolled is false), got ",
              lse_in.sizes());
  check_hopfield_backward_states(queries_in, states_in, memory_in, saved_steps, unrolled);
  PYA_CHECK_SHAPE(lse_in, saved_steps, num_queries);
  PYA_CHECK_SHAPE(grad_retrieved, num_queries, dim);
  PYA_CHECK_SHAPE(iterations_in, num_queries);
  PYA_CHECK_DTYPE(iterations_in, at::kInt);
  PYA_CHECK_DTYPE(states_in, compute);
  PYA_CHECK_DTYPE(lse_in, compute);
  TORCH_CHECK(grad_retrieved.is_floating_point(), "grad_retrieved must be floating point, got ", grad_retrieved.scalar_type());
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "beta must be a finite number > 0, got ", beta);

  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor memory = memory_in.to(compute).contiguous();
  const Tensor queries = queries_in.to(compute).contiguous();
  const Tensor states = states_in.contiguous();
  const Tensor iterations = iterations_in.contiguous();
  const Tensor grad = grad_retrieved.to(compute).contiguous();
  const int32_t* iterations_ptr = iterations.data_ptr<int32_t>();
  const int64_t num_patterns = memory.size(0);
  const auto out_options = memory_in.options();

  Tensor grad_queries_out = at::zeros({num_queries, dim}, out_options);
  const int64_t block_rows = block_rows_for(num_patterns);
  const int64_t num_blocks = (num_queries + block_rows - 1) / block_rows;
  // One (M, D) partial sum per thread, not per block: memory stays (threads x M x D). Partial p owns a
  // fixed range of query blocks, so for a given thread count the result does not depend on scheduling.
  const int64_t partials =
      std::max<int64_t>(1, std::min({kGradPartials, num_blocks, static_cast<int64_t>(at::get_num_threads())}));
  Tensor grad_memory_partial = at::zeros({grad_memory ? partials : 0, num_patterns, dim}, memory.options());
  if (num_queries == 0 || (!grad_queries && !grad_memory)) {
    return {grad_queries_out, at::zeros_like(memory_in)};
  }

  at::parallel_for(0, partials, 1, [&](int64_t part_begin, int64_t part_end) {
    at::AutoDispatchBelowADInplaceOrView worker_no_autograd;  // dispatch guards are thread-local
    // This thread's scratch, reused by all its blocks: [beta x; g] (2 rows, D), their products with
    // X^T (2 rows, M), [dS; P] (2 rows, M), the state gradient (rows, D).
    const auto options = memory.options();
    Tensor stacked = at::empty({2 * block_rows, dim}, options), grad_x = at::empty({block_rows, dim}, options);
    Tensor products = at::empty({2 * block_rows, num_patterns}, options);
    Tensor dscore_prob = at::empty({2 * block_rows, num_patterns}, options);
    Tensor g = at::empty({block_rows, dim}, options);
    const Tensor beta_tensor = at::scalar_tensor(beta, options);
    for (int64_t part = part_begin; part < part_end; ++part) {
      Tensor grad_memory_acc = grad_memory ? grad_memory_partial[part] : Tensor();
      for (int64_t block = part * num_blocks / partials; block < (part + 1) * num_blocks / partials; ++block) {
        const int64_t n0 = block * block_rows, rows = std::min(block_rows, num_queries - n0);
        Tensor g_block = g.narrow(0, 0, rows);
        g_block.copy_(grad.narrow(0, n0, rows));
        for (int64_t step = saved_steps - 1; step >= 0; --step) {
          const bool need_grad_state = grad_queries || step > 0;
          if (!need_grad_state && !grad_memory) break;
          std::vector<int64_t> active_rows;
          for (int64_t r = 0; r < rows; ++r)
            if (!unrolled || step < iterations_ptr[n0 + r]) active_rows.push_back(r);
          if (active_rows.empty()) continue;  // frozen rows pass their gradient straight through
          const int64_t a = static_cast<int64_t>(active_rows.size());
          const bool all = a == rows;
          const Tensor index = all ? Tensor() : rows_where(active_rows);
          auto pick = [&](const Tensor& t) { return all ? t : t.index_select(0, index); };
          const Tensor x = pick(step_start_state(queries, states, step, unrolled).narrow(0, n0, rows));
          const Tensor g_rows = pick(g_block);
          // The step's logits beta x X^T (the forward's arithmetic) and dP = g X^T in one GEMM, then
          // the plain loop's softmax and softmax backward, recomputed from the saved state:
          // P normalised from these very logits, dS = P * (dP - sum(P * dP)).
          Tensor both = stacked.narrow(0, 0, 2 * a), both_products = products.narrow(0, 0, 2 * a);
          Tensor scaled_x = both.narrow(0, 0, a);
          at::mul_out(scaled_x, x, beta_tensor);
          both.narrow(0, a, a).copy_(g_rows);
          at::mm_out(both_products, both, memory.t());
          // [dS; P] in one (2a, M) block, in the row order of [beta x; g]: grad X = [dS; P]^T [beta x; g].
          Tensor both_dscore_prob = dscore_prob.narrow(0, 0, 2 * a);
          Tensor step_dscore = both_dscore_prob.narrow(0, 0, a), step_prob = both_dscore_prob.narrow(0, a, a);
          at::_softmax_out(step_prob, both_products.narrow(0, 0, a), 1, false);
          at::_softmax_backward_data_out(step_dscore, both_products.narrow(0, a, a), step_prob, 1,
                                         step_prob.scalar_type());
          if (grad_memory) grad_memory_acc.addmm_(both_dscore_prob.t(), both);  // P^T g + dS^T (beta x), one GEMM
          if (need_grad_state) {
            Tensor step_grad_x = grad_x.narrow(0, 0, a);
            at::mm_out(step_grad_x, step_dscore, memory).mul_(beta);
            all ? g_block.copy_(step_grad_x) : g_block.index_copy_(0, index, step_grad_x);
          }
        }
        if (grad_queries) grad_queries_out.narrow(0, n0, rows).copy_(g_block);
      }
    }
  });
  Tensor grad_memory_out = grad_memory ? grad_memory_partial.sum(0).to(memory_in.scalar_type()) : at::zeros_like(memory_in);
  return {grad_queries_out, grad_memory_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyanomaly, CPU, m) {
  m.impl("hopfield_retrieve", &hopfield_retrieve_cpu);
  m.impl("hopfield_retrieve_backward", &hopfield_retrieve_backward_cpu);
}

}  // namespace pyanomaly
