// Argument checks shared by every C++/CUDA kernel of cpkernels.
//
// The full, user-facing validation (with messages that name the Python argument) lives in
// cpkernels/ops.py. These checks are the last line of defence for callers that reach
// torch.ops.cpkernels.* directly: whatever they pass, no kernel may read or write out of bounds.
// Task-id values are not checked here (that would cost a device sync per call): every kernel treats
// an id outside [0, num_tasks) as -1, "no adapter" (cpkernels/task_ids.py has the whole contract).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

namespace cpkernels {

inline void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "cp_linear: ", name, " has dtype ", t.scalar_type(),
                   " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "cp_linear: ", name, " is on ", t.device(), " but x is on ", x.device());
}

// Shapes: x (M, K), weight (N, K), bias (N) or none, A (N, r), B (K, r), C (T, r), task_ids (M).
inline void check_cp_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                 const at::Tensor& task_ids) {
  TORCH_CHECK(x.dim() == 2, "cp_linear: x must be 2-D (M, d_in) here, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "cp_linear: weight ", weight.sizes(),
              " does not match x ", x.sizes());
  const int64_t N = weight.size(0), K = x.size(1);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == N, "cp_linear: A ", A.sizes(), " must be (d_out=", N, ", r)");
  const int64_t r = A.size(1);
  TORCH_CHECK(B.dim() == 2 && B.size(0) == K && B.size(1) == r, "cp_linear: B ", B.sizes(), " must be (d_in=", K,
              ", r=", r, ")");
  TORCH_CHECK(C.dim() == 2 && C.size(1) == r, "cp_linear: C ", C.sizes(), " must be (num_tasks, r=", r, ")");
  TORCH_CHECK(task_ids.dim() == 1 && task_ids.size(0) == x.size(0), "cp_linear: task_ids ", task_ids.sizes(),
              " must be (M=", x.size(0), ")");
  TORCH_CHECK_TYPE(task_ids.scalar_type() == at::kLong || task_ids.scalar_type() == at::kInt,
                   "cp_linear: task_ids must be int32 or int64, got ", task_ids.scalar_type());
  TORCH_CHECK(task_ids.device() == x.device(), "cp_linear: task_ids is on ", task_ids.device(), " but x is on ",
              x.device());
  check_same(weight, x, "weight");
  check_same(A, x, "A");
  check_same(B, x, "B");
  check_same(C, x, "C");
  if (bias.has_value()) {
    check_same(*bias, x, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "cp_linear: bias ", bias->sizes(), " must be (d_out=", N, ")");
  }
}

// Backward: the forward's checks (no bias), plus grad_y (M, N) and the saved u = x·B (M, r).
inline void check_cp_linear_bwd_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                     const at::Tensor& task_ids, const at::Tensor& u) {
  check_cp_linear_args(x, weight, c10::nullopt, A, B, C, task_ids);
  const int64_t M = x.size(0), N = weight.size(0), r = A.size(1);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N, "cp_linear: grad_y ", grad_y.sizes(),
              " must be (", M, ", ", N, ")");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == M && u.size(1) == r, "cp_linear: u ", u.sizes(), " must be (", M, ", ",
              r, ")");
  check_same(grad_y, x, "grad_y");
  check_same(u, x, "u");
}

// Outputs that the backward's output_mask switches off come back as empty tensors.
inline at::Tensor skipped(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The GEMM half of the backward, the same on every device once the task-dependent rows exist:
//   dX = gs·Bᵀ + dY·W0, dA = dYᵀ·v, dB = xᵀ·gs, db = Σ dY in fp32.
// gs = s·g⊙C[t] and v = s·u⊙C[t] come from the backend's row kernel, dC from its segment sum (pass an
// undefined tensor when masked off). dX is seeded with the rank-r product and the big GEMM accumulates
// into it (beta = 1), so dX is written once and read once, as in the forward: the other order costs one
// more write of dX.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_gemms(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& B,
    const at::Tensor& gs, const at::Tensor& v, const at::Tensor& dC, std::array<bool, 5> mask) {
  const auto [need_dx, need_dA, need_dB, need_dC, need_db] = mask;
  at::Tensor dx = skipped(x), dA = skipped(x), dB = skipped(x), db = skipped(x);
  if (need_dx) {
    dx = at::empty({x.size(0), x.size(1)}, x.options());
    at::mm_out(dx, gs, B.t());
    dx.addmm_(grad_y, weight);
  }
  // dA = (vᵀ·dY)ᵀ rather than dYᵀ·v: the same product, but with the long M axis as the inner
  // dimension of both operands in memory order; MKL ran it twice as fast on the CPU shapes
  // (0.35 vs 0.71 ms at M = 2048, d = 768, r = 8). The r × d transposes are negligible.
  if (need_dA) dA = at::mm(v.t(), grad_y).t().contiguous();
  if (need_dB) dB = at::mm(gs.t(), x).t().contiguous();
  if (need_db) db = grad_y.sum(0, /*keepdim=*/false, at::toOpMathType(x.scalar_type())).to(x.scalar_type());
  return {dx, dA, dB, need_dC ? dC : skipped(x), db};
}

}  // namespace cpkernels
