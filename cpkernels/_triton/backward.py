"""Fused Triton backward of cp_linear.

With g = dY·A (M × r), v = u ⊙ C[t] and w = g ⊙ C[t] (ARCHITECTURE §1):

    dX = dY·W0 + s·w·Bᵀ        dA = s·dYᵀ·v        dB = s·Xᵀ·w
    dC[k] = s·Σ_{i: t_i = k} u_i ⊙ g_i                  db = Σ_i dY_i

Passes (launches) over the big operands, M × d tensors read from HBM:
  1. dX: forward.lowrank_gemm (whichever of its kernels applies: TMA, split-K or pointer) with
     (a, w, p, q) = (dY, W0, A, B). Its K loop over d_out reads the dY tiles once and accumulates
     g = dY·A on them (or, for wide ranks, a shrink pass computes g first, as in the forward); the
     epilogue adds s·w·Bᵀ and stores g (fp32).
  2. `_reduce_over_rows_kernel`, one launch, three kinds of programs side by side:
       dA (+ db): a second read of dY,  dYᵀ·v as a skinny reduction over M (and dY's column sums);
       dB:        the one read of X,    Xᵀ·w;
       dC:        reads only u, g and t (M × r), a one-hot (tasks × rows)·(u ⊙ g) product.
     Each splits M into `n_split` row ranges and writes fp32 partial sums per range.
  3. `_sum_splits_kernel`, one launch: sums the partials of every gradient in a fixed order,
     applies s and casts to the output dtype.
So dY is read twice and X once: X must be read for dB and dY for dX; folding dA into pass 1
would need one partial per row block (M/BLOCK_M × d_out × r fp32: 2 GiB at 10⁶ rows) or atomics.

Determinism: no atomics anywhere. Partials are per (row range, output block) and the final sum
runs over the ranges in order, so results are bitwise reproducible in every mode. n_split depends
only on (M, r): at least 512 rows and 32·r_pad rows per range keep the partials' bytes under 1/16 of
the bytes read (1/8 including the re-read) — about what atomics would cost in L2 traffic anyway.

Out-of-range task ids are masked, never read: their C row loads as zeros (no s·w·Bᵀ term in dX,
no contribution to dA or dB) and their one-hot row is empty (nothing added to dC). The cost is a
compare and a mask per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import forward
from .common import (cdiv, check_dtype, is_interpreted, launch, precision, rank_blocks, target_arch, uses_cublas,
                     vector_aligned)


@triton.jit
def _rows_t_times_factor(
    z_ptr, f_ptr, c_ptr, t_ptr, ws_ptr, colsum_ptr, D, R, T, row_start, row_end, pid_d,
    stride_zm, stride_zd, stride_fm, stride_fr, stride_ct, stride_cr, stride_t,
    COLSUM: tl.constexpr, PRECISION: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """ws[d, r] = Σ_m z[m, d]·f[m, r]·C[t_m, r] (and colsum[d] = Σ_m z[m, d]) over rows [row_start, row_end)."""
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols_in = (cols % D).to(tl.int64)  # edge columns wrap onto valid ones; the store drops them
    rk = tl.arange(0, R_BLOCK)
    ms = tl.arange(0, BLOCK_M)
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + rk
        acc = tl.zeros((BLOCK_D, R_BLOCK), dtype=tl.float32)
        colsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = (m0 + ms).to(tl.int64)
            row_ok = rows < row_end
            zt = tl.load(z_ptr + cols_in[:, None] * stride_zd + rows[None, :] * stride_zm,
                         mask=row_ok[None, :], other=0.0)
            task = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=-1)
            task_ok = row_ok & (task >= 0) & (task < T)
            c = tl.load(c_ptr + task[:, None] * stride_ct + rr[None, :] * stride_cr,
                        mask=task_ok[:, None] & (rr[None, :] < R), other=0.0)
            f = tl.load(f_ptr + rows[:, None] * stride_fm + rr[None, :] * stride_fr,
                        mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
            v = (f.to(tl.float32) * c.to(tl.float32)).to(z_ptr.dtype.element_ty)
            acc = tl.dot(zt, v, acc, input_precision=PRECISION)
            if COLSUM:
                colsum += tl.sum(zt.to(tl.float32), axis=1)
        tl.store(ws_ptr + cols[:, None] * R + rr[None, :], acc, mask=(cols < D)[:, None] & (rr[None, :] < R))
        if COLSUM:
            tl.store(colsum_ptr + cols, colsum, mask=(cols < D) & (r0 == 0))


@triton.jit
def _segment_sum_block(
    u_ptr, g_ptr, t_ptr, ws_ptr, R, T, row_start, row_end, pid_t,
    stride_um, stride_ur, stride_gm, stride_gr, stride_t,
    R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """ws[k, r] = Σ_{m: t_m = k} u[m, r]·g[m, r] for the BLOCK_T tasks of block pid_t, rows [row_start, row_end)."""
    tasks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rk = tl.arange(0, R_BLOCK)
    ms = tl.arange(0, BLOCK_M)
    for r0 in range(0, R, R_BLOCK):
        rr = r0 + rk
        acc = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = (m0 + ms).to(tl.int64)
            row_ok = rows < row_end
            task = tl.load(t_ptr + rows * stride_t, mask=row_ok, other=-1)
            task = tl.where((task >= 0) & (task < T), task, -1)  # ids outside [0, T) ("no adapter")
            rank_mask = row_ok[:, None] & (rr[None, :] < R)
            u = tl.load(u_ptr + rows[:, None] * stride_um + rr[None, :] * stride_ur, mask=rank_mask, other=0.0)
            g = tl.load(g_ptr + rows[:, None] * stride_gm + rr[None, :] * stride_gr, mask=rank_mask, other=0.0)
            # -1 (a bad id, or a masked row) matches no task: it adds nothing anywhere.
            hit = (task[None, :] == tasks[:, None]).to(tl.float32)
            # ieee: the one-hot products are exact; tf32 would round u ⊙ g to 10 mantissa bits.
            acc = tl.dot(hit, u.to(tl.float32) * g.to(tl.float32), acc, input_precision="ieee")
        tl.store(ws_ptr + tasks[:, None] * R + rr[None, :], acc, mask=(tasks < T)[:, None] & (rr[None, :] < R))


@triton.jit
def _reduce_over_rows_kernel(
    dy_ptr, x_ptr, u_ptr, g_ptr, c_ptr, t_ptr, ws_a_ptr, ws_bias_ptr, ws_b_ptr, ws_c_ptr,
    M, d_out, d_in, R, T, rows_per_split, nb_a, nb_b,
    stride_dym, stride_dyd, stride_xm, stride_xd, stride_um, stride_ur, stride_gm, stride_gr,
    stride_ct, stride_cr, stride_t,
    COLSUM: tl.constexpr, PRECISION: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Partial sums of dA/s (+ db), dB/s and dC/s over one row range (program_id 1) per output block."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    split = split.to(tl.int64)  # the partials' offsets below can pass 2³¹ for large d·r
    if pid < nb_a:
        _rows_t_times_factor(dy_ptr, u_ptr, c_ptr, t_ptr, ws_a_ptr + split * d_out * R, ws_bias_ptr + split * d_out,
                             d_out, R, T, row_start, row_end, pid,
                             stride_dym, stride_dyd, stride_um, stride_ur, stride_ct, stride_cr, stride_t,
                             COLSUM, PRECISION, R_BLOCK, BLOCK_M, BLOCK_D)
    elif pid < nb_a + nb_b:
        _rows_t_times_factor(x_ptr, g_ptr, c_ptr, t_ptr, ws_b_ptr + split * d_in * R, ws_b_ptr,
                             d_in, R, T, row_start, row_end, pid - nb_a,
                             stride_xm, stride_xd, stride_gm, stride_gr, stride_ct, stride_cr, stride_t,
                             False, PRECISION, R_BLOCK, BLOCK_M, BLOCK_D)
    else:
        _segment_sum_block(u_ptr, g_ptr, t_ptr, ws_c_ptr + split * T * R, R, T, row_start, row_end,
                           pid - nb_a - nb_b, stride_um, stride_ur, stride_gm, stride_gr, stride_t,
                           R_BLOCK, BLOCK_M, BLOCK_T)


@triton.jit
def _sum_splits_block(ws_ptr, out_ptr, n_split, numel, scale, pid, BLOCK: tl.constexpr):
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    ws_ptrs = ws_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, n_split):  # always in split order: the same bits on every run
        acc += tl.load(ws_ptrs, mask=ok, other=0.0)
        ws_ptrs += numel
    tl.store(out_ptr + offs, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sum_splits_kernel(
    ws_a_ptr, out_a_ptr, n_a, ws_bias_ptr, out_bias_ptr, n_bias, ws_b_ptr, out_b_ptr, n_b,
    ws_c_ptr, out_c_ptr, n_c, n_split, scale, BLOCK: tl.constexpr,
):
    """out_* = scale · Σ_split ws_*[split] for each gradient (db unscaled); a gradient with n_* = 0 is skipped."""
    pid = tl.program_id(0)
    nb_a = tl.cdiv(n_a, BLOCK)
    nb_bias = tl.cdiv(n_bias, BLOCK)
    nb_b = tl.cdiv(n_b, BLOCK)
    if pid < nb_a:
        _sum_splits_block(ws_a_ptr, out_a_ptr, n_split, n_a, scale, pid, BLOCK)
    elif pid < nb_a + nb_bias:
        _sum_splits_block(ws_bias_ptr, out_bias_ptr, n_split, n_bias, 1.0, pid - nb_a, BLOCK)
    elif pid < nb_a + nb_bias + nb_b:
        _sum_splits_block(ws_b_ptr, out_b_ptr, n_split, n_b, scale, pid - nb_a - nb_bias, BLOCK)
    else:
        _sum_splits_block(ws_c_ptr, out_c_ptr, n_split, n_c, scale, pid - nb_a - nb_bias - nb_b, BLOCK)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
# Row ranges of at least 512 rows and 32·r_pad rows: the fp32 partial a range writes (d·r·4 bytes)
# stays under 1/16 of what it reads (rows·d·2 bytes in bf16).
_MIN_SPLIT_ROWS = 512
_ROWS_PER_RANK = 32
# At most 64 ranges: bounds the partials at 64·d·r·4 bytes (16 MiB at d = 4096, r = 16) and the
# final sum's sequential loop, while 64 × (d/128) programs already fill an H100 at d ≥ 512.
_MAX_SPLITS = 64
# The final sum: 1024 fp32 per program are 4 KiB contiguous per range, read with 128-bit loads.
_SUM_BLOCK = 1024


def _reduce_config(x, grad_y) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_D, BLOCK_T, stages, warps) of the row reductions.

    64 rows × 256 bytes of columns (128 bf16, 64 fp32) per step, 3 stages: enough bytes in flight
    per program. 8 warps: at 4 the (BLOCK_D × r_block) accumulator, the transposed tile and the
    pipeline need more than 255 registers (the AOT gate measured 40–872 bytes of spills at r = 64
    and at K = 59). Unaligned rows (K = 59) load element by element through registers: half the
    tile (the gate still measured 64 bytes of spills at 64 × 128 with 8 warps on triton 3.6).
    BLOCK_T = 16 is tl.dot's minimum.
    """
    if is_interpreted(x):
        return 32, 32, 16, 1, 4
    if not vector_aligned(x, grad_y):
        return 32, 128 // x.element_size(), 16, 3, 4
    # sm_80 (mma.sync, operands in registers): 3 stages spilled 8 bytes at 16 bits; 2 do not.
    stages = 3 if target_arch(x) >= 90 or x.element_size() == 4 else 2
    return 64, 256 // x.element_size(), 16, stages, 8


def _rows_per_split(M: int, r: int, block_m: int) -> int:
    r_pad, _ = rank_blocks(r)
    n_split = min(cdiv(M, max(_MIN_SPLIT_ROWS, _ROWS_PER_RANK * r_pad)), _MAX_SPLITS)
    return cdiv(cdiv(M, n_split), block_m) * block_m  # equal ranges, whole row blocks


def _cublas_bwd(grad_y, x, weight, A, B, C, task_ids, u, scale: float, need):
    """fp32 without tf32 (see common.uses_cublas): the same gradients in torch, with the same id
    masking. dC is a one-hot product, not index_add: no atomics, so the bits never vary."""
    need_dx, need_dA, need_dB, need_dC, need_db = need
    T = C.shape[0]
    c = forward.masked_task_rows(C, task_ids)
    g = grad_y @ A
    w = g * c
    dx = torch.addmm(grad_y @ weight, w, B.t(), alpha=scale) if need_dx else None
    dA = (grad_y.t() @ (u * c)).mul_(scale) if need_dA else None
    dB = (x.t() @ w).mul_(scale) if need_dB else None
    dC = None
    if need_dC:
        ok = (task_ids >= 0) & (task_ids < T)
        hit = (task_ids[:, None] == torch.arange(T, device=x.device)[None, :]) & ok[:, None]
        dC = (hit.to(u.dtype).t() @ (u * g)).mul_(scale)
    db = grad_y.sum(0) if need_db else None
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dA, dB, dC, db))


def cp_linear_bwd(grad_y, x, weight, A, B, C, task_ids, u, scale: float, output_mask,
                  *, shrink_pass: bool | None = None):
    """(dx, dA, dB, dC, db) for 2-D inputs validated by ops.py; masked-off gradients are empty.

    `shrink_pass` forces how g = dY·A is computed (benchmarks compare both).
    """
    check_dtype(x)
    need_dx, need_dA, need_dB, need_dC, need_db = (bool(m) for m in output_mask)
    M, d_in = x.shape
    d_out, r = A.shape
    T = C.shape[0]
    if uses_cublas(x) and M > 0:
        return _cublas_bwd(grad_y, x, weight, A, B, C, task_ids, u, scale,
                           (need_dx, need_dA, need_dB, need_dC, need_db))
    # A fresh empty tensor per masked-off gradient: a custom op's outputs may not alias each other.
    # The kernels below write dA, dB, dC and db as contiguous buffers: they are allocated so here.
    dx, dA, dB, dC, db = (x.new_empty(shape if need else (0,)) for shape, need in zip(
        ((M, d_in), (d_out, r), (d_in, r), (T, r), (d_out,)), (need_dx, need_dA, need_dB, need_dC, need_db)))
    if M == 0:  # an empty batch contributes nothing: the factor gradients are zeros
        return dx, dA.zero_(), dB.zero_(), dC.zero_(), db.zero_()

    g = x.new_empty(M, r, dtype=torch.float32) if (need_dx or need_dB or need_dC) else None
    if need_dx:
        use_shrink = forward.uses_shrink_pass(M, d_in, r, shrink_pass)
        if use_shrink:
            forward.shrink(grad_y, A, g)
        forward.lowrank_gemm(grad_y, weight, A, B, C, task_ids, None, dx, g, scale, shrink_pass=use_shrink)
    elif need_dB or need_dC:
        forward.shrink(grad_y, A, g)
    if not (need_dA or need_dB or need_dC or need_db):
        return dx, dA, dB, dC, db

    block_m, block_d, block_t, stages, warps = _reduce_config(x, grad_y)
    _, r_block = rank_blocks(r)
    rows = _rows_per_split(M, r, block_m)
    n_split = cdiv(M, rows)
    ws = lambda *shape: torch.empty(n_split, *shape, dtype=torch.float32, device=x.device)  # noqa: E731
    ws_a = ws(d_out, r) if (need_dA or need_db) else None
    ws_bias = ws(d_out) if need_db else None
    ws_b = ws(d_in, r) if need_dB else None
    ws_c = ws(T, r) if need_dC else None
    # A program kind that is not launched still needs type-correct pointers: any fp32 buffer does.
    spare = next(w for w in (ws_a, ws_b, ws_c) if w is not None)
    ws_a, ws_bias, ws_b, ws_c = (w if w is not None else spare for w in (ws_a, ws_bias, ws_b, ws_c))
    g_arg = g if g is not None else spare
    nb_a = cdiv(d_out, block_d) if (need_dA or need_db) else 0
    nb_b = cdiv(d_in, block_d) if need_dB else 0
    nb_c = cdiv(T, block_t) if need_dC else 0
    if nb_a + nb_b + nb_c > 0:
        launch(_reduce_over_rows_kernel, (nb_a + nb_b + nb_c, n_split), (
            grad_y, x, u, g_arg, C, task_ids, ws_a, ws_bias, ws_b, ws_c,
            M, d_out, d_in, r, T, rows, nb_a, nb_b,
            grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), u.stride(0), u.stride(1),
            g_arg.stride(0), g_arg.stride(-1), C.stride(0), C.stride(1), task_ids.stride(0),
        ), dict(COLSUM=need_db, PRECISION=precision(x.dtype), R_BLOCK=r_block, BLOCK_M=block_m,
                BLOCK_D=block_d, BLOCK_T=block_t, num_warps=warps, num_stages=stages))

    sizes = [t.numel() for t in (dA, db, dB, dC)]
    n_blocks = sum(cdiv(n, _SUM_BLOCK) for n in sizes)
    if n_blocks > 0:
        outs = [t if t.numel() else spare for t in (dA, db, dB, dC)]  # n = 0 makes the pointer unused
        launch(_sum_splits_kernel, (n_blocks,), (
            ws_a, outs[0], sizes[0], ws_bias, outs[1], sizes[1], ws_b, outs[2], sizes[2],
            ws_c, outs[3], sizes[3], n_split, scale,
        ), dict(BLOCK=_SUM_BLOCK, num_warps=4))
    return dx, dA, dB, dC, db
