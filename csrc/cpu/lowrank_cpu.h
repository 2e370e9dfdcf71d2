// Fused rank-r products for the CPU backend (fp32), replacing MKL GEMMs whose inner or outer
// dimension is r (≤ a few dozen): see lowrank_cpu.cpp for why and what they cost.
#pragma once

#include <ATen/ATen.h>

namespace cpkernels {

// out = in·W, in (M, K) with unit column stride, W (K, r); out (M, r) fp32 contiguous.
// Used for u = x·B in forward and g = dY·A in backward. Returns false (and writes nothing)
// when the fused kernel does not apply (dtype other than fp32); the caller then uses at::mm.
bool lowrank_shrink(const at::Tensor& in, const at::Tensor& W, at::Tensor& out);

// out = bias + rows·Wᵀ, rows (M, r), W (N, r), bias (N) or undefined; out (M, N) fp32 contiguous,
// fully overwritten. When C is defined, row i first becomes scale · rows[i] ⊙ C[task_ids[i]]
// (zero for task id -1: "no adapter"), so the forward needs no separate gather pass.
// Returns false when the fused kernel does not apply; the caller then uses ATen.
bool lowrank_expand(const at::Tensor& rows, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& C, const at::Tensor& task_ids, double scale, at::Tensor& out);

}  // namespace cpkernels
