// Fused rank-r products of the CPU backend, fp32: u = x·B (shrink) and y = b + v·Aᵀ (expand).
//
// Why: these are GEMMs with one dimension equal to r (8-16). MKL runs them far below the machine's
// speed: on the 2-core dev VM, u = x·B at M = 2048, d = 768, r = 8 took 2.1 ms against 25 ms for the
// whole x·W0ᵀ (8% of the time for 1% of the FLOPs), and seeding y with v·[A|b]ᵀ took 1.2 ms where
// writing the bias alone takes 0.4 ms. Both are memory-bound passes that need one read of x (or one
// write of y) and a few FMAs per element: one pass each, with the small operand kept in L1.
//
// PREDICTION (written before measuring; issue 15): at cpu-bert (2048×768→768, r = 8, 2 threads)
//   shrink  2.1 ms -> ~0.3 ms (reading x once at ~20 GB/s), expand 1.2 ms -> ~0.4 ms (bias-copy speed);
//   forward  1.11× -> ~1.02-1.04× F.linear; forward+backward 1.16-1.24× -> ~1.08× (g = dY·A and the
//   dX seed gs·Bᵀ use the same two kernels; dA, dB stay MKL GEMMs with K = M);
//   decode (M = 16) op time -> ~-30 µs (two 20 µs MKL calls become ~2 µs loops), which does not
//   reach 1.3× alone: the rest of its gap is the Python op layer (ops.py), measured separately.
//
// Vectors: GCC/Clang vector extensions (8 floats = one 256-bit register), compiled three times by
// target_clones (x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, baseline SSE2) and picked at load time by
// the CPU's feature bits. (Not "arch=haswell" or "arch=skylake-avx512": those test the CPU *model*, so an
// AMD EPYC with AVX-512 got the SSE2 clone, 2× slower than MKL.) Other compilers and other dtypes fall
// back to the ATen GEMMs (the functions return false).
#include "lowrank_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace cpkernels {

#if defined(__GNUC__) && defined(__x86_64__)
#define CPK_VECTOR_KERNELS 1
#define CPK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPK_VECTOR_KERNELS 0
#endif

#if CPK_VECTOR_KERNELS
// ISO C++ (torch builds with -std=c++20) turns GCC's multiply-add contraction off: allow it here so that
// `acc += a * w` becomes one FMA on CPUs that have it (half the arithmetic µops of the inner loops).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif
// The vector helpers return 32-byte vectors by value; they are always inlined into the clones, so the
// baseline ABI note GCC gives for them (-Wpsabi) concerns no real call.
#pragma GCC diagnostic ignored "-Wpsabi"
namespace {

typedef float v8f __attribute__((vector_size(32)));
// The same vector read from or written to memory with no alignment promise (rows of x start anywhere).
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
constexpr int64_t kLanes = 8;

inline v8f load(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store(float* p, v8f v) { *reinterpret_cast<v8u*>(p) = v; }

// Rows handled together by the shrink: 8 independent FMA chains cover the FMA latency
// (4 cycles × 2 FMA ports), and each 8-column slice of W is loaded once for 8 rows.
constexpr int64_t kShrinkRows = 8;
// Output columns per expand step: 8 vectors of accumulators, loaded once per rank component.
constexpr int64_t kExpandCols = 8 * kLanes;
// Rows per parallel task: ~64 rows × d floats is 100-200 KB of input, large against the cost of a
// task; M = 16 (decode) then runs on the calling thread, with no thread hand-off at all.
constexpr int64_t kRowsPerTask = 64;

// The shrink sums K products per output in two levels, K_BLOCK at a time and then the block sums: a
// plain running sum over K = d (hundreds to thousands) lets the fp32 rounding error grow with K and lost to
// MKL's blocked sums (grad B 6.3e-6 against plain torch's 1.4e-6 at d_out = 130 in test_cpu_backend).
constexpr int64_t kSumBlock = 32;

// out[i, c0:c0+8] for rows [0, rows) of one 8-column slice. in has row stride ld; Wp is (K, rp) with
// rp a multiple of 8 (zero padded), out is (rows, r) and gets only its r real columns.
CPK_CLONES void shrink_rows(const float* in, int64_t ld, const float* Wp, int64_t K, int64_t rp, float* out,
                            int64_t r, int64_t rows) {
  for (int64_t c0 = 0; c0 < rp; c0 += kLanes) {
    const int64_t ncol = std::min(kLanes, r - c0);
    int64_t i = 0;
    for (; i + kShrinkRows <= rows; i += kShrinkRows) {
      v8f total[kShrinkRows] = {};
      const float* x = in + i * ld;
      for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
        v8f acc[kShrinkRows] = {};
        const int64_t k1 = std::min(K, k0 + kSumBlock);
        for (int64_t k = k0; k < k1; ++k) {
          const v8f w = load(Wp + k * rp + c0);
#pragma GCC unroll 8
          for (int64_t j = 0; j < kShrinkRows; ++j) acc[j] += x[j * ld + k] * w;
        }
#pragma GCC unroll 8
        for (int64_t j = 0; j < kShrinkRows; ++j) total[j] += acc[j];
      }
      for (int64_t j = 0; j < kShrinkRows; ++j) {
        float tmp[kLanes];
        store(tmp, total[j]);
        std::memcpy(out + (i + j) * r + c0, tmp, ncol * sizeof(float));
      }
    }
    for (; i < rows; ++i) {  // the last rows % 8
      v8f total = {};
      const float* x = in + i * ld;
      for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
        v8f acc = {};
        const int64_t k1 = std::min(K, k0 + kSumBlock);
        for (int64_t k = k0; k < k1; ++k) acc += x[k] * load(Wp + k * rp + c0);
        total += acc;
      }
      float tmp[kLanes];
      store(tmp, total);
      std::memcpy(out + i * r + c0, tmp, ncol * sizeof(float));
    }
  }
}

// out[i, :] = bias + Σ_j v[i, j] · Wt[j, :] for rows [0, rows); v (rows, r), Wt (r, N), out (rows, N).
// Columns go in tiles of 64 (outer loop) so that a tile of Wt (r × 256 B) stays in L1 for every row.
CPK_CLONES void expand_rows(const float* v, int64_t r, const float* Wt, int64_t N, const float* bias, float* out,
                            int64_t rows) {
  int64_t n0 = 0;
  for (; n0 + kExpandCols <= N; n0 += kExpandCols) {
    for (int64_t i = 0; i < rows; ++i) {
      v8f acc[8];
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) acc[q] = bias ? load(bias + n0 + q * kLanes) : v8f{};
      const float* vi = v + i * r;
      for (int64_t j = 0; j < r; ++j) {
        const float a = vi[j];
        const float* w = Wt + j * N + n0;
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) acc[q] += a * load(w + q * kLanes);
      }
      float* o = out + i * N + n0;
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) store(o + q * kLanes, acc[q]);
    }
  }
  if (n0 < N) {  // the last N % 64 columns
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t n = n0; n < N; ++n) {
        float acc = bias ? bias[n] : 0.f;
        for (int64_t j = 0; j < r; ++j) acc += v[i * r + j] * Wt[j * N + n];
        out[i * N + n] = acc;
      }
    }
  }
}

// dst (r, N) = srcᵀ for a row-major src (N, r): 8 × 8 blocks through registers (three rounds of
// shuffles, the AVX unpack / shuffle / permute pattern), the edges one element at a time. The expand reads
// A as Wt rows; making Wt per call is O(N·r), the same order as the expand itself at M = 1, so it must be
// cheap: a scalar loop took ~3 µs at N = 1376, r = 8, ATen's strided copy 11 µs (measured, decode shapes).
typedef int v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define CPK_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CPK_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

CPK_CLONES void transpose(const float* src, int64_t N, int64_t r, float* dst) {
  const int64_t n8 = N / kLanes * kLanes, r8 = r / kLanes * kLanes;
  for (int64_t n0 = 0; n0 < n8; n0 += kLanes) {
    for (int64_t j0 = 0; j0 < r8; j0 += kLanes) {
      v8f x[8], t[8], u[8];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) x[k] = load(src + (n0 + k) * r + j0);
#pragma GCC unroll 4
      for (int k = 0; k < 8; k += 2) {  // pairs of rows, interleaved within 128-bit halves
        t[k] = CPK_SHUFFLE(x[k], x[k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[k + 1] = CPK_SHUFFLE(x[k], x[k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
#pragma GCC unroll 2
      for (int k = 0; k < 8; k += 4) {  // 64-bit pairs: four rows per column and half
        u[k] = CPK_SHUFFLE(t[k], t[k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[k + 1] = CPK_SHUFFLE(t[k], t[k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[k + 2] = CPK_SHUFFLE(t[k + 1], t[k + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[k + 3] = CPK_SHUFFLE(t[k + 1], t[k + 3], 2, 3, 10, 11, 6, 7, 14, 15);
      }
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {  // 128-bit halves: rows 0-3 with rows 4-7 of columns k and k + 4
        store(dst + (j0 + k) * N + n0, CPK_SHUFFLE(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11));
        store(dst + (j0 + k + 4) * N + n0, CPK_SHUFFLE(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15));
      }
    }
    for (int64_t n = n0; n < n0 + kLanes; ++n)
      for (int64_t j = r8; j < r; ++j) dst[j * N + n] = src[n * r + j];
  }
  for (int64_t n = n8; n < N; ++n)
    for (int64_t j = 0; j < r; ++j) dst[j * N + n] = src[n * r + j];
}

// v[i, :] = s · u[i, :] ⊙ C[t_i, :]; a row whose id is -1 ("no adapter") or otherwise outside [0, T)
// gets zeros (the op layer raised for the latter already; this only keeps any caller in bounds).
template <typename index_t>
void gather_rows(const float* u, const float* C, int64_t T, const index_t* t, float s, float* v, int64_t r,
                 int64_t rows) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t task = static_cast<int64_t>(t[i]);
    if (task < 0 || task >= T) {
      std::fill(v + i * r, v + (i + 1) * r, 0.f);
      continue;
    }
    const float* c = C + task * r;
    for (int64_t k = 0; k < r; ++k) v[i * r + k] = s * u[i * r + k] * c[k];
  }
}

}  // namespace

bool lowrank_shrink(const at::Tensor& in, const at::Tensor& W, at::Tensor& out) {
  if (in.scalar_type() != at::kFloat || W.scalar_type() != at::kFloat) return false;
  const int64_t M = in.size(0), K = in.size(1), r = W.size(1);
  const at::Tensor x = in.stride(1) == 1 && in.stride(0) >= K ? in : in.contiguous();
  const int64_t ld = x.stride(0), rp = (r + kLanes - 1) / kLanes * kLanes;
  // W padded to a multiple of 8 columns (K × rp floats: 24 KB at d = 768, r = 8) so every slice is a
  // full vector; at r = 8, 16, ... a contiguous W is used as it is.
  at::Tensor Wp = W;
  if (rp != r || !W.is_contiguous()) {
    Wp = at::zeros({K, rp}, W.options());
    Wp.narrow(1, 0, r).copy_(W);
  }
  out = at::empty({M, r}, in.options());
  const float* px = x.const_data_ptr<float>();
  const float* pw = Wp.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t b, int64_t e) {
    shrink_rows(px + b * ld, ld, pw, K, rp, po + b * r, r, e - b);
  });
  return true;
}

bool lowrank_expand(const at::Tensor& rows, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& C, const at::Tensor& task_ids, double scale, at::Tensor& out) {
  if (rows.scalar_type() != at::kFloat || W.scalar_type() != at::kFloat) return false;
  const int64_t M = rows.size(0), r = rows.size(1), N = W.size(0);
  const at::Tensor u = rows.contiguous();
  // Wt = Wᵀ (r, N), made once per call (see transpose; W.t().contiguous() cost 7 µs at N = 768, r = 8).
  at::Tensor Wt = at::empty({r, N}, W.options());
  const at::Tensor Wc = W.contiguous();
  transpose(Wc.const_data_ptr<float>(), N, r, Wt.mutable_data_ptr<float>());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const bool gather = C.defined();
  const at::Tensor Cc = gather ? C.contiguous() : C, t = gather ? task_ids.contiguous() : task_ids;
  out = at::empty({M, N}, rows.options());
  const float* pu = u.const_data_ptr<float>();
  const float* pw = Wt.const_data_ptr<float>();
  const float* pb = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> vbuf;  // the gathered rows of one task: (kRowsPerTask × r), in L1
    for (int64_t i0 = begin; i0 < end; i0 += kRowsPerTask) {
      const int64_t n = std::min(kRowsPerTask, end - i0);
      const float* v = pu + i0 * r;
      if (gather) {
        vbuf.resize(n * r);
        AT_DISPATCH_INDEX_TYPES(t.scalar_type(), "lowrank_expand_gather", [&] {
          gather_rows<index_t>(pu + i0 * r, Cc.const_data_ptr<float>(), Cc.size(0), t.const_data_ptr<index_t>() + i0,
                               static_cast<float>(scale), vbuf.data(), r, n);
        });
        v = vbuf.data();
      }
      expand_rows(v, r, pw, N, pb, po + i0 * N, n);
    }
  });
  return true;
}

#else  // no GCC/Clang vector extensions on x86-64: the ATen GEMMs do the work

bool lowrank_shrink(const at::Tensor&, const at::Tensor&, at::Tensor&) { return false; }
bool lowrank_expand(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                    const at::Tensor&, double, at::Tensor&) {
  return false;
}

#endif

}  // namespace cpkernels
