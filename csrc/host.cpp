// The host path of cp_linear in C++: autograd for the C++ backends, and the eager fast path.
//
// Why (issue 19): at small batches the work in front of the kernels decides the speed. Measured on the
// 2-core dev VM at M = 1, 64 -> 64, r = 8: F.linear costs 2.7 µs; cp_linear cost 31 µs in inference
// mode, 37 µs under no_grad and 64 µs with grad, of which the kernel is ~5 µs. The rest was Python:
// the argument checks and task-id resolution of ops.py (~15 µs), the Python autograd wrapper that
// torch.library.register_autograd puts in front of the op even under no_grad (~4 µs) and, with grad,
// a Python autograd.Function (~25 µs).
//
// Two things live here:
//   1. The Autograd kernel of cpkernels::cp_linear_fwd (the cpu and cuda backends' op): a C++
//      autograd::Function, so no_grad calls skip it for a few ns and grad calls build one C++ node.
//      The Triton op keeps its Python autograd (ops.py): its launcher is Python anyway.
//   2. `forward` and `prepare`, called from ops.cp_linear in eager mode. They *decide* whether a call
//      is valid and never explain why not: on any doubt (a bad shape, dtype, device or task id, an
//      unusual input such as a tensor subclass, autocast, rank 0) they return None and ops.py runs its
//      Python checks, which raise the error that names the argument. So the messages stay in one place
//      (ops.py, task_ids.py) and this file only has to be right about "everything is fine".
// Task ids: an id outside [0, T) other than -1 makes `forward` return None (ops.py then raises the
// IndexError naming the row). Ids that the library owns (task_ids.own) come with their checked
// maximum, so only that number is compared with T here: no pass over the ids, no device sync.
#include <torch/extension.h>

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <limits>
#include <optional>
#include <tuple>

#include "common.h"

namespace cpkernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ----------------------------------------------------------------------------------------------
// The raw ops, looked up once
// ----------------------------------------------------------------------------------------------
using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const std::optional<at::Tensor>&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, std::array<bool, 5>);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("cpkernels::cp_linear_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("cpkernels::cp_linear_bwd", "").typed<BwdSig>();
  return op;
}

// ----------------------------------------------------------------------------------------------
// 1. Autograd of cp_linear_fwd (ARCHITECTURE §1)
// ----------------------------------------------------------------------------------------------
// C[t] with a zero row wherever the id is outside [0, T): the differentiable gather of the
// create_graph path (task_ids.gather_rows is the same rule in Python).
at::Tensor gather_rows(const at::Tensor& C, const at::Tensor& t) {
  const int64_t T = C.size(0);
  const at::Tensor valid = t.ge(0).logical_and(t.lt(T));
  if (T == 0) return at::zeros({t.size(0), C.size(1)}, C.options());
  const at::Tensor rows = C.index_select(0, at::where(valid, t, at::zeros_like(t)));
  return at::where(valid.unsqueeze(1), rows, at::zeros({}, rows.options()));
}

struct CPLinearFunction : public torch::autograd::Function<CPLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& C, const at::Tensor& task_ids, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, u] = fwd_op().call(x, weight, bias, A, B, C, task_ids, scale);
    ctx->save_for_backward({x, weight, A, B, C, task_ids, u});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({u});
    return {y, u};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &A = saved[2], &B = saved[3], &C = saved[4],
                     &t = saved[5], &u = saved[6];
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor inputs only: x, weight, [bias], A, B, C, task_ids.
    const size_t o = has_bias ? 1 : 0;
    const bool nx = ctx->needs_input_grad(0), nb = has_bias && ctx->needs_input_grad(2),
               nA = ctx->needs_input_grad(2 + o), nB = ctx->needs_input_grad(3 + o), nC = ctx->needs_input_grad(4 + o);
    variable_list out(8);  // one slot per forward argument; weight, task_ids and scale get none
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    at::Tensor dx, dA, dB, dC, db;
    if (at::GradMode::is_enabled()) {
      // backward(create_graph=True): the gradients must carry a graph, and the fused kernels are
      // not differentiable. The formulas of ARCHITECTURE §1 in differentiable ATen ops (ops.py has the
      // same for the Triton op). The segment sum is a one-hot product: a row with id -1 matches no task.
      // (x·B again, not the saved u: u was made without a graph, and here B's path must be recorded.)
      const at::Tensor c = gather_rows(C, t), g = dy.mm(A), gc = g * c, xB = x.mm(B);
      dx = dy.mm(weight) + scale * gc.mm(B.t());
      dA = scale * dy.t().mm(xB * c);
      dB = scale * x.t().mm(gc);
      const at::Tensor one_hot = t.unsqueeze(1).eq(at::arange(C.size(0), t.options())).to(u.scalar_type());
      dC = scale * one_hot.t().mm(xB * g);
      db = dy.sum(0);
    } else {
      std::tie(dx, dA, dB, dC, db) = bwd_op().call(dy, x, weight, A, B, C, t, u, scale, {nx, nA, nB, nC, nb});
    }
    if (nx) out[0] = dx;
    if (nb) out[2] = db;
    if (nA) out[3] = dA;
    if (nB) out[4] = dB;
    if (nC) out[5] = dC;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> cp_linear_fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                          const at::Tensor& B, const at::Tensor& C,
                                                          const at::Tensor& task_ids, double scale) {
  auto out = CPLinearFunction::apply(x, weight, bias, A, B, C, task_ids, scale);
  return {out[0], out[1]};
}

// ----------------------------------------------------------------------------------------------
// 2. The eager fast path
// ----------------------------------------------------------------------------------------------
bool is_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

// A plain dense tensor on x's device: no subclass that intercepts dispatch (FakeTensor, DTensor,
// functorch wrappers), no sparse or nested layout.
bool plain_on(const at::Tensor& t, const at::Device& device) {
  return t.defined() && t.layout() == at::kStrided && t.device() == device &&
         !t.unsafeGetTensorImpl()->is_python_dispatch() &&
         !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::FuncTorchBatched,
                                                   c10::DispatchKey::Functionalize,
                                                   c10::DispatchKey::FuncTorchGradWrapper}));
}

// Min and max of integer ids, read on the host for CPU tensors (one pass, no ATen call) and with one
// device sync for CUDA tensors (what ops.py's aminmax did too).
template <typename index_t>
std::pair<int64_t, int64_t> host_range(const at::Tensor& t) {
  const index_t* p = t.const_data_ptr<index_t>();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    const int64_t v = static_cast<int64_t>(p[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  return {lo, hi};
}

std::pair<int64_t, int64_t> id_range(const at::Tensor& t) {
  if (t.is_cpu()) {
    const at::Tensor c = t.contiguous();
    return t.scalar_type() == at::kInt ? host_range<int32_t>(c) : host_range<int64_t>(c);
  }
  auto [lo, hi] = at::aminmax(t);
  return {lo.item<int64_t>(), hi.item<int64_t>()};
}

// The inputs a backend receives (ops.py's module docstring), or nullopt when ops.py must look.
struct Prepared {
  at::Tensor x, bias, A, B, C, task_ids;
};

std::optional<Prepared> prepare_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                     const at::Tensor& task_ids, std::optional<int64_t> owned_hi) {
  // x, and everything that must match it.
  if (!x.defined() || !is_float(x.scalar_type()) || x.dim() < 1) return std::nullopt;
  const at::Device device = x.device();
  if (!(device.is_cpu() || device.is_cuda()) || !plain_on(x, device)) return std::nullopt;
  if (at::autocast::is_autocast_enabled(device.type())) return std::nullopt;  // ops.py casts like F.linear
  const int64_t d_in = x.size(-1);
  if (!plain_on(weight, device) || weight.scalar_type() != x.scalar_type() || weight.dim() != 2 ||
      weight.size(1) != d_in || weight.requires_grad())
    return std::nullopt;
  const int64_t d_out = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias && (!plain_on(*bias, device) || bias->scalar_type() != x.scalar_type() || bias->dim() != 1 ||
                   bias->size(0) != d_out))
    return std::nullopt;
  for (const at::Tensor* f : {&A, &B, &C})
    if (!plain_on(*f, device) || !is_float(f->scalar_type()) || f->dim() != 2) return std::nullopt;
  const int64_t r = A.size(1), T = C.size(0);
  if (r == 0 || A.size(0) != d_out || B.size(0) != d_in || B.size(1) != r || C.size(1) != r) return std::nullopt;

  // Task ids: one per row (x.shape[:-1]), one per sample (x.shape[0],) or 0-d; an integer dtype that
  // needs no care (uint64, bool and floats go to ops.py).
  if (!plain_on(task_ids, device)) return std::nullopt;
  const at::ScalarType it = task_ids.scalar_type();
  if (!at::isIntegralType(it, /*includeBool=*/false) || it == at::kUInt64) return std::nullopt;
  // Narrow dtypes are widened once, before the broadcast: the kernels take int32/int64.
  const at::Tensor ids = (it == at::kInt || it == at::kLong) ? task_ids : task_ids.to(at::kLong);
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  at::Tensor rows;
  if (ids.sizes() == lead) {
    rows = ids;
  } else if (ids.dim() == 0 || (!lead.empty() && ids.dim() == 1 && ids.size(0) == lead[0])) {
    std::vector<int64_t> shape(lead.size(), 1);
    if (ids.dim() == 1) shape[0] = lead[0];
    rows = ids.reshape(shape).expand(lead);
  } else {
    return std::nullopt;
  }
  const int64_t rows_n = c10::multiply_integers(lead);
  const at::Tensor flat = rows.reshape({rows_n}).contiguous();
  if (owned_hi.has_value()) {
    if (*owned_hi >= T) return std::nullopt;
  } else if (rows_n > 0) {
    auto [lo, hi] = id_range(ids);  // the ids as the caller passed them: no bigger than the broadcast rows
    if (lo < -1 || hi >= T) return std::nullopt;
  }
  const at::ScalarType dt = x.scalar_type();
  auto in_dt = [dt](const at::Tensor& f) { return f.scalar_type() == dt ? f : f.to(dt); };  // no dispatch if equal
  return Prepared{x.reshape({rows_n, d_in}), has_bias ? bias->contiguous() : at::Tensor(), in_dt(A), in_dt(B),
                  in_dt(C), flat};
}

// y for cp_linear on the cpu or cuda backend, or None when ops.py must take the call.
py::object forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const at::Tensor& task_ids,
                   double scale, std::optional<int64_t> owned_hi) {
  std::optional<Prepared> p = prepare_impl(x, weight, bias, A, B, C, task_ids, owned_hi);
  if (!p) return py::none();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = weight.size(0);
  const std::optional<at::Tensor> b = p->bias.defined() ? std::optional<at::Tensor>(p->bias) : std::nullopt;
  // Without a graph to record (no_grad, or nothing requires grad), call the kernel below autograd: the
  // autograd kernel would still pack its inputs and make a context only to find nothing to track
  // (~1.5 µs, measured at the tiny shape).
  const bool record = at::GradMode::is_enabled() &&
                      (x.requires_grad() || A.requires_grad() || B.requires_grad() || C.requires_grad() ||
                       (b.has_value() && b->requires_grad()));
  at::Tensor y;
  {
    py::gil_scoped_release no_gil;  // like every ATen call from Python: other threads may run meanwhile
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!record) below_autograd.emplace();
    y = std::get<0>(fwd_op().call(p->x, weight, b, p->A, p->B, p->C, p->task_ids, scale)).view(out_shape);
  }
  return py::cast(y);
}

// The clean inputs for another backend's op (the Triton launchers), or None when ops.py must look:
// (x as (M, d_in), contiguous bias or None, A, B, C in x's dtype, task ids as a contiguous (M,) int tensor).
py::object prepare(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const at::Tensor& task_ids,
                   std::optional<int64_t> owned_hi) {
  std::optional<Prepared> p = prepare_impl(x, weight, bias, A, B, C, task_ids, owned_hi);
  if (!p) return py::none();
  py::object b = p->bias.defined() ? py::cast(p->bias) : py::none();
  return py::make_tuple(p->x, b, p->A, p->B, p->C, p->task_ids);
}

}  // namespace

TORCH_LIBRARY_IMPL(cpkernels, Autograd, m) { m.impl("cp_linear_fwd", &cp_linear_fwd_autograd); }

}  // namespace cpkernels

// Importing `cpkernels._C` runs the static registrations of every file (schemas in ops.cpp, kernels in
// cpu/ and cuda/, autograd above); the module itself exposes the eager host path.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &cpkernels::forward, "cp_linear on the cpu/cuda backend, or None when ops.py must check");
  m.def("prepare", &cpkernels::prepare, "the validated backend inputs, or None when ops.py must check");
}
