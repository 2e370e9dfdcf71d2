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
// In fp32 the rank-r products run in lowrank_cpu.cpp instead (one vectorised pass each, measured
// against these MKL calls there): u = x·B and g = dY·A by lowrank_shrink, and the seeds of y (with the
// gather and the bias) and of dX by lowrank_expand; the big GEMMs and dA, dB stay as below.
// Backward  g = dY·A                          skinny GEMM (M × r)
//           gs = s · g ⊙ C[t], v = s · u ⊙ C[t], dC partial sums   one fused row loop
//           dX = gs·Bᵀ + dY·W0                seeded with the rank-r product, big GEMM beta = 1
//           dA = dYᵀ·v,  dB = xᵀ·gs,  db = Σ dY
//
// Task ids (cpkernels/task_ids.py): a row whose id lies outside [0, T) gets no adapter, as -1
// means: its low-rank row is 0 (y = x·W0ᵀ + b, dX = dY·W0) and it adds nothing to dC. ops.py has
// already raised IndexError for any id other than -1 wherever a check can run; this mask is what
// keeps the kernel in bounds where none can (torch.compile graphs, direct calls to the raw op).
//
// dC is a segment sum over task ids. To be deterministic whatever the thread count, rows are
// cut into a number of chunks that depends on M only; each chunk sums its rows in order into
// its own slot, and the slots are added in chunk order afterwards. dA, dB and db come from MKL
// GEMMs, whose reduction over M splits by thread count; under torch.use_deterministic_algorithms
// they come from fixed_order_tn instead, which is bitwise independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

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

// Row i's C row, or null when its id is outside [0, T): -1 (no adapter), or an unchecked bad id.
template <typename scalar_t, typename index_t>
inline const scalar_t* task_row(const scalar_t* C, const index_t* t, int64_t i, int64_t r, int64_t T) {
  const int64_t task = static_cast<int64_t>(t[i]);
  return (task >= 0 && task < T) ? C + task * r : nullptr;
}

// v[i, :r] = s · u[i, :] ⊙ C[t_i, :] (0 for a row without adapter) and v[i, r] = 1 (u and C
// row-major, contiguous; v has r + 1 columns so that the seeding GEMM adds the bias too).
template <typename scalar_t, typename index_t>
void gather_scale(const scalar_t* u, const scalar_t* C, const index_t* t, scalar_t* v, int64_t M, int64_t r,
                  int64_t T, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(scale);
  at::parallel_for(0, M, std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(r, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const scalar_t* c = task_row(C, t, i, r, T);
      scalar_t* vi = v + i * (r + 1);
      for (int64_t k = 0; k < r; ++k)
        vi[k] = c ? static_cast<scalar_t>(s * static_cast<acc_t>(u[i * r + k]) * static_cast<acc_t>(c[k]))
                  : scalar_t(0);
      vi[r] = scalar_t(1);
    }
  });
}

// out (P, Q) = aᵀ·b for row-major contiguous a (M, P) and b (M, Q): each output element is summed
// over the rows in row order by one thread (threads split the P columns), so the result is bitwise
// the same for any thread count. A plain loop, not a GEMM: only the deterministic mode pays for it.
template <typename scalar_t>
void fixed_order_tn(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t M, int64_t P, int64_t Q) {
  using acc_t = at::opmath_type<scalar_t>;
  // 64 columns × Q accumulators per block stay in L1 for the ranks used here; blocks are the tasks.
  constexpr int64_t kCols = 64;
  at::parallel_for(0, (P + kCols - 1) / kCols, 1, [&](int64_t pb, int64_t pe) {
    std::vector<acc_t> acc(kCols * Q);
    for (int64_t blk = pb; blk < pe; ++blk) {
      const int64_t p0 = blk * kCols, np = std::min(kCols, P - p0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < M; ++i) {
        const scalar_t* ai = a + i * P + p0;
        const scalar_t* bi = b + i * Q;
        for (int64_t p = 0; p < np; ++p) {
          const acc_t ap = static_cast<acc_t>(ai[p]);
          for (int64_t q = 0; q < Q; ++q) acc[p * Q + q] += ap * static_cast<acc_t>(bi[q]);
        }
      }
      for (int64_t p = 0; p < np; ++p)
        for (int64_t q = 0; q < Q; ++q) out[(p0 + p) * Q + q] = static_cast<scalar_t>(acc[p * Q + q]);
    }
  });
}

// aᵀ·b (see fixed_order_tn) as a new (a.size(1), b.size(1)) tensor.
at::Tensor fixed_order_tn(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty({a.size(1), b.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "cp_linear_fixed_order_tn", [&] {
    fixed_order_tn<scalar_t>(ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                             out.mutable_data_ptr<scalar_t>(), a.size(0), a.size(1), b.size(1));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cp_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                                     const at::Tensor& B, const at::Tensor& C,
                                                     const at::Tensor& task_ids, double scale) {
  check_cp_linear_args(x, weight, bias, A, B, C, task_ids);
  const int64_t M = x.size(0), N = weight.size(0), r = A.size(1), T = C.size(0);
  at::Tensor u;  // (M, r), contiguous: the row loops rely on it
  if (!lowrank_shrink(x, B, u)) u = at::mm(x, B).contiguous();
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
                                      t.const_data_ptr<index_t>(), v.mutable_data_ptr<scalar_t>(), M, r, T, scale);
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
        const scalar_t* c = task_row(C, t, i, r, T);
        if (!c) {  // no adapter: zero low-rank rows, nothing added to dC
          for (int64_t k = 0; k < r; ++k) {
            if (gs) gs[i * r + k] = scalar_t(0);
            if (v) v[i * r + k] = scalar_t(0);
          }
          continue;
        }
        const int64_t task = static_cast<int64_t>(t[i]);
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
  const int64_t M = x.size(0), r = A.size(1), T = C.size(0);
  const auto [need_dx, need_dA, need_dB, need_dC, need_db] = mask;

  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const int64_t num_chunks = std::max<int64_t>(
      1, std::min({(M + kRowsPerChunk - 1) / kRowsPerChunk, kMaxChunks, kMaxPartialElems / std::max<int64_t>(1, T * r)}));
  at::Tensor g;  // (M, r), contiguous: the row loop relies on it
  if (!lowrank_shrink(grad_y, A, g)) g = at::mm(grad_y, A).contiguous();
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
  at::Tensor dx_seed;
  const bool fused_dx = need_dx && lowrank_expand(gs, B, c10::nullopt, at::Tensor(), at::Tensor(), 1.0, dx_seed);
  // Deterministic mode: the reductions over M (dA, dB, db) in a fixed order; dX and dC as usual
  // (dX reduces over d_out and r, never over M, so no thread split reaches its sums).
  const bool fixed_order = at::globalContext().deterministicAlgorithms();
  auto [dx, dA, dB, dC_out, db] = backward_gemms(
      grad_y, x, weight, B, gs, v, dC,
      {need_dx && !fused_dx, need_dA && !fixed_order, need_dB && !fixed_order, need_dC, need_db && !fixed_order});
  if (fused_dx) dx = dx_seed.addmm_(grad_y, weight);
  if (fixed_order) {
    if (need_dA) dA = fixed_order_tn(grad_y, v);
    if (need_dB) dB = fixed_order_tn(x, gs);
    if (need_db) db = fixed_order_tn(grad_y, at::ones({M, 1}, grad_y.options())).view({-1});
  }
  return {dx, dA, dB, dC_out, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(cpkernels, CPU, m) {
  m.impl("cp_linear_fwd", &cp_linear_fwd_cpu);
  m.impl("cp_linear_bwd", &cp_linear_bwd_cpu);
}

}  // namespace cpkernels
