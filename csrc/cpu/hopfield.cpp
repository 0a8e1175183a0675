// CPU kernels of the Hopfield retrieval. The forward runs each update over all still-moving queries at
// once through ATen's CPU flash-attention kernel (blocks of queries and patterns in parallel, online
// softmax, its logsumexp for free), so it costs what the SDPA loop does plus the per-query freezing,
// and no (N, M) matrix is ever held. The backward runs blocks of queries in parallel, each with the
// plain loop's arithmetic (BLAS matmuls and softmax on a (block, M) scratch per thread, allocated once
// per thread): it recomputes each step's softmax from the saved state (its logits and dP = g X^T in
// one GEMM) and applies the plain softmax backward, so a saturated step gives the plain loop's exact
// zero state gradient, not rounding noise that the soft steps before it would amplify (issue 12).
// Half and bfloat16 inputs run in float32 throughout.
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

// Backward queries per block: the (block, M) logits, probabilities and their gradient stay near kBlockScratch
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

// One update of the active rows x (A, D): softmax(beta x X^T) X and its logsumexp (A), by ATen's CPU
// flash-attention kernel (the SDPA loop's own kernel: blocks of queries and patterns in parallel, an
// online softmax, no (A, M) matrix). Its online softmax turns NaN or overflowing logits into a finite
// row (zeros), so rows whose logits could overflow are redone with the plain loop's arithmetic, where
// they give NaN as the loop does and the Python wrapper's result check names the input. Such a row
// has beta |x| |X_j| beyond a safe bound or a NaN/inf norm. `rows_bounded`: every row of x is a
// softmax average of the patterns (the output of a step that took no plain-arithmetic row), hence no
// longer than the longest pattern, which spares the per-row norms. Returns the update, its
// logsumexp, and whether any row took the plain arithmetic (its NaN must not reach a later step's
// kernel, which would turn it into zeros). A = 0 never reaches this (the kernel divides by the rows).
std::tuple<Tensor, Tensor, bool> update_step(const Tensor& x, const Tensor& memory, double beta,
                                             double memory_norm, bool rows_bounded) {
  const int64_t rows = x.size(0), dim = x.size(1), patterns = memory.size(0);
  const Tensor memory_heads = memory.view({1, 1, patterns, dim});
  auto [updated_heads, lse_heads] = at::_scaled_dot_product_flash_attention_for_cpu(
      x.view({1, 1, rows, dim}), memory_heads, memory_heads, /*dropout_p=*/0.0, /*is_causal=*/false,
      /*attn_mask=*/std::nullopt, /*scale=*/beta);
  Tensor updated = updated_heads.view({rows, dim}), lse = lse_heads.view({rows});
  const double safe_logit = x.scalar_type() == at::kDouble ? 1e300 : 1e30;  // far below the dtype's max
  const double scale = std::max(beta, 1.0) * memory_norm;  // |any partial sum of a logit| <= scale |x|
  if (rows_bounded && memory_norm * scale <= safe_logit) return {updated, lse, false};
  const Tensor risky = at::linalg_vector_norm(x, 2, {1}).mul_(scale).le(safe_logit).logical_not_();  // NaN too
  if (!risky.any().item<bool>()) return {updated, lse, false};
  const Tensor index = risky.nonzero().squeeze(1);
  const Tensor logits = at::mm(x.index_select(0, index).mul(beta), memory.t());
  updated.index_copy_(0, index, at::mm(at::_softmax(logits, 1, false), memory));
  lse.index_copy_(0, index, at::logsumexp(logits, {1}));
  return {updated, lse, true};
}

// Half and bfloat16 inputs: only the results are rounded to the input dtype (as on CUDA).
std::tuple<Tensor, Tensor, Tensor, Tensor> hopfield_retrieve_cpu(const Tensor& queries_in, const Tensor& memory_in,
                                                                 double beta, int64_t max_iter, double tol,
                                                                 c10::string_view save_name) {
  check_retrieve_args(queries_in, memory_in, beta, max_iter, tol);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the ATen ops below are the kernel, not a graph
  const SaveMode save = parse_save(save_name);
  const auto compute = compute_type(queries_in.scalar_type());
  const Tensor memory = memory_in.to(compute).contiguous();
  const int64_t num_queries = queries_in.size(0), dim = queries_in.size(1);
  const int64_t saved_steps = save == SaveMode::kUnrolled ? max_iter : (save == SaveMode::kLast ? 1 : 0);

  Tensor iterations = at::zeros({num_queries}, queries_in.options().dtype(at::kInt));
  // The start state of each saved step the backward cannot get elsewhere: unrolled, steps 1..S-1
  // (step 0 starts from the queries, which autograd keeps anyway); last, each query's final update.
  Tensor states = at::empty({stored_states(save_name, max_iter), num_queries, dim}, memory.options());
  Tensor lse = at::empty({saved_steps, num_queries}, memory.options());
  if (save == SaveMode::kUnrolled) lse.fill_(std::numeric_limits<double>::infinity());  // steps a row skips
  int32_t* iterations_ptr = iterations.data_ptr<int32_t>();

  // Steps run over all still-moving rows at once (the kernel parallelises over their blocks); a row
  // that moved by at most tol is frozen and leaves the active set.
  const double memory_norm = at::linalg_vector_norm(memory, 2, {1}).max().item<double>();
  Tensor state = queries_in.to(compute).contiguous();  // may be the caller's queries until step 0 replaces it
  bool rows_bounded = false;  // the queries are not: their norms are checked at step 0
  std::vector<int64_t> active_rows(num_queries);
  for (int64_t r = 0; r < num_queries; ++r) active_rows[r] = r;
  for (int64_t step = 0; step < max_iter; ++step) {
    if (active_rows.empty()) {
      if (save == SaveMode::kUnrolled)  // the start states of the steps left (never read: defined anyway)
        for (int64_t s = step; s + 1 < max_iter; ++s) states[s].copy_(state);
      break;
    }
    const int64_t num_active = static_cast<int64_t>(active_rows.size());
    const bool all = num_active == num_queries;
    const Tensor index = all ? Tensor() : rows_where(active_rows);
    const Tensor x = all ? state : state.index_select(0, index);
    auto [updated, step_lse, plain_rows] = update_step(x, memory, beta, memory_norm, rows_bounded);
    rows_bounded = !plain_rows;
    if (save != SaveMode::kNone) {
      Tensor lse_step = lse[save == SaveMode::kLast ? 0 : step];
      all ? lse_step.copy_(step_lse) : lse_step.index_copy_(0, index, step_lse);
    }
    if (save == SaveMode::kLast) all ? states[0].copy_(x) : states[0].index_copy_(0, index, x);
    std::vector<int64_t> still_active;
    if (tol > 0) {  // tol = 0: exactly max_iter updates, nothing to measure
      const Tensor moved = (updated - x).norm(2, {1}).to(at::kDouble).contiguous();
      const double* moved_ptr = moved.data_ptr<double>();
      for (int64_t i = 0; i < num_active; ++i)
        if (moved_ptr[i] > tol) still_active.push_back(active_rows[i]);
    } else {
      still_active = active_rows;
    }
    // all: the new state, no copy; otherwise step >= 1 (every row takes step 0), so `state` is ours
    all ? void(state = updated) : void(state.index_copy_(0, index, updated));
    for (const int64_t row : active_rows) iterations_ptr[row] += 1;
    active_rows.swap(still_active);
    if (save == SaveMode::kUnrolled && step + 1 < max_iter) states[step].copy_(state);
  }
  if (state.is_same(queries_in)) state = state.clone();  // no step ran (N = 0): never return the input
  return {state.to(queries_in.scalar_type()), iterations, states, lse};
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
