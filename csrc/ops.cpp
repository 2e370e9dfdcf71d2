// The one place where the cpkernels operator schemas are defined.
//
// Each backend file registers kernels for these schemas (csrc/cpu for the CPU dispatch key,
// csrc/cuda for CUDA). Fake (meta) kernels are registered from Python, in cpkernels/ops.py, which is
// the single source of truth for the op contract; the autograd of cp_linear_fwd is C++ (host.cpp).
#include <torch/library.h>

// The Python module `cpkernels._C` (its init function and the eager host path) is defined in host.cpp.
TORCH_LIBRARY(cpkernels, m) {
  // x (M, d_in), weight (d_out, d_in), bias (d_out)?, A (d_out, r), B (d_in, r), C (T, r),
  // task_ids (M) int32/int64. Returns y (M, d_out) and u = x·B (M, r), saved for backward.
  m.def("cp_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor C, Tensor task_ids, "
        "float scale) -> (Tensor, Tensor)");
  // output_mask selects (dx, dA, dB, dC, db); a masked-off gradient comes back as an empty tensor.
  m.def("cp_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor C, Tensor task_ids, "
        "Tensor u, float scale, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
