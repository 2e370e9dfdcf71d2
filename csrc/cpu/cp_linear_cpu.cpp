// CPU backend of cp_linear: ATen GEMMs for the matrix products, plus one fused
// at::parallel_for pass for everything that depends on the per-row task id.
//
// Forward   u = x·B                           skinny GEMM (M × r), saved for backward
//           v1 = [s · u ⊙ C[t] | 1]           fused row loop (gather + scale), M × (r + 1)
//           y = v1·[A | b]ᵀ                   the rank-r product seeds y, bias included
//           y += x·W0ᵀ                        the big GEMM with beta = 1
// Seeding y with the low-rank product (as LoRAFusion seeds its accumulator) makes y's memory
// traffic exactly nn.Linear's: F.linear also writes y once (its bias broadcast) before a beta = 1
// GEMM. Adding v·Aᵀ afterwards instead costs one more read and write of y: measured here (2 cores,
// fp32) 1.07-1.15× F.linear against 1.00-1.11× seeded, on the CPU benchmark shapes.
// Backward  g = dY·A                          skinny GEMM (M × r)
//           gs = s · g ⊙ C[t], v = s · u ⊙ C[t], dC partial sums   one fused row loop
//           dX = gs·Bᵀ + dY·W0                seeded with the rank-r product, big GEMM beta = 1
//           dA = dYᵀ·v,  dB = xᵀ·gs,  db = Σ dY
//
// dC is a segment sum over task ids. To be deterministic whatever the thread count, rows are
// cut into a number of chunks that depends on M only; each chunk sums its rows in order into
// its own slot, and the slots are added in chunk order afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "cpu/lowrank_cpu.h"

namespace cpkernels {
namespace {

// 512 rows × r columns is a few KiB of work per chunk: big enough to amortise a task, small
// enough that a 2-core machine gets balanced chunks from M ≈ 2k on.
constexpr int64_t kRowsPerChunk = 512;
// Bounds the partial-sum buffer (chunks × T × r) and the final serial reduction.
// The number of chunks depends on M only, never on the thread count: that is what makes dC
// bitwise reproducible.
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMaxPartialElems = int64_t(1) << 24;
// The gather loop does r multiply-adds per row; below ~8k elements a parallel task costs more
// to hand out than to run.
constexpr int64_t kElemsPerTask = 8192;

void check_task_range(const at::Tensor& task_ids, int64_t num_tasks) {
  if (task_ids.numel() == 0) return;
  auto [lo, hi] = at::aminmax(task_ids);
  const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
  TORCH_CHECK_INDEX(lo_v >= 0 && hi_v < num_tasks, "cp_linear: task_ids must lie in [0, num_tasks=", num_tasks,
                    "), got values in [", lo_v, ", ", hi_v, "]");
}

// v[i, :r] = s · u[i, :] ⊙ C[t_i, :] and v[i, r] = 1 (u and C row-major, contiguous; v has r + 1
// columns so that the seeding GEMM adds the bias too).
template <typename scalar_t, typename index_t>
void gather_scale(const scalar_t* u, const scalar_t* C, const index_t* t, scalar_t* v, int64_t M, int64_t r,
                  double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scale);
  at::parallel_for(0, M, std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(r, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* c = C + static_cast<int64_t>(t[i]) * r;
      scalar_t* vi = v + i * (r + 1);
      for (int64_t k = 0; k < r; ++k)
        vi[k] = static_cast<scalar_t>(s * static_cast<acc_t>(u[i * r + k]) * static_cast<acc_t>(c[k]));
      vi[r] = scalar_t(1);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cp_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                                     const at::Tensor& B, const at::Tensor& C,
                                                     const at::Tensor& task_ids, double scale) {
  check_cp_linear_args(x, weight, bias, A, B, C, task_ids);
  check_task_range(task_ids, C.size(0));
  const int64_t M = x.size(0), N = weight.size(0), r = A.size(1);
  at::Tensor u;  // (M, r), contiguous
  if (!lowrank_shrink(x, B, u)) u = at::mm(x, B);
  at::Tensor y;
  if (lowrank_expand(u, A, bias, C, task_ids, scale, y)) {  // fp32: y = b + s·(u ⊙ C[t])·Aᵀ in one pass
    y.addmm_(x, weight.t());
    return {y, u};
  }
  at::Tensor v = at::empty({M, r + 1}, x.options());
  const at::Tensor Cc = C.contiguous(), t = task_ids.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cp_linear_fwd_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "cp_linear_fwd_cpu_ids", [&] {
      gather_scale<scalar_t, index_t>(u.const_data_ptr<scalar_t>(), Cc.const_data_ptr<scalar_t>(),
                                      t.const_data_ptr<index_t>(), v.mutable_data_ptr<scalar_t>(), M, r, scale);
    });
  });
  // [A | b]: the bias column meets v's column of ones (zeros without a bias). Two plain copies:
  // at::cat cost 28 µs here at N = 768, a sixth of the whole decode-size GEMM.
  at::Tensor Ab = at::empty({N, r + 1}, A.options());
  Ab.narrow(1, 0, r).copy_(A);
  if (bias.has_value())
    Ab.select(1, r).copy_(*bias);
  else
    Ab.select(1, r).zero_();
  y = at::empty({M, N}, x.options());
  at::mm_out(y, v, Ab.t());
  y.addmm_(x, weight.t());
  return {y, u};
}

// One pass over the rows for everything the task id touches in backward:
//   gs = s·g⊙C[t] (for dX, dB), v = s·u⊙C[t] (for dA), dC partial sums of u⊙g per chunk.
template <typename scalar_t, typename index_t>
void backward_rows(const scalar_t* u, const scalar_t* g, const scalar_t* C, const index_t* t, scalar_t* gs,
                   scalar_t* v, at::opmath_type<scalar_t>* partial, int64_t M, int64_t r, int64_t T,
                   int64_t num_chunks, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scale);
  const int64_t rows_per_chunk = (M + num_chunks - 1) / num_chunks;
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      acc_t* slot = partial ? partial + chunk * T * r : nullptr;
      const int64_t end = std::min(M, (chunk + 1) * rows_per_chunk);
      for (int64_t i = chunk * rows_per_chunk; i < end; ++i) {
        const int64_t task = static_cast<int64_t>(t[i]);
        const scalar_t* c = C + task * r;
        for (int64_t k = 0; k < r; ++k) {
          const acc_t ck = static_cast<acc_t>(c[k]);
          const acc_t uk = static_cast<acc_t>(u[i * r + k]);
          const acc_t gk = static_cast<acc_t>(g[i * r + k]);
          if (gs) gs[i * r + k] = static_cast<scalar_t>(s * gk * ck);
          if (v) v[i * r + k] = static_cast<scalar_t>(s * uk * ck);
          if (slot) slot[task * r + k] += uk * gk;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cp_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const at::Tensor& task_ids, const at::Tensor& u, double scale,
    std::array<bool, 5> mask) {
  check_cp_linear_bwd_args(grad_y, x, weight, A, B, C, task_ids, u);
  check_task_range(task_ids, C.size(0));
  const int64_t M = x.size(0), r = A.size(1), T = C.size(0);
  const auto [need_dx, need_dA, need_dB, need_dC, need_db] = mask;
  (void)need_db;  // db is the shared GEMM half's business

  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const int64_t num_chunks = std::max<int64_t>(
      1, std::min({(M + kRowsPerChunk - 1) / kRowsPerChunk, kMaxChunks, kMaxPartialElems / std::max<int64_t>(1, T * r)}));
  at::Tensor g;  // (M, r)
  if (!lowrank_shrink(grad_y, A, g)) g = at::mm(grad_y, A);
  at::Tensor gs = (need_dx || need_dB) ? at::empty_like(g) : at::Tensor();
  at::Tensor v = need_dA ? at::empty_like(g) : at::Tensor();
  at::Tensor partial = need_dC ? at::zeros({num_chunks, T, r}, x.options().dtype(acc_type)) : at::Tensor();
  const at::Tensor uc = u.contiguous(), Cc = C.contiguous(), t = task_ids.contiguous();
  if (M > 0 && r > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cp_linear_bwd_cpu", [&] {
      AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "cp_linear_bwd_cpu_ids", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        backward_rows<scalar_t, index_t>(
            uc.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), Cc.const_data_ptr<scalar_t>(),
            t.const_data_ptr<index_t>(), gs.defined() ? gs.mutable_data_ptr<scalar_t>() : nullptr,
            v.defined() ? v.mutable_data_ptr<scalar_t>() : nullptr,
            partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr, M, r, T, num_chunks, scale);
      });
    });
  } else {
    if (gs.defined()) gs.zero_();
    if (v.defined()) v.zero_();
  }

  at::Tensor dC;
  if (need_dC) {
    dC = partial[0].clone();
    for (int64_t c = 1; c < num_chunks; ++c) dC.add_(partial[c]);  // fixed chunk order: deterministic
    dC = dC.mul_(scale).to(x.scalar_type());
  }
  // fp32: seed dX with gs·Bᵀ in one pass (lowrank_cpu.cpp), then let the shared GEMM half do the rest.
  at::Tensor dx;
  const bool fused_dx = need_dx && lowrank_expand(gs, B, c10::nullopt, at::Tensor(), at::Tensor(), 1.0, dx);
  auto grads = backward_gemms(grad_y, x, weight, B, gs, v, dC, {need_dx && !fused_dx, need_dA, need_dB, need_dC, need_db});
  if (fused_dx) std::get<0>(grads) = dx.addmm_(grad_y, weight);
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpkernels, CPU, m) {
  m.impl("cp_linear_fwd", &cp_linear_fwd_cpu);
  m.impl("cp_linear_bwd", &cp_linear_bwd_cpu);
}

}  // namespace cpkernels
