"""Fused Triton forward of cp_linear:  Y = X·W0ᵀ + b + s·((X·B) ⊙ C[t])·Aᵀ,  and u = X·B for backward.

Design
------
One operation, the low-rank GEMM  out = a·w + bias + s·((a·p) ⊙ C[t])·qᵀ  for an (M × K) input `a`
and a (K × N) operand `w` given by strides. The forward uses it with (a, w, p, q) = (X, W0ᵀ, B, A);
the backward reuses it for dX with (dY, W0, A, B) (see backward.py). `lowrank_gemm` runs it with
one of three kernels, read in this order below:

* `_lowrank_gemm_kernel`: pointer loads, autotuned; every GPU, any strides (the fallback).
* `_tma_gemm_kernel`: TMA descriptors, persistent grid, wgmma; sm_90, 16-bit, M > 64 (its header
  holds the predicted ratio to cuBLAS).
* `_splitk_partial_kernel` + `_splitk_epilogue_kernel`: decode (M ≤ 64), K split so every SM streams W.

The rank-r part enters in one of two ways, chosen per call by `uses_shrink_pass`:

* in-loop (SHRINK_PASS = False): every output tile also accumulates its rows of a·p (`proj`) in the
  same K loop, on the a-tile that is already loaded, then adds (proj ⊙ C[t])·qᵀ to its accumulator
  in the epilogue. One launch, one read of X. The price: proj is recomputed by each of the
  N/BLOCK_N column tiles, i.e. R_PAD/BLOCK_N extra MMA work (6% at r = 16, BLOCK_N = 256).
* shrink pass (SHRINK_PASS = True; `_shrink_kernel`, as in LoRAFusion): a light kernel writes proj
  once (M × r); the GEMM then reads it in the epilogue, looping over the rank in chunks, so any r
  works. The price: one more read of X plus a launch, about (matmul FLOP/s ÷ HBM bytes/s)/N ≈ 230/N
  of the GEMM on an H100 (5.5% at N = 4096, 2% at N = 11008).
Prediction (no GPU was available when this was written; bench/ measures both, `shrink_pass=`
forces either): in-loop wins at r ≤ 16 for N ≤ 4096 and at every small M (the GEMM is bound by
reading W there, so the extra MMA is free); the shrink pass wins at r ≥ 32 or N ≥ 8k.

Cost model at the llm shape (M = 8192, d_in = d_out = 4096, r = 16, bf16):
  base GEMM 2·M·d_in·d_out = 275 GFLOP (0.35 ms at the measured cuBLAS rate); bytes X 64 MiB +
  W0 32 MiB + Y 64 MiB = 160 MiB (55 µs at 3 TB/s), so it is compute bound by 6×.
  The rank-r work proper is 2·M·r·(d_in + d_out) = 2.1 GFLOP (0.8%) and u is 256 KiB.
  In-loop adds 17 GFLOP of MMA (6.25%); the shrink pass adds 64 MiB of reads (≈ 22 µs, 6%).
  What moves the total most is the GEMM itself: a pointer-based Triton GEMM measured 1.09–1.70×
  cuBLAS on these shapes (BENCHMARKS.md); the TMA kernel is predicted at 1.05–1.11× (see its header).

Task ids: a row whose id is outside [0, T) (-1: "no adapter") loads its C row as zeros, so it gets
exactly y = x·W0ᵀ + b, and nothing is ever read out of bounds. The cost is two integer compares per
row and a mask on a (BLOCK_M × r) gather, nothing measurable. ops.py additionally raises
IndexError on ids ≥ T before the launch.

Strides: every kernel addresses every operand through the strides it is given (a strided or
expanded bias included); only the launchers' own workspaces are assumed contiguous.

Precision: fp32 accumulation everywhere; fp32 inputs go through tf32 only when
torch.backends.cuda.matmul.allow_tf32 is set, and plain fp32 goes to cuBLAS (common.uses_cublas).
Under torch.are_deterministic_algorithms_enabled() a fixed tile config replaces autotuning, so the
summation order (and every bit) is the same in every process on the same GPU model; the kernels
use no atomics in any mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (cdiv, check_dtype, config, current_smem_limit, gemm_smem_bytes, is_interpreted, launch, launch_tuned,
                     next_power_of_2, precision, rank_blocks, target_arch, tune_key, uses_cublas, vector_aligned)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _lowrank_gemm_kernel(
    a_ptr, w_ptr, p_ptr, q_ptr, c_ptr, t_ptr, bias_ptr, out_ptr, proj_ptr,
    M, N, K, R, T, scale,
    stride_am, stride_ak, stride_wk, stride_wn, stride_pk, stride_pr, stride_qn, stride_qr,
    stride_ct, stride_cr, stride_t, stride_bias, stride_om, stride_on, stride_projm, stride_projr,
    # Only an autotune key (the best tile depends on M's order of magnitude, not on M); not
    # specialised, so its values do not multiply the compiled variants.
    M_BUCKET,
    HAS_BIAS: tl.constexpr, SHRINK_PASS: tl.constexpr, PRECISION: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = a·w + bias + scale·((a·p) ⊙ C[t])·qᵀ; proj = a·p is read (SHRINK_PASS) or written."""
    # Grouped ordering: GROUP_M row blocks walk the column tiles together, so the w tiles they
    # share are still in L2 when the next row block needs them.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tl.swizzle2d(pid // grid_n, pid % grid_n, grid_m, grid_n, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows/columns wrap onto valid ones, so the K loop needs no M/N masks (the stores drop
    # them). int64: M·stride can pass 2³¹ (10⁶ rows of 4096).
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    rk = tl.arange(0, R_BLOCK)

    # The K loop: acc = a·w and, in-loop, proj = a·p on the a-tile already in registers.
    a_ptrs = a_ptr + rows_in[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + ks[:, None] * stride_wk + cols_in[None, :] * stride_wn
    p_ptrs = p_ptr + ks[:, None] * stride_pk + rk[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    proj = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if not SHRINK_PASS:
            p = tl.load(p_ptrs, mask=(ks[:, None] < k_left) & (rk[None, :] < R), other=0.0)
            proj = tl.dot(a, p, proj, input_precision=PRECISION)
            p_ptrs += BLOCK_K * stride_pk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: acc += scale·(proj ⊙ C[t])·qᵀ. A task id outside [0, T) (-1: "no adapter") masks its
    # C row to zeros, so that row gets exactly a·w + bias and nothing is read out of bounds.
    task = tl.load(t_ptr + rows_in * stride_t)
    task_ok = (task >= 0) & (task < T)
    if SHRINK_PASS:
        # Rank chunks keep the epilogue's registers bounded for any r. num_stages=1: a pipelined
        # loop would double-buffer the q chunk in shared memory (+33 KiB at 128×256, bf16), which
        # is what pushed fp32 and wide-rank configs past 227 KiB.
        for r0 in tl.range(0, R, R_BLOCK, num_stages=1):
            rr = r0 + rk
            proj_chunk = tl.load(proj_ptr + rows_in[:, None] * stride_projm + rr[None, :] * stride_projr,
                                 mask=rr[None, :] < R, other=0.0)
            acc = _add_lowrank(acc, proj_chunk, c_ptr, q_ptr, task, task_ok, rr, cols_in, R, scale,
                               stride_ct, stride_cr, stride_qn, stride_qr, a_ptr.dtype.element_ty, PRECISION)
    else:
        acc = _add_lowrank(acc, proj, c_ptr, q_ptr, task, task_ok, rk, cols_in, R, scale,
                           stride_ct, stride_cr, stride_qn, stride_qr, a_ptr.dtype.element_ty, PRECISION)
        if pid_n == 0:  # every column tile computed the same rows of a·p; one of them stores it
            proj_ptrs = proj_ptr + rows.to(tl.int64)[:, None] * stride_projm + rk[None, :] * stride_projr
            tl.store(proj_ptrs, proj.to(proj_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (rk[None, :] < R))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in * stride_bias).to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _add_lowrank(acc, proj, c_ptr, q_ptr, task, task_ok, rr, cols, R, scale,
                 stride_ct, stride_cr, stride_qn, stride_qr, IN_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + scale·(proj ⊙ C[task])·q[cols]ᵀ over the rank columns rr (masked to < R and to good ids)."""
    c = tl.load(c_ptr + task[:, None] * stride_ct + rr[None, :] * stride_cr,
                mask=task_ok[:, None] & (rr[None, :] < R), other=0.0)
    # v in the input dtype: the second MMA runs at the same rate as the main one.
    v = (proj.to(tl.float32) * c.to(tl.float32) * scale).to(IN_DTYPE)
    q = tl.load(q_ptr + rr[:, None] * stride_qr + cols[None, :] * stride_qn, mask=rr[:, None] < R, other=0.0)
    return tl.dot(v, q.to(IN_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def _shrink_kernel(
    a_ptr, p_ptr, proj_ptr, M, K, R,
    stride_am, stride_ak, stride_pk, stride_pr, stride_projm, stride_projr,
    PRECISION: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """proj = a·p (M × R): one read of a, fp32 accumulation; grid (row blocks, rank chunks)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_in = (rows % M).to(tl.int64)
    rr = pid_r * R_BLOCK + tl.arange(0, R_BLOCK)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_in[:, None] * stride_am + ks[None, :] * stride_ak
    p_ptrs = p_ptr + ks[:, None] * stride_pk + rr[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        p = tl.load(p_ptrs, mask=(ks[:, None] < k_left) & (rr[None, :] < R), other=0.0)
        acc = tl.dot(a, p.to(a.dtype), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        p_ptrs += BLOCK_K * stride_pk
    proj_ptrs = proj_ptr + rows.to(tl.int64)[:, None] * stride_projm + rr[None, :] * stride_projr
    tl.store(proj_ptrs, acc.to(proj_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (rr[None, :] < R))


# ------------------------------------------------------------------------------------------------
# The Hopper GEMM: TMA descriptors and a persistent grid (sm_90, 16-bit, M > 64)
# ------------------------------------------------------------------------------------------------
# Prediction, written before it was built (no GPU yet; bench/ measures it, `python -m
# cpkernels._triton.aot` proves it compiles to wgmma + cp.async.bulk.tensor for sm_90):
#   * GEMM alone (no rank-r work) at M = 8192, d = 4096, bf16: 1.05–1.11× cuBLAS time. Tutorial 09's
#     TMA + persistent kernel reaches 0.92–0.97× cuBLAS throughput on H100 with warp specialisation
#     and a split epilogue; this one has neither (they need triton ≥ 3.4-only features and the
#     device runs 3.6 but the kernel must also build on older minors), so its epilogue (a 64 KiB
#     tile store, ~2 µs of a ~20 µs tile at K = 4096) is not hidden: about 3–5% more.
#   * llm forward (r = 16, in-loop): + 6.25% MMA for a·p (R_BLOCK/BLOCK_N = 16/256) on the tensor
#     cores, and the p tile comes through pointer loads (1 KiB per K step, L2-resident): 1.10–1.18×
#     cuBLAS's x·W0ᵀ, against 1.09–1.70× for the pointer kernel (BENCHMARKS.md).
#   * The persistent grid (one CTA per SM, tiles in grouped order) removes the wave quantisation of
#     the pointer kernel: 8192×4096 is 32×16 = 512 tiles of 128×256, 3.9 waves of 132 → at most 2% idle.
# Why TMA: the pointer kernel spends 200–246 registers on address arithmetic and masks; TMA moves
# tiles with one thread, zero-fills the edges (no masks, no wrap-around) and frees registers for
# the 128×256 fp32 accumulator (128 registers per thread at 8 warps).
@triton.jit
def _tma_gemm_kernel(
    a_desc, w_desc, out_desc, p_ptr, q_ptr, c_ptr, t_ptr, bias_ptr, proj_ptr,
    M, N, K, R, T, scale, num_programs,
    stride_pk, stride_pr, stride_qn, stride_qr, stride_ct, stride_cr, stride_t, stride_bias,
    stride_projm, stride_projr,
    HAS_BIAS: tl.constexpr, SHRINK_PASS: tl.constexpr, W_IS_NK: tl.constexpr, PRECISION: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """The same op as _lowrank_gemm_kernel; a, w and out move through TMA descriptors.

    w is described as stored: (N × K) when W_IS_NK (the forward's W0, read transposed), else (K × N).
    Each program walks tiles pid, pid + num_programs, ... (persistent grid).
    """
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    ks = tl.arange(0, BLOCK_K)
    rk = tl.arange(0, R_BLOCK)
    for tile in range(tl.program_id(0), grid_m * grid_n, num_programs):
        pid_m, pid_n = tl.swizzle2d(tile // grid_n, tile % grid_n, grid_m, grid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        proj = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
        # TMA zero-fills rows ≥ M and k ≥ K: the loop needs no masks.
        for k in range(0, k_steps):
            a = a_desc.load([off_m, k * BLOCK_K])
            if W_IS_NK:
                w = w_desc.load([off_n, k * BLOCK_K]).T
            else:
                w = w_desc.load([k * BLOCK_K, off_n])
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            if not SHRINK_PASS:  # p (K × r) is small and L2-resident: pointer loads, no descriptor
                kk = k * BLOCK_K + ks
                p = tl.load(p_ptr + kk.to(tl.int64)[:, None] * stride_pk + rk[None, :] * stride_pr,
                            mask=(kk[:, None] < K) & (rk[None, :] < R), other=0.0)
                proj = tl.dot(a, p.to(a.dtype), proj, input_precision=PRECISION)

        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        rows_in = tl.where(row_ok, rows, 0).to(tl.int64)
        cols_in = tl.where(cols < N, cols, 0).to(tl.int64)
        task = tl.load(t_ptr + rows_in * stride_t)
        task_ok = row_ok & (task >= 0) & (task < T)
        if SHRINK_PASS:
            for r0 in tl.range(0, R, R_BLOCK, num_stages=1):
                rr = r0 + rk
                proj_chunk = tl.load(proj_ptr + rows_in[:, None] * stride_projm + rr[None, :] * stride_projr,
                                     mask=rr[None, :] < R, other=0.0)
                acc = _add_lowrank(acc, proj_chunk, c_ptr, q_ptr, task, task_ok, rr, cols_in, R, scale,
                                   stride_ct, stride_cr, stride_qn, stride_qr, out_desc.dtype, PRECISION)
        else:
            acc = _add_lowrank(acc, proj, c_ptr, q_ptr, task, task_ok, rk, cols_in, R, scale,
                               stride_ct, stride_cr, stride_qn, stride_qr, out_desc.dtype, PRECISION)
            if pid_n == 0:
                tl.store(proj_ptr + rows_in[:, None] * stride_projm + rk[None, :] * stride_projr,
                         proj.to(proj_ptr.dtype.element_ty), mask=row_ok[:, None] & (rk[None, :] < R))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_in * stride_bias).to(tl.float32)[None, :]
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))  # TMA drops rows ≥ M, columns ≥ N


# ------------------------------------------------------------------------------------------------
# Decode (M ≤ 64): split-K with a deterministic reduction
# ------------------------------------------------------------------------------------------------
# At M ≤ 64 the GEMM streams W once and is bound by HBM; 4096 columns in tiles of 64 are only 64
# programs for 132 SMs. Splitting K over S programs per column tile gives S·64 programs; each writes
# an fp32 partial (S·M·N·4 bytes: 1.3 MiB at M = 16, N = 4096, S = 5, against 32 MiB of W), and a
# second kernel sums them in split order (the same bits every run: no atomics), then adds the
# rank-r term and the bias. Only the first column of programs computes a·p, so B is read once.
@triton.jit
def _splitk_partial_kernel(
    a_ptr, w_ptr, p_ptr, ws_ptr, ws_proj_ptr, M, N, K, R, k_per_split,
    stride_am, stride_ak, stride_wk, stride_wn, stride_pk, stride_pr,
    SHRINK_PASS: tl.constexpr, PRECISION: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """ws[split] = a[:, ks]·w[ks, :] (and ws_proj[split] = a[:, ks]·p[ks, :] in column 0) for this split's ks."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    rk = tl.arange(0, R_BLOCK)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    with_proj = (not SHRINK_PASS) and pid_n == 0
    a_ptrs = a_ptr + rows_in[:, None] * stride_am + (k_start + ks)[None, :].to(tl.int64) * stride_ak
    w_ptrs = w_ptr + (k_start + ks)[:, None].to(tl.int64) * stride_wk + cols_in[None, :] * stride_wn
    p_ptrs = p_ptr + (k_start + ks)[:, None].to(tl.int64) * stride_pk + rk[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    proj = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        k_left = k_end - k
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if with_proj:
            p = tl.load(p_ptrs, mask=(ks[:, None] < k_left) & (rk[None, :] < R), other=0.0)
            proj = tl.dot(a, p.to(a.dtype), proj, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        p_ptrs += BLOCK_K * stride_pk
    # The workspaces are contiguous (allocated by the launcher): [split, row, column].
    rows64 = rows.to(tl.int64)
    split64 = split.to(tl.int64)
    tl.store(ws_ptr + (split64 * M + rows64[:, None]) * N + cols[None, :], acc,
             mask=(rows < M)[:, None] & (cols < N)[None, :])
    if with_proj:
        tl.store(ws_proj_ptr + (split64 * M + rows64[:, None]) * R + rk[None, :], proj,
                 mask=(rows < M)[:, None] & (rk[None, :] < R))


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, ws_proj_ptr, q_ptr, c_ptr, t_ptr, bias_ptr, out_ptr, proj_ptr,
    M, N, R, T, scale, n_split,
    stride_qn, stride_qr, stride_ct, stride_cr, stride_t, stride_bias, stride_om, stride_on,
    stride_projm, stride_projr,
    HAS_BIAS: tl.constexpr, SHRINK_PASS: tl.constexpr, PRECISION: tl.constexpr, IN_DTYPE: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = Σ_split ws + scale·(proj ⊙ C[t])·qᵀ + bias, summed in split order."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    rk = tl.arange(0, R_BLOCK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(0, n_split):
        acc += tl.load(ws_ptr + (split * M + rows_in[:, None]) * N + cols_in[None, :])
    task = tl.load(t_ptr + rows_in * stride_t)
    task_ok = (task >= 0) & (task < T)
    if SHRINK_PASS:
        for r0 in tl.range(0, R, R_BLOCK, num_stages=1):
            rr = r0 + rk
            proj_chunk = tl.load(proj_ptr + rows_in[:, None] * stride_projm + rr[None, :] * stride_projr,
                                 mask=rr[None, :] < R, other=0.0)
            acc = _add_lowrank(acc, proj_chunk, c_ptr, q_ptr, task, task_ok, rr, cols_in, R, scale,
                               stride_ct, stride_cr, stride_qn, stride_qr, IN_DTYPE, PRECISION)
    else:
        proj = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
        for split in range(0, n_split):
            proj += tl.load(ws_proj_ptr + (split * M + rows_in[:, None]) * R + rk[None, :],
                            mask=rk[None, :] < R, other=0.0)
        acc = _add_lowrank(acc, proj, c_ptr, q_ptr, task, task_ok, rk, cols_in, R, scale,
                           stride_ct, stride_cr, stride_qn, stride_qr, IN_DTYPE, PRECISION)
        if pid_n == 0:
            tl.store(proj_ptr + rows.to(tl.int64)[:, None] * stride_projm + rk[None, :] * stride_projr,
                     proj.to(proj_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (rk[None, :] < R))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in * stride_bias).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


# ------------------------------------------------------------------------------------------------
# Tile configs
# ------------------------------------------------------------------------------------------------
# 16-bit, M > 64: compute bound. Wide Hopper tiles first (128×256×64, 3 stages = 144 KiB of K-loop
# buffers, two warpgroups), then 128×128 (4 stages) and 64×128 for mid-size grids such as bert's
# (8192 × 768 gives only 48 tiles of 128×256).
_LARGE_M_16BIT = [
    config(128, 256, 64, 3, 8),
    config(256, 128, 64, 3, 8),
    config(128, 128, 64, 4, 8),
    config(128, 128, 64, 3, 4),
    config(64, 128, 64, 4, 4),
    # For sm_80, where the ones above spill (see _SPILL_BEFORE_SM90): fewer stages, 8 warps.
    config(128, 128, 64, 3, 8),
    config(128, 64, 64, 4, 8),
]
# tf32, M > 64: fp32 tiles take twice the bytes, so BLOCK_K halves (32 fp32 = 128 bytes, one full
# cache line per row, as 64 bf16). 128×256×32 (s3, w8) and 128×128×32 (s3, w4) were dropped: the
# AOT gate measured 16–128 bytes of spills for them on sm_90 and sm_80.
_LARGE_M_TF32 = [
    config(128, 128, 32, 4, 8),
    config(64, 128, 32, 4, 4),
]
# M ≤ 64 (decode): the GEMM streams W0 once and is bound by HBM. BLOCK_M = 16 is tl.dot's minimum;
# narrow column tiles give d_out/32 programs to spread the stream over every SM, and long K steps
# with 3–4 stages keep 32–64 KiB of W0 in flight per SM.
_SMALL_M_16BIT = [
    config(16, 32, 256, 4, 4, group_m=1),
    config(16, 64, 128, 4, 4, group_m=1),
    config(32, 64, 128, 4, 4, group_m=1),
    config(64, 64, 128, 3, 4, group_m=1),
]
# The same bytes in flight in tf32: half the K per step.
_SMALL_M_TF32 = [
    config(16, 32, 128, 4, 4, group_m=1),
    config(16, 64, 64, 4, 4, group_m=1),
    config(32, 64, 64, 4, 4, group_m=1),
    config(64, 64, 64, 3, 4, group_m=1),
]
# Unaligned operands (a row stride not a multiple of 16 elements, e.g. K = 59): Triton cannot
# vectorise the loads or use cp.async, so every element passes through registers. BLOCK_K = 32 and
# 8 warps for the wide tiles keep that under 255 registers; the AOT gate measured 136–1,160 bytes
# of spills for the aligned lists' tiles on such shapes.
_LARGE_M_UNALIGNED = [
    config(128, 128, 32, 3, 8),
    config(64, 128, 32, 3, 8),
    config(128, 64, 32, 3, 8),
    config(64, 64, 32, 3, 4),
]
_SMALL_M_UNALIGNED = [
    config(16, 64, 32, 3, 4, group_m=1),
    config(16, 32, 64, 3, 4, group_m=1),
    config(32, 64, 32, 3, 4, group_m=1),
]
# (M ≤ 64, bytes per element, aligned) -> the autotuner's configs, and the fixed config used in
# deterministic mode (and by a CUDA-graph capture that meets an untuned key): a safe middle tile.
_CONFIGS = {
    (False, 2, True): _LARGE_M_16BIT, (False, 4, True): _LARGE_M_TF32,
    (True, 2, True): _SMALL_M_16BIT, (True, 4, True): _SMALL_M_TF32,
    (False, 2, False): _LARGE_M_UNALIGNED, (False, 4, False): _LARGE_M_UNALIGNED,
    (True, 2, False): _SMALL_M_UNALIGNED, (True, 4, False): _SMALL_M_UNALIGNED,
}
_FIXED = {
    (False, 2, True): _LARGE_M_16BIT[2], (False, 4, True): _LARGE_M_TF32[0],
    (True, 2, True): _SMALL_M_16BIT[1], (True, 4, True): _SMALL_M_TF32[1],
    (False, 2, False): _LARGE_M_UNALIGNED[0], (False, 4, False): _LARGE_M_UNALIGNED[0],
    (True, 2, False): _SMALL_M_UNALIGNED[0], (True, 4, False): _SMALL_M_UNALIGNED[0],
}
# The interpreter: one small tile (autotuning is pointless there) that still gives several tiles
# and K steps on test shapes.
_INTERPRETER_CONFIG = config(32, 32, 32, 1, 4, group_m=2)
_SMALL_M = 64
# The shrink pass's epilogue adds the rank-r term in chunks of 32 columns: at 64 the (64 × BLOCK_N)
# q chunk and the (BLOCK_M × 64) v chunk next to the 128×256 accumulator spilled 8–40 bytes in
# bf16/fp16 (AOT gate, sm_90); 32 costs nothing but a second loop trip (the MMA K of 32 is still
# two wgmma steps).
_EPILOGUE_R_BLOCK = 32
# Beyond 16k rows the grid fills an H100 many times over and the best tile no longer depends on M.
_M_BUCKET_MAX = 1 << 14


# sm_80 has no wgmma: mma.sync keeps both operands and the accumulator in registers, and these
# 16-bit tiles spill there (AOT gate, --arch 80, triton 3.8 and 3.6: 8–360 bytes of stack), while
# they do not on sm_90. The fixed configs there come from _FIXED_BEFORE_SM90.
_SPILL_BEFORE_SM90 = {(128, 128, 64, 3, 4), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (64, 128, 64, 4, 4),
                      (128, 128, 64, 4, 8), (128, 128, 32, 3, 8), (64, 64, 32, 3, 4), (64, 128, 32, 3, 8)}
_FIXED_BEFORE_SM90 = {(False, 2, True): _LARGE_M_16BIT[5], (False, 2, False): _LARGE_M_UNALIGNED[2]}


def _tile(c: triton.Config) -> tuple:
    k = c.kwargs
    return k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, c.num_warps


def _prune(configs, named_args, **kwargs):
    """Drop, before anything compiles, configs whose K-loop buffers alone overflow shared memory,
    and the 16-bit tiles that spill on GPUs older than sm_90."""
    a = named_args["a_ptr"]
    elem = a.element_size()
    limit = current_smem_limit()
    fit = [c for c in configs if gemm_smem_bytes(c, elem, kwargs["R_BLOCK"], kwargs["SHRINK_PASS"]) <= limit]
    if elem == 2 and target_arch(a) < 90:
        fit = [c for c in fit if _tile(c) not in _SPILL_BEFORE_SM90] or fit
    return fit or [min(configs, key=lambda c: gemm_smem_bytes(c, elem, kwargs["R_BLOCK"], kwargs["SHRINK_PASS"]))]


# stride_wk tells W0ᵀ (forward, K-contiguous) from W0 (dX, N-contiguous): different best tiles.
# The dtypes of the tensor arguments join the key automatically.
_KEY = ["M_BUCKET", "N", "K", "R_BLOCK", "SHRINK_PASS", "HAS_BIAS", "PRECISION", "stride_wk"]
_TUNED = {key: triton.autotune(configs=cfgs, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _lowrank_gemm_kernel) for key, cfgs in _CONFIGS.items()}

# ------------------------------------------------------------------------------------------------
# The shrink pass or the in-loop fusion
# ------------------------------------------------------------------------------------------------
# Shrink pass when R_PAD/256 (in-loop extra MMA at BLOCK_N = 256) exceeds ≈ 230/N (one more read of
# the input, H100: 679 TFLOP/s ÷ 3 TB/s), i.e. R_PAD·N > 2¹⁶ ...
_SHRINK_MIN_RN = 1 << 16
# ... and only once the GEMM is compute bound; below ~1k rows it is W-bound and the extra MMA is free.
_SHRINK_MIN_M = 1024


def _prefers_shrink_pass(M: int, N: int, R: int) -> bool:
    """The cost model above: True where one shrink pass is predicted cheaper than the in-loop fusion."""
    r_pad, _ = rank_blocks(R)
    return bool(r_pad * N > _SHRINK_MIN_RN and M >= _SHRINK_MIN_M)


def uses_shrink_pass(M: int, N: int, R: int, forced: bool | None) -> bool:
    """Whether proj comes from a shrink pass: forced (benchmarks) or by the cost model, and always
    when N == 0 (no output tile to compute it in) or the rank exceeds the in-loop register budget."""
    r_pad, r_block = rank_blocks(R)
    if N == 0 or r_pad > r_block:
        return True
    return _prefers_shrink_pass(M, N, R) if forced is None else bool(forced)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def shrink(a: torch.Tensor, p: torch.Tensor, proj: torch.Tensor) -> None:
    """proj = a·p, for an (M × K) a, (K × R) p and (M × R) proj, all given by strides."""
    M, K = a.shape
    R = p.shape[1]
    _, r_block = rank_blocks(R)
    # 32 rows × 128 k (8 KiB bf16) per stage at 4 stages keeps 32 KiB of a in flight per SM, and
    # M/32 programs fill an H100 from a few thousand rows (the shrink pass is only picked at M ≥ 1k).
    # fp32: half the k per step for the same bytes.
    if is_interpreted(a):
        block_m, block_k, stages = 32, 32, 1
    else:
        block_m, block_k, stages = 32, 128 // (a.element_size() // 2), 4
    grid = (cdiv(M, block_m), cdiv(R, r_block))
    launch(_shrink_kernel, grid, (
        a, p, proj, M, K, R,
        a.stride(0), a.stride(1), p.stride(0), p.stride(1), proj.stride(0), proj.stride(1),
    ), dict(PRECISION=precision(a.dtype), R_BLOCK=r_block, BLOCK_M=block_m, BLOCK_K=block_k,
            num_warps=4, num_stages=stages))


# The TMA kernel's tile: 128×256×64 at 3 stages is 144 KiB of K-loop buffers plus a 64 KiB output
# staging tile for the TMA store (208 KiB of the 227 KiB); two warpgroups share the 128×256 fp32
# accumulator (128 registers per thread). One fixed config: host descriptors carry the block shape,
# so autotuning would need per-config descriptors; and a fixed config is deterministic and safe
# inside CUDA-graph capture.
_TMA_CONFIG = config(128, 256, 64, 3, 8)
# Under the interpreter (tests): small tiles, and few "SMs" so that each program walks several tiles.
_TMA_INTERPRETER_CONFIG = config(32, 32, 32, 1, 4, group_m=2)
_TMA_INTERPRETER_SMS = 3
# H100 SXM and H200 both have 132 SMs; the AOT gate has no device to ask.
_AOT_SMS = 132


def tma_supported() -> bool:
    """This triton has host-side tensor descriptors (3.4+; the device runs 3.6)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def _tma_w_layout(a, w, out) -> bool | None:
    """W_IS_NK for the TMA kernel, or None when an operand cannot be described: TMA needs a unit
    last stride, 16-byte aligned other strides and a 16-byte aligned start."""
    def rows_ok(t):
        return t.stride(1) == 1 and vector_aligned(t) and (t.stride(0) * t.element_size()) % 16 == 0
    if not (rows_ok(a) and rows_ok(out)):
        return None
    if rows_ok(w):
        return False
    if rows_ok(w.t()):
        return True
    return None


def _wants_tma(a, w, out, M: int) -> bool:
    """The automatic choice: large-M 16-bit GEMMs on sm_90, in eager mode."""
    if is_interpreted(a) or M <= _SMALL_M or a.element_size() != 2 or not tma_supported():
        return False
    if torch.compiler.is_compiling():  # host descriptors under torch.compile need a newer torch than the device's
        return False
    return target_arch(a) == 90 and _tma_w_layout(a, w, out) is not None


def _launch_tma(a, w, out, w_is_nk: bool, args_tail: tuple, meta: dict) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = out.shape[1]
    cfg = _TMA_INTERPRETER_CONFIG if is_interpreted(a) else _TMA_CONFIG
    bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    wt = w.t() if w_is_nk else w
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [bm, bk])
    w_desc = TensorDescriptor(wt, list(wt.shape), list(wt.stride()), [bn, bk] if w_is_nk else [bk, bn])
    out_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), [bm, bn])
    programs = min(_sm_count(a), cdiv(M, bm) * cdiv(N, bn))
    launch(_tma_gemm_kernel, (programs,), (a_desc, w_desc, out_desc, *args_tail[:12], programs, *args_tail[12:]),
           {**meta, "W_IS_NK": w_is_nk, **cfg.all_kwargs()})


# Decode split-K: 64-column tiles (128 bytes of a bf16 row of W per k), 128-deep K steps at 4 stages
# (32 KiB of W in flight per program); at least 256 of K per split (two K steps) so the partial's
# store stays small next to the W it streams; 2 programs per SM.
_SPLITK_BLOCK_N = 64
_SPLITK_MIN_K = 256
_SPLITK_PROGRAMS_PER_SM = 2


def _sm_count(t: torch.Tensor) -> int:
    """SMs to fill: the device's, 132 (H100/H200) for the AOT gate, a few under the interpreter."""
    if is_interpreted(t):
        return _TMA_INTERPRETER_SMS
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _AOT_SMS


def _split_count(M: int, N: int, K: int, sms: int, block_m: int) -> int:
    """How many K splits fill the GPU: 1 when the column tiles already do, or K is too short."""
    tiles = cdiv(N, _SPLITK_BLOCK_N) * cdiv(M, block_m)
    want = cdiv(_SPLITK_PROGRAMS_PER_SM * sms, tiles)
    return max(1, min(want, K // _SPLITK_MIN_K))


def _launch_splitk(a, w, p, out, proj, n_split: int, args_epilogue: tuple, meta: dict) -> None:
    M, K = a.shape
    N = w.shape[1]
    R = p.shape[1]
    interpreted = is_interpreted(a)
    block_m = 32 if interpreted else max(16, next_power_of_2(M))
    block_n = 32 if interpreted else _SPLITK_BLOCK_N
    block_k = 32 if interpreted else 256 // a.element_size()
    k_per_split = cdiv(cdiv(K, n_split), block_k) * block_k
    n_split = cdiv(K, k_per_split)  # after rounding to whole K steps
    ws = torch.empty(n_split, M, N, dtype=torch.float32, device=a.device)
    ws_proj = torch.empty(n_split, M, R if not meta["SHRINK_PASS"] else 1, dtype=torch.float32, device=a.device)
    grid = (cdiv(N, block_n), n_split, cdiv(M, block_m))
    launch(_splitk_partial_kernel, grid, (
        a, w, p, ws, ws_proj, M, N, K, R, k_per_split,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1),
    ), dict(SHRINK_PASS=meta["SHRINK_PASS"], PRECISION=meta["PRECISION"], R_BLOCK=meta["R_BLOCK"],
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=1 if interpreted else 4))
    q, C, task_ids, bias, scale = args_epilogue
    launch(_splitk_epilogue_kernel, (cdiv(N, block_n), cdiv(M, block_m)), (
        ws, ws_proj, q, C, task_ids, bias if bias is not None else out, out, proj,
        M, N, R, C.shape[0], scale, n_split,
        q.stride(0), q.stride(1), C.stride(0), C.stride(1), task_ids.stride(0),
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1), proj.stride(0), proj.stride(1),
    ), dict(HAS_BIAS=meta["HAS_BIAS"], SHRINK_PASS=meta["SHRINK_PASS"], PRECISION=meta["PRECISION"],
            IN_DTYPE=_TL_DTYPES[a.dtype], R_BLOCK=meta["R_BLOCK"], BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4))


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def lowrank_gemm(a, w, p, q, C, task_ids, bias, out, proj, scale: float, shrink_pass: bool,
                 tma: bool | None = None, split_k: int | None = None) -> None:
    """out = a·w + bias + scale·((a·p) ⊙ C[task_ids])·qᵀ, row by row.

    a (M × K), w (K × N), p (K × R), q (N × R), bias (N), out (M × N), proj (M × R) are given by
    strides (views such as weight.t() or a strided bias cost nothing). Without shrink_pass the
    kernel writes proj = a·p; with it, it reads proj, which `shrink` must have written.
    `tma`: None picks the TMA kernel where it applies (sm_90, 16-bit, M > 64, describable operands);
    True forces it (tests, under the interpreter), False the pointer kernel.
    `split_k`: None splits K for decode (M ≤ 64) when the column tiles alone leave SMs idle; an int
    forces that many splits (tests), 1 never splits.
    """
    M, K = a.shape
    N = w.shape[1]
    R = p.shape[1]
    if M == 0 or N == 0:
        return
    r_pad, r_block = rank_blocks(R)
    if not shrink_pass and r_pad > r_block:
        raise ValueError(f"the in-loop fusion holds at most {r_block} rank columns, got r={R}; use the shrink pass")
    if shrink_pass:  # the epilogue's rank chunks: see _EPILOGUE_R_BLOCK
        r_block = min(r_block, _EPILOGUE_R_BLOCK)
    args = (
        a, w, p, q, C, task_ids, bias if bias is not None else out, out, proj,
        M, N, K, R, C.shape[0], scale,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        C.stride(0), C.stride(1), task_ids.stride(0), bias.stride(0) if bias is not None else 0,
        out.stride(0), out.stride(1), proj.stride(0), proj.stride(1),
        max(16, min(next_power_of_2(M), _M_BUCKET_MAX)),
    )
    meta = dict(HAS_BIAS=bias is not None, SHRINK_PASS=shrink_pass, PRECISION=precision(a.dtype), R_BLOCK=r_block)
    if tma or (tma is None and _wants_tma(a, w, out, M)):
        w_is_nk = _tma_w_layout(a, w, out)
        if w_is_nk is None:
            raise ValueError(f"the TMA kernel needs unit last strides and 16-byte aligned rows; got a {a.stride()}, "
                             f"w {w.stride()}, out {out.stride()}")
        _launch_tma(a, w, out, w_is_nk, (
            p, q, C, task_ids, bias if bias is not None else out, proj,
            M, N, K, R, C.shape[0], scale,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), C.stride(0), C.stride(1), task_ids.stride(0),
            bias.stride(0) if bias is not None else 0, proj.stride(0), proj.stride(1),
        ), meta)
        return
    if split_k is None:
        split_k = 1
        if M <= _SMALL_M and not is_interpreted(a):
            split_k = _split_count(M, N, K, _sm_count(a), max(16, next_power_of_2(M)))
    if split_k > 1:
        _launch_splitk(a, w, p, out, proj, split_k, (q, C, task_ids, bias, scale), meta)
        return

    def grid_of(cfg):
        return cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])

    if is_interpreted(a):
        cfg = _INTERPRETER_CONFIG
    else:
        which = (M <= _SMALL_M, a.element_size(), vector_aligned(a, w, out))
        cfg = _FIXED[which]
        if target_arch(a) < 90:
            cfg = _FIXED_BEFORE_SM90.get(which, cfg)
        if not torch.are_deterministic_algorithms_enabled():
            tuned = _TUNED[which]
            named = dict(zip(_lowrank_gemm_kernel.arg_names, args), **meta)
            launch_tuned(tuned, _lowrank_gemm_kernel, cfg, grid_of, args, meta, tune_key(tuned, named, _KEY))
            return
    # One fixed config: the summation order (and every bit) is the same in every process.
    launch(_lowrank_gemm_kernel, (grid_of(cfg.kwargs),), args, {**meta, **cfg.all_kwargs()})


def _cublas_fwd(x, weight, bias, A, B, C, task_ids, scale: float):
    """fp32 without tf32 (see common.uses_cublas): the same op in torch, with the same id masking."""
    u = x @ B.to(x.dtype)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_(u * masked_task_rows(C, task_ids).to(x.dtype), A.to(x.dtype).t(), alpha=scale)
    return y, u


def masked_task_rows(C: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """C[task_ids] with zero rows where the id is outside [0, T) (-1: no adapter)."""
    T = C.shape[0]
    if T == 0:
        return C.new_zeros(task_ids.shape[0], C.shape[1])
    ok = (task_ids >= 0) & (task_ids < T)
    return C[task_ids.clamp(0, T - 1)] * ok[:, None].to(C.dtype)


def cp_linear_fwd(x, weight, bias, A, B, C, task_ids, scale: float, *, shrink_pass: bool | None = None):
    """(y, u) for 2-D inputs already validated by ops.py; `shrink_pass` forces the fusion (benchmarks)."""
    check_dtype(x)
    M = x.shape[0]
    d_out, r = weight.shape[0], A.shape[1]
    if uses_cublas(x):
        return _cublas_fwd(x, weight, bias, A, B, C, task_ids, scale)
    y = x.new_empty(M, d_out)
    u = x.new_empty(M, r)
    if M == 0:
        return y, u
    use_shrink = uses_shrink_pass(M, d_out, r, shrink_pass)
    if use_shrink:
        shrink(x, B, u)
    lowrank_gemm(x, weight.t(), B, A, C, task_ids, bias, y, u, scale, shrink_pass=use_shrink)
    return y, u
