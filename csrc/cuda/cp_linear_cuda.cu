// CUDA backend of cp_linear: cuBLAS GEMMs (through ATen) for the matrix products, plus three
// small kernels for everything that depends on the per-row task id. Same math and passes as
// csrc/cpu/cp_linear_cpu.cpp:
//
// Forward   y = addmm(b, x, W0ᵀ)                  one GEMM, bias folded in
//           u = x·B                                skinny GEMM (M × r), saved for backward
//           v = s · u ⊙ C[t]                       scale_rows_kernel (gather + scale)
//           y += v·Aᵀ                              addmm with beta = 1: no M × d_out temporary
// Backward  g = dY·A                               skinny GEMM (M × r)
//           gs = s · g ⊙ C[t], v = s · u ⊙ C[t]    scale_rows_kernel, both in one pass
//           dC = s · Σ_{i: t_i = k} u_i ⊙ g_i      dc_partial_kernel + dc_reduce_kernel
//           dX = dY·W0 + gs·Bᵀ                     GEMM, then addmm with beta = 1
//           dA = dYᵀ·v,  dB = xᵀ·gs                GEMMs
//           db = Σ_i dY_i                          at::sum in fp32 (see below)
//
// The custom kernels accumulate in fp32 (double for float64 inputs) and round once on store.
//
// Determinism. No kernel uses float atomics. dC is a two-stage segment sum: stage 1 cuts the
// rows into chunks whose size depends on (M, T, r) only, and sums each chunk's rows in row order
// into that chunk's own (T × r) slot; stage 2 adds the slots in a fixed order. dC is therefore
// bitwise reproducible, on any GPU. db uses ATen's sum, whose CUDA reduction has no atomics
// either (multi-block sums go through a staging buffer reduced in a fixed order): reproducible
// run to run on one device, though the split (and so the last bits) may differ between GPU models.
//
// Task ids (cpkernels/task_ids.py). The kernels never look at the ids on the host: that would cost
// a device→host sync per call. A row whose id lies outside [0, T) is treated as -1, "no adapter":
// it reads nothing from C, gets no low-rank update (its v and gs rows are 0, so y = x·W0ᵀ + b and
// dX = dY·W0 for it) and adds nothing to dC. Nothing is read or written out of bounds. ops.py has
// already raised IndexError for any id other than -1 wherever a check can run; inside torch.compile
// graphs and CUDA-graph replays none can, and this mask is the semantics there.
//
// Pointers. Every raw pointer below addresses a tensor made contiguous here (C, t, u via
// .contiguous(), or fresh ATen outputs: v, gs, g, partial, dC); everything else (x, weight, bias,
// A, B, grad_y) reaches only ATen GEMMs and sums, which honour strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"

namespace cpkernels {
namespace {

// 256 threads: a common block size that keeps every SM busy for these memory-bound kernels.
constexpr int kThreads = 256;
// Grid-stride loops cover any size; 4096 × 256 threads is more than any current GPU holds at once.
constexpr int64_t kMaxBlocks = 4096;
// Loads and stores of 16 bytes are the widest single memory instructions.
constexpr int kVecBytes = 16;
// dC stage 1: one thread walks a chunk's rows one after another, so short chunks keep that loop
// short; stage 2 then adds ceil(M / 32) slots per entry. At M = 8192 that is 256 chunks, walked
// by 8 lanes of 32 each (kReduceLanes), so neither stage has a loop longer than ~32 steps.
constexpr int64_t kRowsPerChunk = 32;
// Cap on the partial-sum buffer (chunks × T × r accumulators, 16 MiB in fp32): many tasks times a
// large rank get longer chunks instead of more memory.
constexpr int64_t kMaxPartialElems = int64_t(1) << 22;
// Stage 1 keeps its accumulators in shared memory when they fit in the 48 KiB that every GPU
// grants a block without an opt-in; otherwise it accumulates in the chunk's global slot.
constexpr int64_t kSmemBytes = 48 * 1024;
// dC stage 2: 8 lanes per entry sum interleaved chunks, then lane sums are added in lane order.
constexpr int kReduceLanes = 8;
constexpr int kReduceEntries = 32;  // entries per block: one warp wide, so slot reads coalesce

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Vec {
  scalar_t v[kVec];
};

// out[base + j] = coef[j] · in[base + j] for the `valid` (≤ kVec) elements from base on.
template <typename scalar_t, int kVec>
__device__ __forceinline__ void scale_store(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                            const at::opmath_type<scalar_t> (&coef)[kVec], int64_t base, int valid) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, kVec>;
  if (valid == kVec) {  // the whole vector is in range: one 16-byte load and one store
    const vec_t x = *reinterpret_cast<const vec_t*>(in + base);
    vec_t y;
#pragma unroll
    for (int j = 0; j < kVec; ++j) y.v[j] = static_cast<scalar_t>(coef[j] * static_cast<acc_t>(x.v[j]));
    *reinterpret_cast<vec_t*>(out + base) = y;
  } else {  // the tail of the array (a constant trip count keeps coef in registers)
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      if (j < valid) out[base + j] = static_cast<scalar_t>(coef[j] * static_cast<acc_t>(in[base + j]));
  }
}

// out_a = s·in_a ⊙ C[t] and out_b = s·in_b ⊙ C[t] over (M, r) row-major arrays seen as flat
// arrays of n = M·r elements; pair b may be absent (null), pair a too. Each thread handles kVec
// consecutive elements, which may straddle rows (r need not be a multiple of kVec).
template <typename scalar_t, typename index_t, int kVec>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ in_a, scalar_t* __restrict__ out_a,
                                  const scalar_t* __restrict__ in_b, scalar_t* __restrict__ out_b,
                                  const scalar_t* __restrict__ C, const index_t* __restrict__ t, int64_t n,
                                  int64_t r, int64_t T, at::opmath_type<scalar_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; base < n;
       base += stride) {
    const int valid = static_cast<int>(std::min<int64_t>(kVec, n - base));
    // coef[j] = s · C[t_row, col] for element base + j, or 0 for a masked row.
    acc_t coef[kVec];
    int64_t row = base / r, col = base - row * r;
    int64_t task = static_cast<int64_t>(t[row]);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      coef[j] = acc_t(0);
      if (j < valid) {
        if (task >= 0 && task < T) coef[j] = s * static_cast<acc_t>(C[task * r + col]);
        if (++col == r) {  // the vector runs into the next row
          col = 0;
          if (j + 1 < valid) task = static_cast<int64_t>(t[++row]);
        }
      }
    }
    if (in_a) scale_store<scalar_t, kVec>(in_a, out_a, coef, base, valid);
    if (in_b) scale_store<scalar_t, kVec>(in_b, out_b, coef, base, valid);
  }
}

bool aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0; }

// Launches scale_rows_kernel for (u → v) and/or (g → gs); an undefined output skips its pair.
// Every operand is (M, r) contiguous except C (T, r) contiguous and t (M) contiguous.
void scale_rows(const at::Tensor& u, const at::Tensor& v, const at::Tensor& g, const at::Tensor& gs,
                const at::Tensor& C, const at::Tensor& t, double scale) {
  const bool do_a = v.defined(), do_b = gs.defined();
  const at::Tensor& any = do_a ? v : gs;
  if (!(do_a || do_b) || any.numel() == 0) return;
  const int64_t n = any.numel(), r = C.size(1), T = C.size(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, any.scalar_type(), "cp_linear_scale_rows", [&] {
    AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "cp_linear_scale_rows_ids", [&] {
      const scalar_t* in_a = do_a ? u.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* out_a = do_a ? v.mutable_data_ptr<scalar_t>() : nullptr;
      const scalar_t* in_b = do_b ? g.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* out_b = do_b ? gs.mutable_data_ptr<scalar_t>() : nullptr;
      const auto s = static_cast<at::opmath_type<scalar_t>>(scale);
      // Fresh ATen allocations are 16-byte aligned; a view passed in by a caller may not be.
      const bool vectorise = aligned(in_a) && aligned(out_a) && aligned(in_b) && aligned(out_b);
      auto launch = [&](auto vec_tag) {
        constexpr int kVec = decltype(vec_tag)::value;
        const int64_t blocks = std::min(kMaxBlocks, ceil_div(ceil_div(n, kVec), kThreads));
        scale_rows_kernel<scalar_t, index_t, kVec><<<blocks, kThreads, 0, stream>>>(
            in_a, out_a, in_b, out_b, C.const_data_ptr<scalar_t>(), t.const_data_ptr<index_t>(), n, r, T, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vectorise)
        launch(std::integral_constant<int, kVecBytes / static_cast<int>(sizeof(scalar_t))>{});
      else
        launch(std::integral_constant<int, 1>{});
    });
  });
}

// dC stage 1. Thread (k, lane) of block b owns column k of chunk b·blockDim.y + lane: it zeroes
// that column of the chunk's (T × r) accumulators, adds u[i,k]·g[i,k] into row t_i for the
// chunk's rows in order, and leaves the result in the chunk's slot of `partial`. No two threads
// touch one accumulator, so no atomics and no barriers are needed.
template <typename scalar_t, typename index_t>
__global__ void dc_partial_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ g,
                                  const index_t* __restrict__ t, at::opmath_type<scalar_t>* __restrict__ partial,
                                  int64_t M, int64_t r, int64_t T, int64_t rows_per_chunk, int64_t num_chunks,
                                  bool in_smem) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (chunk >= num_chunks) return;
  acc_t* slot = partial + chunk * T * r;
  acc_t* acc = in_smem ? reinterpret_cast<acc_t*>(smem_bytes) + threadIdx.y * T * r : slot;
  const int64_t begin = chunk * rows_per_chunk, end = std::min(M, begin + rows_per_chunk);
  for (int64_t k = threadIdx.x; k < r; k += blockDim.x) {
    for (int64_t task = 0; task < T; ++task) acc[task * r + k] = acc_t(0);
#pragma unroll 4
    for (int64_t i = begin; i < end; ++i) {
      const int64_t task = static_cast<int64_t>(t[i]);
      if (task < 0 || task >= T) continue;  // masked row: no contribution
      acc[task * r + k] += static_cast<acc_t>(u[i * r + k]) * static_cast<acc_t>(g[i * r + k]);
    }
    if (in_smem)
      for (int64_t task = 0; task < T; ++task) slot[task * r + k] = acc[task * r + k];
  }
}

// dC stage 2: dC[j] = s · Σ_chunks partial[chunk, j], j over the T·r entries. Lane l sums chunks
// l, l + 8, l + 16, ... in order; the 8 lane sums are then added in lane order. The summation
// order is fixed by these constants alone, so the result is bitwise reproducible.
template <typename scalar_t>
__global__ void dc_reduce_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ dC,
                                 int64_t entries, int64_t num_chunks, at::opmath_type<scalar_t> s) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t lane_sums[kReduceLanes][kReduceEntries];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kReduceEntries + threadIdx.x;
  acc_t sum = acc_t(0);
  if (j < entries)
    for (int64_t c = threadIdx.y; c < num_chunks; c += kReduceLanes) sum += partial[c * entries + j];
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < entries) {
    acc_t total = lane_sums[0][threadIdx.x];
    for (int l = 1; l < kReduceLanes; ++l) total += lane_sums[l][threadIdx.x];
    dC[j] = static_cast<scalar_t>(total * s);
  }
}

// dC (T, r) in u's dtype; u and g (M, r) contiguous, t (M) contiguous.
at::Tensor dc_segment_sum(const at::Tensor& u, const at::Tensor& g, const at::Tensor& t, int64_t T, double scale) {
  const int64_t M = u.size(0), r = u.size(1), entries = T * r;
  at::Tensor dC = at::empty({T, r}, u.options());
  if (entries == 0) return dC;
  // The chunking depends on (M, T, r) only, never on the device: that makes dC reproducible.
  int64_t rows_per_chunk = kRowsPerChunk;
  const int64_t max_chunks = std::max<int64_t>(1, kMaxPartialElems / entries);
  if (ceil_div(M, rows_per_chunk) > max_chunks) rows_per_chunk = ceil_div(M, max_chunks);
  const int64_t num_chunks = std::max<int64_t>(1, ceil_div(M, rows_per_chunk));  // M = 0: one empty chunk, dC = 0
  at::Tensor partial = at::empty({num_chunks, T, r}, u.options().dtype(at::toOpMathType(u.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "cp_linear_dc", [&] {
    AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "cp_linear_dc_ids", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // Threads along x are the r columns; chunks (lanes) along y fill the rest of the block.
      const int64_t bx = std::min<int64_t>(r, kThreads);
      int64_t lanes = std::min(kThreads / bx, num_chunks);
      const int64_t lane_bytes = entries * static_cast<int64_t>(sizeof(acc_t));
      const bool in_smem = lane_bytes <= kSmemBytes;
      if (in_smem) lanes = std::min(lanes, kSmemBytes / lane_bytes);
      const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(lanes));
      const size_t smem = in_smem ? static_cast<size_t>(lanes * lane_bytes) : 0;
      dc_partial_kernel<scalar_t, index_t><<<ceil_div(num_chunks, lanes), block, smem, stream>>>(
          u.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), t.const_data_ptr<index_t>(),
          partial.mutable_data_ptr<acc_t>(), M, r, T, rows_per_chunk, num_chunks, in_smem);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dc_reduce_kernel<scalar_t><<<ceil_div(entries, kReduceEntries), dim3(kReduceEntries, kReduceLanes), 0, stream>>>(
          partial.const_data_ptr<acc_t>(), dC.mutable_data_ptr<scalar_t>(), entries, num_chunks,
          static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dC;
}

std::tuple<at::Tensor, at::Tensor> cp_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                                      const at::Tensor& B, const at::Tensor& C,
                                                      const at::Tensor& task_ids, double scale) {
  check_cp_linear_args(x, weight, bias, A, B, C, task_ids);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  // A 1-D bias lets cuBLASLt add it in the GEMM epilogue instead of a broadcast copy first.
  if (bias.has_value())
    at::addmm_out(y, *bias, x, weight.t());
  else
    at::mm_out(y, x, weight.t());
  at::Tensor u = at::mm(x, B).contiguous();  // (M, r); contiguous already, scale_rows relies on it
  at::Tensor v = at::empty_like(u);
  scale_rows(u, v, at::Tensor(), at::Tensor(), C.contiguous(), task_ids.contiguous(), scale);
  y.addmm_(v, A.t());
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cp_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const at::Tensor& task_ids, const at::Tensor& u, double scale,
    std::array<bool, 5> mask) {
  check_cp_linear_bwd_args(grad_y, x, weight, A, B, C, task_ids, u);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t T = C.size(0);
  const auto [need_dx, need_dA, need_dB, need_dC, need_db] = mask;
  (void)need_db;  // db is the shared GEMM half's business

  const at::Tensor uc = u.contiguous(), Cc = C.contiguous(), t = task_ids.contiguous();
  at::Tensor g = at::mm(grad_y, A).contiguous();  // (M, r); contiguous already, the kernels rely on it
  at::Tensor gs = (need_dx || need_dB) ? at::empty_like(g) : at::Tensor();
  at::Tensor v = need_dA ? at::empty_like(g) : at::Tensor();
  scale_rows(uc, v, g, gs, Cc, t, scale);

  const at::Tensor dC = need_dC ? dc_segment_sum(uc, g, t, T, scale) : at::Tensor();
  return backward_gemms(grad_y, x, weight, B, gs, v, dC, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(cpkernels, CUDA, m) {
  m.impl("cp_linear_fwd", &cp_linear_fwd_cuda);
  m.impl("cp_linear_bwd", &cp_linear_bwd_cuda);
}

}  // namespace cpkernels
