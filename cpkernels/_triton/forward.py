"""Fused Triton forward of cp_linear:  Y = X·W0ᵀ + b + s·((X·B) ⊙ C[t])·Aᵀ,  and u = X·B for backward.

Design
------
One GEMM kernel, `_lowrank_gemm_kernel`, computes  out = a·w + bias + s·((a·p) ⊙ C[t])·qᵀ  for an
(M × K) input `a` and a (K × N) operand `w` given by strides. The forward uses it with
(a, w, p, q) = (X, W0ᵀ, B, A); the backward reuses it for dX with (dY, W0, A, B) (see backward.py).
The rank-r part enters in one of two ways, chosen per call by `_shrink_first`:

* in-loop (FUSE_SHRINK): every output tile also accumulates its rows of a·p in the same K loop,
  on the a-tile that is already in registers, then adds (a·p ⊙ C[t])·qᵀ to its accumulator in the
  epilogue. One launch, one read of X. The price: a·p is recomputed by each of the N/BLOCK_N column
  tiles, i.e. R_PAD/BLOCK_N extra MMA work (6% at r = 16, BLOCK_N = 256; 25% at r = 64).
* shrink pass (`_shrink_kernel`, as in LoRAFusion): a light kernel writes a·p once (M × r); the GEMM
  then reads it in the epilogue, looping over the rank in chunks, so any r works. The price: one
  more read of X plus a launch, about (matmul FLOP/s ÷ HBM bytes/s)/N ≈ 230/N of the GEMM on an
  H100 (5.5% at N = 4096, 2% at N = 11008).
Prediction (no GPU was available when this was written; bench/ measures both, `shrink=` forces
either): in-loop wins at r ≤ 16 for N ≤ 4096 and at every small M (the GEMM is bound by reading W
there, so the extra MMA is free); the shrink pass wins at r ≥ 32 or N ≥ 8k (llm-r64, llm-mlp).

Cost model at the llm shape (M = 8192, d_in = d_out = 4096, r = 16, bf16):
  base GEMM 2·M·d_in·d_out = 275 GFLOP (0.35 ms at the measured cuBLAS rate); bytes X 64 MiB +
  W0 32 MiB + Y 64 MiB = 160 MiB (55 µs at 3 TB/s), so it is compute bound by 6×.
  The rank-r work proper is 2·M·r·(d_in + d_out) = 2.1 GFLOP (0.8%) and u is 256 KiB.
  In-loop adds 17 GFLOP of MMA (6.25%); the shrink pass adds 64 MiB of reads (≈ 22 µs, 6%).
  What should move: the GEMM itself. A pointer-based Triton GEMM runs at 1.09–1.70× cuBLAS on
  these shapes (BENCHMARKS.md), which dwarfs the fusion's cost; TMA descriptors, a persistent grid
  and warp specialisation (tutorial 09) are the next step, then the shrink/in-loop switch point.

Out-of-range task ids: the kernel masks them. A row whose id is outside [0, T) loads its C row as
zeros, so it gets y = x·W0ᵀ + b with no low-rank update, and nothing is ever read out of bounds.
The cost is two integer compares per row and a mask on a (BLOCK_M × r) gather, nothing measurable.
ops.py additionally raises IndexError on such ids before the launch (once per ids tensor; an async
device assertion under torch.compile).

Precision: fp32 accumulation everywhere; fp32 inputs go through tf32 only when
torch.backends.cuda.matmul.allow_tf32 is set. Under torch.are_deterministic_algorithms_enabled()
a fixed tile config replaces autotuning, so the summation order (and every bit) is the same in
every process; the kernels use no atomics in any mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _lowrank_gemm_kernel(
    a_ptr, w_ptr, p_ptr, q_ptr, c_ptr, t_ptr, bias_ptr, out_ptr, lr_ptr,
    M, N, K, R, T, scale,
    stride_am, stride_ak, stride_wk, stride_wn, stride_pk, stride_pr, stride_qn, stride_qr,
    stride_ct, stride_cr, stride_t, stride_om, stride_on, stride_lm, stride_lr,
    M_BUCKET,  # only an autotune key: the best tile depends on M's order of magnitude, not on M
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, PRECISION: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = a·w + bias + scale·((a·p) ⊙ C[t])·qᵀ; lr = a·p is written (FUSE_SHRINK) or read."""
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

    a_ptrs = a_ptr + rows_in[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + ks[:, None] * stride_wk + cols_in[None, :] * stride_wn
    p_ptrs = p_ptr + ks[:, None] * stride_pk + rk[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lr = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if FUSE_SHRINK:  # the rank-r product rides on the a-tile already loaded
            p = tl.load(p_ptrs, mask=(ks[:, None] < k_left) & (rk[None, :] < R), other=0.0)
            lr = tl.dot(a, p, lr, input_precision=PRECISION)
            p_ptrs += BLOCK_K * stride_pk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: a bad task id masks its C row to zeros, so that row gets no low-rank update.
    task = tl.load(t_ptr + rows_in * stride_t)
    task_ok = (task >= 0) & (task < T)
    if FUSE_SHRINK:
        c = tl.load(c_ptr + task[:, None] * stride_ct + rk[None, :] * stride_cr,
                    mask=task_ok[:, None] & (rk[None, :] < R), other=0.0)
        v = (lr * c.to(tl.float32) * scale).to(a_ptr.dtype.element_ty)
        q = tl.load(q_ptr + rk[:, None] * stride_qr + cols_in[None, :] * stride_qn, mask=rk[:, None] < R, other=0.0)
        acc = tl.dot(v, q, acc, input_precision=PRECISION)
        if pid_n == 0:  # every column tile computed the same rows of a·p; one of them stores it
            lr_ptrs = lr_ptr + rows.to(tl.int64)[:, None] * stride_lm + rk[None, :] * stride_lr
            tl.store(lr_ptrs, lr.to(lr_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (rk[None, :] < R))
    else:
        for r0 in range(0, R, R_BLOCK):  # rank chunks keep the epilogue's registers bounded for any r
            rr = r0 + rk
            lr_chunk = tl.load(lr_ptr + rows_in[:, None] * stride_lm + rr[None, :] * stride_lr,
                               mask=rr[None, :] < R, other=0.0)
            c = tl.load(c_ptr + task[:, None] * stride_ct + rr[None, :] * stride_cr,
                        mask=task_ok[:, None] & (rr[None, :] < R), other=0.0)
            v = (lr_chunk.to(tl.float32) * c.to(tl.float32) * scale).to(a_ptr.dtype.element_ty)
            q = tl.load(q_ptr + rr[:, None] * stride_qr + cols_in[None, :] * stride_qn,
                        mask=rr[:, None] < R, other=0.0)
            acc = tl.dot(v, q, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _shrink_kernel(
    a_ptr, p_ptr, lr_ptr, M, K, R,
    stride_am, stride_ak, stride_pk, stride_pr, stride_lm, stride_lr,
    PRECISION: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """lr = a·p (M × R): one read of a, fp32 accumulation; grid (row blocks, rank chunks)."""
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
        acc = tl.dot(a, p, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        p_ptrs += BLOCK_K * stride_pk
    lr_ptrs = lr_ptr + rows.to(tl.int64)[:, None] * stride_lm + rr[None, :] * stride_lr
    tl.store(lr_ptrs, acc.to(lr_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (rr[None, :] < R))


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m),
                         num_stages=stages, num_warps=warps)


# M > 64: compute bound. Wide Hopper tiles first (128×256×64, 3 stages = 150 KiB of shared memory in
# bf16, two warpgroups), then 128×128 (4 stages) and 64×128 for mid-size grids such as bert's
# (8192 × 768 gives only 48 tiles of 128×256). fp32 configs that overflow shared memory are skipped
# by the autotuner (OutOfResources).
_LARGE_M_CONFIGS = [
    _cfg(128, 256, 64, 3, 8),
    _cfg(256, 128, 64, 3, 8),
    _cfg(128, 128, 64, 4, 8),
    _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
]
# M ≤ 64 (decode): the GEMM streams W0 once and is bound by HBM. BLOCK_M = 16 is tl.dot's minimum;
# narrow column tiles give d_out/32 programs to spread the stream over every SM, and long K steps
# with 3–4 stages keep 32–64 KiB of W0 in flight per SM.
_SMALL_M_CONFIGS = [
    _cfg(16, 32, 256, 4, 4, group_m=1),
    _cfg(16, 64, 128, 4, 4, group_m=1),
    _cfg(32, 64, 128, 4, 4, group_m=1),
    _cfg(64, 64, 128, 3, 4, group_m=1),
]
_SMALL_M = 64
# stride_wk tells W0ᵀ (forward, K-contiguous) from W0 (dX, N-contiguous): different best tiles.
_KEY = ["M_BUCKET", "N", "K", "R_BLOCK", "FUSE_SHRINK", "stride_wk"]
_gemm_large_m = triton.autotune(configs=_LARGE_M_CONFIGS, key=_KEY)(_lowrank_gemm_kernel)
_gemm_small_m = triton.autotune(configs=_SMALL_M_CONFIGS, key=_KEY)(_lowrank_gemm_kernel)

# Beyond 16k rows the grid fills an H100 many times over and the best tile no longer depends on M.
_M_BUCKET_MAX = 1 << 14
# The in-loop fusion holds a·p in registers; beyond 64 rank columns ((128 × 64) fp32 = 64 registers
# per thread at 4 warps) it would crowd out the main accumulator, so wider ranks take the shrink pass.
_R_BLOCK_MAX = 64
# Shrink pass when R_PAD/256 (in-loop extra MMA at BLOCK_N = 256) exceeds ≈ 230/N (one more read of
# the input, H100: 679 TFLOP/s ÷ 3 TB/s), i.e. R_PAD·N > 2¹⁶ ...
_SHRINK_MIN_RN = 1 << 16
# ... and only once the GEMM is compute bound; below ~1k rows it is W-bound and the extra MMA is free.
_SHRINK_MIN_M = 1024


def _rank_blocks(R: int) -> tuple[int, int]:
    """(R_PAD, R_BLOCK): the rank padded to tl.dot's minimum of 16 (masked), and its chunk size.

    int(R) specialises a symbolic rank under torch.compile: R_BLOCK is a compile-time constant.
    """
    r_pad = max(16, triton.next_power_of_2(int(R)))
    return r_pad, min(r_pad, _R_BLOCK_MAX)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16, got x of dtype {x.dtype}; "
                        f"use backend='reference' (or 'cpu') for {x.dtype}")


def _prefers_shrink_pass(M: int, N: int, R: int) -> bool:
    """The cost model above: True where one shrink pass is predicted cheaper than the in-loop fusion."""
    r_pad, _ = _rank_blocks(R)
    return bool(r_pad * N > _SHRINK_MIN_RN and M >= _SHRINK_MIN_M)


def _shrink_first(M: int, N: int, R: int, forced: bool | None) -> bool:
    """Whether a·p comes from a shrink pass: forced (benchmarks) or by the cost model, and always
    when N == 0 (no output tile to compute it in) or the rank exceeds the in-loop register budget."""
    r_pad, r_block = _rank_blocks(R)
    if N == 0 or r_pad > r_block:
        return True
    return _prefers_shrink_pass(M, N, R) if forced is None else forced


def _fixed_gemm_config(M: int, dtype: torch.dtype, interpreted: bool) -> triton.Config:
    if interpreted:  # one small tile: autotuning is pointless under TRITON_INTERPRET=1, and 32 still
        return _cfg(32, 32, 32, 1, 4, group_m=2)  # gives several tiles and K steps on test shapes
    if M <= _SMALL_M:
        return _SMALL_M_CONFIGS[1]
    # 128×128×64 at 4 stages is 136 KiB in bf16; fp32 halves BLOCK_K and drops a stage to fit.
    return _cfg(128, 128, 64, 4, 8) if dtype != torch.float32 else _cfg(128, 128, 32, 3, 8)


def shrink(a: torch.Tensor, p: torch.Tensor, lr: torch.Tensor) -> None:
    """lr = a·p, for an (M × K) a, (K × R) p and (M × R) lr, all given by strides."""
    M, K = a.shape
    R = p.shape[1]
    _, r_block = _rank_blocks(R)
    # 32 rows × 128 k (8 KiB bf16) per stage at 4 stages keeps 32 KiB of a in flight per SM, and
    # M/32 programs fill an H100 from a few thousand rows (the shrink pass is only picked at M ≥ 1k).
    block_m, block_k, stages = (32, 32, 1) if a.device.type == "cpu" else (32, 128, 4)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, r_block))
    wrap_triton(_shrink_kernel)[grid](
        a, p, lr, M, K, R,
        a.stride(0), a.stride(1), p.stride(0), p.stride(1), lr.stride(0), lr.stride(1),
        PRECISION=_precision(a.dtype), R_BLOCK=r_block, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=4, num_stages=stages,
    )


def lowrank_gemm(a, w, p, q, C, task_ids, bias, out, lr, scale: float, fuse_shrink: bool) -> None:
    """out = a·w + bias + scale·((a·p) ⊙ C[task_ids])·qᵀ, row by row.

    a (M × K), w (K × N), p (K × R), q (N × R), out (M × N), lr (M × R) are given by strides (views
    such as weight.t() cost nothing). With fuse_shrink the kernel writes lr = a·p; without, it
    reads lr, which `shrink` must have written.
    """
    M, K = a.shape
    N = w.shape[1]
    R = p.shape[1]
    if M == 0 or N == 0:
        return
    r_pad, r_block = _rank_blocks(R)
    if fuse_shrink and r_pad > r_block:
        raise ValueError(f"the in-loop fusion holds at most {r_block} rank columns, got r={R}; use the shrink pass")
    args = (
        a, w, p, q, C, task_ids, bias if bias is not None else out, out, lr,
        M, N, K, R, C.shape[0], scale,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        C.stride(0), C.stride(1), task_ids.stride(0), out.stride(0), out.stride(1), lr.stride(0), lr.stride(1),
        min(triton.next_power_of_2(M), _M_BUCKET_MAX),
    )
    meta = dict(HAS_BIAS=bias is not None, FUSE_SHRINK=fuse_shrink, PRECISION=_precision(a.dtype), R_BLOCK=r_block)
    interpreted = a.device.type == "cpu"  # Triton runs CPU tensors only under TRITON_INTERPRET=1
    if interpreted or torch.are_deterministic_algorithms_enabled():
        cfg = _fixed_gemm_config(M, a.dtype, interpreted)
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
        wrap_triton(_lowrank_gemm_kernel)[grid](*args, **meta, **cfg.kwargs,
                                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    kernel = _gemm_small_m if M <= _SMALL_M else _gemm_large_m
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    wrap_triton(kernel)[grid](*args, **meta)


def cp_linear_fwd(x, weight, bias, A, B, C, task_ids, scale: float, *, shrink_pass: bool | None = None):
    """(y, u) for 2-D inputs already validated by ops.py; `shrink_pass` forces the fusion (benchmarks)."""
    _check_dtype(x)
    M = x.shape[0]
    d_out, r = weight.shape[0], A.shape[1]
    y = x.new_empty(M, d_out)
    u = x.new_empty(M, r)
    if M == 0:
        return y, u
    use_shrink = _shrink_first(M, d_out, r, shrink_pass)
    if use_shrink:
        shrink(x, B, u)
    lowrank_gemm(x, weight.t(), B, A, C, task_ids, bias, y, u, scale, fuse_shrink=not use_shrink)
    return y, u
