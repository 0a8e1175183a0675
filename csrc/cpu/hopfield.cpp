// CPU kernels of the Hopfield retrieval: blocks of queries run in parallel, each with the plain loop's
// arithmetic (BLAS matmuls and softmax on a (block, M) scratch per thread), so no (N, M) matrix is ever
// held. The backward recomputes each step's softmax from the saved state the same way and applies the
// plain softmax backward: a saturated step then gives the plain loop's exact zero state gradient, not
// rounding noise that the soft steps before it would amplify (issue 12).
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

constexpr int64_t kGradPartials = 8;   // fixed number of grad_memory partial sums (deterministic)
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

void check_retrieve_args(const Tensor& queries, const Tensor& memory, double beta, int64_t max_iter, double tol) {
  PYA_CHECK_DIM(queries, 2);
  PYA_CHECK_DIM(memory, 2);
  PYA_CHECK_CPU(queries);
  PYA_CHECK_CPU(memory);
  TORCH_CHECK(queries.scalar_type() == at::kFloat || queries.scalar_type() == at::kDouble,
              "queries must be float32 or float64 on CPU, got ", queries.scalar_type());
  check_hopfield_retrieve_args(queries, memory, beta, max_iter, tol);
}

Tensor rows_where(const std::vector<int64_t>& rows) {
  return at::tensor(rows, at::TensorOptions().dtype(at::kLong));
}

// The logits (Na, M) of one update of the rows `x` (Na, D), as the plain loop forms them. The
// forward and the backward's recompute both call this, so they see the very same numbers.
Tensor step_logits(const Tensor& x, const Tensor& memory, double beta) { return at::mm(x * beta, memory.t()); }

// One update of the rows `x` (Na, D), the plain loop's arithmetic on a (Na, M) scratch:
// returns (new state softmax(beta x X^T) X (Na, D), logsumexp of the logits (Na,)).
std::tuple<Tensor, Tensor> update_rows(const Tensor& x, const Tensor& memory, double beta) {
  const Tensor logits = step_logits(x, memory, beta);
  return {at::mm(at::_softmax(logits, 1, false), memory), at::logsumexp(logits, {1})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> hopfield_retrieve_cpu(const Tensor& queries_in, const Tensor& memory_in,
                                                                 double beta, int64_t max_iter, double tol,
                                                                 c10::string_view save_name) {
  check_retrieve_args(queries_in, memory_in, beta, max_iter, tol);
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the ATen ops below are the kernel, not a graph
  const SaveMode save = parse_save(save_name);
  const Tensor queries = queries_in.contiguous();
  const Tensor memory = memory_in.contiguous();
  const int64_t num_queries = queries.size(0), dim = queries.size(1);
  const int64_t saved_steps = save == SaveMode::kUnrolled ? max_iter : (save == SaveMode::kLast ? 1 : 0);

  Tensor retrieved = at::empty_like(queries);
  Tensor iterations = at::zeros({num_queries}, queries.options().dtype(at::kInt));
  Tensor states = at::empty({saved_steps == 0 ? 0 : saved_steps + 1, num_queries, dim}, queries.options());
  Tensor lse = at::empty({saved_steps, num_queries}, queries.options());
  if (save == SaveMode::kUnrolled) lse.fill_(std::numeric_limits<double>::infinity());
  int32_t* iterations_ptr = iterations.data_ptr<int32_t>();

  const int64_t block_rows = block_rows_for(memory.size(0));
  const int64_t num_blocks = (num_queries + block_rows - 1) / block_rows;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    at::AutoDispatchBelowADInplaceOrView worker_no_autograd;  // dispatch guards are thread-local
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t n0 = block * block_rows, rows = std::min(block_rows, num_queries - n0);
      Tensor state = queries.narrow(0, n0, rows).clone();
      Tensor previous = save == SaveMode::kLast ? states[0].narrow(0, n0, rows) : Tensor();
      if (save == SaveMode::kUnrolled) states[0].narrow(0, n0, rows).copy_(state);
      std::vector<bool> active(rows, true);
      for (int64_t step = 0; step < max_iter; ++step) {
        std::vector<int64_t> active_rows;
        for (int64_t r = 0; r < rows; ++r)
          if (active[r]) active_rows.push_back(r);
        if (active_rows.empty()) {
          if (save == SaveMode::kUnrolled)
            for (int64_t s = step; s < max_iter; ++s) states[s + 1].narrow(0, n0, rows).copy_(state);
          break;
        }
        const bool all = static_cast<int64_t>(active_rows.size()) == rows;
        const Tensor index = all ? Tensor() : rows_where(active_rows);
        const Tensor x = all ? state : state.index_select(0, index);  // aliases state when all: read first
        auto [updated, step_lse] = update_rows(x, memory, beta);
        const Tensor moved = (updated - x).norm(2, {1}).to(at::kDouble).contiguous();
        const double* moved_ptr = moved.data_ptr<double>();
        if (save == SaveMode::kLast) {
          all ? previous.copy_(x) : previous.index_copy_(0, index, x);
          Tensor last_lse = lse[0].narrow(0, n0, rows);
          all ? last_lse.copy_(step_lse) : last_lse.index_copy_(0, index, step_lse);
        }
        all ? state.copy_(updated) : state.index_copy_(0, index, updated);
        for (size_t i = 0; i < active_rows.size(); ++i) {
          const int64_t r = active_rows[i];
          iterations_ptr[n0 + r] += 1;
          if (tol > 0 && !(moved_ptr[i] > tol)) active[r] = false;  // tol = 0: exactly max_iter updates
        }
        if (save == SaveMode::kUnrolled) {
          states[step + 1].narrow(0, n0, rows).copy_(state);
          Tensor step_lse_rows = lse[step].narrow(0, n0, rows);
          all ? step_lse_rows.copy_(step_lse) : step_lse_rows.index_copy_(0, index, step_lse);
        }
      }
      retrieved.narrow(0, n0, rows).copy_(state);
      if (save == SaveMode::kLast) states[1].narrow(0, n0, rows).copy_(state);
    }
  });
  return {retrieved, iterations, states, lse};
}

std::tuple<Tensor, Tensor> hopfield_retrieve_backward_cpu(const Tensor& grad_retrieved, const Tensor& memory_in,
                                                          const Tensor& states_in, const Tensor& lse_in,
                                                          const Tensor& iterations_in, double beta, bool unrolled,
                                                          bool grad_queries, bool grad_memory) {
  PYA_CHECK_DIM(memory_in, 2);
  PYA_CHECK_DIM(states_in, 3);
  PYA_CHECK_DIM(lse_in, 2);
  PYA_CHECK_CPU(memory_in);
  PYA_CHECK_CPU(grad_retrieved);
  PYA_CHECK_CPU(states_in);
  PYA_CHECK_CPU(lse_in);
  PYA_CHECK_CPU(iterations_in);
  const int64_t saved_steps = lse_in.size(0), num_queries = states_in.size(1), dim = memory_in.size(1);
  TORCH_CHECK(memory_in.scalar_type() == at::kFloat || memory_in.scalar_type() == at::kDouble,
              "memory must be float32 or float64 on CPU, got ", memory_in.scalar_type());
  TORCH_CHECK(memory_in.size(0) >= 1 && dim >= 1, "memory must not be empty, got shape ", memory_in.sizes());
  TORCH_CHECK(saved_steps >= 1 && (unrolled || saved_steps == 1),
              "lse must have shape (S, N) with S >= 1 saved steps (S = 1 when unrolled is false), got ",
              lse_in.sizes());
  PYA_CHECK_SHAPE(states_in, saved_steps + 1, num_queries, dim);
  PYA_CHECK_SHAPE(lse_in, saved_steps, num_queries);
  PYA_CHECK_SHAPE(grad_retrieved, num_queries, dim);
  PYA_CHECK_SHAPE(iterations_in, num_queries);
  PYA_CHECK_DTYPE(iterations_in, at::kInt);
  PYA_CHECK_DTYPE(states_in, memory_in.scalar_type());
  PYA_CHECK_DTYPE(lse_in, memory_in.scalar_type());
  TORCH_CHECK(grad_retrieved.is_floating_point(), "grad_retrieved must be floating point, got ", grad_retrieved.scalar_type());
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "beta must be a finite number > 0, got ", beta);

  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const Tensor memory = memory_in.contiguous();
  const Tensor states = states_in.contiguous();
  const Tensor iterations = iterations_in.contiguous();
  const Tensor grad = grad_retrieved.to(memory.scalar_type()).contiguous();
  const int32_t* iterations_ptr = iterations.data_ptr<int32_t>();
  const int64_t num_patterns = memory.size(0);

  Tensor grad_queries_out = at::zeros({num_queries, dim}, memory.options());
  const int64_t block_rows = block_rows_for(num_patterns);
  const int64_t num_blocks = (num_queries + block_rows - 1) / block_rows;
  const int64_t partials = std::max<int64_t>(1, std::min(kGradPartials, num_blocks));
  Tensor grad_memory_partial = at::zeros({grad_memory ? partials : 0, num_patterns, dim}, memory.options());
  if (num_queries == 0 || (!grad_queries && !grad_memory)) {
    return {grad_queries_out, at::zeros_like(memory)};
  }

  // Partial p owns a fixed range of query blocks, so the sum does not depend on the thread count.
  at::parallel_for(0, partials, 1, [&](int64_t part_begin, int64_t part_end) {
    at::AutoDispatchBelowADInplaceOrView worker_no_autograd;  // dispatch guards are thread-local
    for (int64_t part = part_begin; part < part_end; ++part) {
      Tensor grad_memory_acc = grad_memory ? grad_memory_partial[part] : Tensor();
      for (int64_t block = part * num_blocks / partials; block < (part + 1) * num_blocks / partials; ++block) {
        const int64_t n0 = block * block_rows, rows = std::min(block_rows, num_queries - n0);
        Tensor g = grad.narrow(0, n0, rows).clone();
        for (int64_t step = saved_steps - 1; step >= 0; --step) {
          const bool need_grad_state = grad_queries || step > 0;
          if (!need_grad_state && !grad_memory) break;
          std::vector<int64_t> active_rows;
          for (int64_t r = 0; r < rows; ++r)
            if (!unrolled || step < iterations_ptr[n0 + r]) active_rows.push_back(r);
          if (active_rows.empty()) continue;  // frozen rows pass their gradient straight through
          const bool all = static_cast<int64_t>(active_rows.size()) == rows;
          const Tensor index = all ? Tensor() : rows_where(active_rows);
          auto pick = [&](const Tensor& t) { return all ? t : t.index_select(0, index); };
          const Tensor x = pick(states[step].narrow(0, n0, rows));
          const Tensor g_rows = pick(g);
          // The plain loop's softmax and softmax backward on the block, recomputed from the saved
          // state: P normalised from these very logits, dS = P * (dP - sum(P * dP)).
          const Tensor prob = at::_softmax(step_logits(x, memory, beta), 1, false);
          const Tensor dscore = at::_softmax_backward_data(at::mm(g_rows, memory.t()), prob, 1, prob.scalar_type());
          if (grad_memory) {
            grad_memory_acc.addmm_(prob.t(), g_rows);
            grad_memory_acc.addmm_(dscore.t(), x, 1.0, beta);
          }
          if (need_grad_state) {
            const Tensor grad_x = at::mm(dscore, memory).mul_(beta);
            all ? g.copy_(grad_x) : g.index_copy_(0, index, grad_x);
          }
        }
        if (grad_queries) grad_queries_out.narrow(0, n0, rows).copy_(g);
      }
    }
  });
  Tensor grad_memory_out = grad_memory ? grad_memory_partial.sum(0) : at::zeros_like(memory);
  return {grad_queries_out, grad_memory_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyanomaly, CPU, m) {
  m.impl("hopfield_retrieve", &hopfield_retrieve_cpu);
  m.impl("hopfield_retrieve_backward", &hopfield_retrieve_backward_cpu);
}

}  // namespace pyanomaly
