"""What the Triton forward and backward share: rank blocks, precision, dtype checks, tile configs,
and the one place where every kernel is launched.

Vocabulary used by every kernel and launcher here:
  proj        the rank-r projection a·p (M × r): u = X·B in the forward, g = dY·A for dX.
  shrink_pass True when proj comes from the separate shrink pass (`forward.shrink`) and the GEMM
              reads it in its epilogue; False when the GEMM computes proj itself in its K loop
              (the "in-loop" fusion). One name, one polarity, everywhere (SHRINK_PASS in kernels).

The launch seam (`launch`) exists for the AOT compile gate (`python -m cpkernels._triton.aot`):
it runs the real launchers on `meta` tensors with a recorder installed, so the gate compiles
exactly the launches (arguments, constexprs, autotune configs) that the launchers make.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Callable

import torch
import triton
from torch.library import wrap_triton

# Hopper's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200):
# a config above it fails at launch with "out of resource: shared memory".
SMEM_LIMIT = {90: 232_448, 80: 166_912}
# tl.dot's smallest operand side: ranks and task blocks are padded (and masked) to it.
MIN_DOT = 16
# The in-loop fusion holds proj (BLOCK_M × R_BLOCK fp32) next to the main accumulator; beyond 64
# columns ((128 × 64) fp32 = 64 registers per thread at 4 warps) it would crowd it out, so wider
# ranks are processed in chunks of 64 (and take the shrink pass).
R_BLOCK_MAX = 64


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions from triton
# 3.6 on: called from Python they unwrap their arguments first and cost 2-4 µs each, and a launch made ~6
# of them (measured: 36 µs of host work per tiny call with the launches stubbed, 24 of them in these).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0  # triton's answer for 0 too


def rank_blocks(R: int) -> tuple[int, int]:
    """(r_pad, r_block): the rank padded to tl.dot's minimum (masked), and its chunk size.

    int(R) specialises a symbolic rank under torch.compile: R_BLOCK is a compile-time constant.
    """
    r_pad = max(MIN_DOT, next_power_of_2(int(R)))
    return r_pad, min(r_pad, R_BLOCK_MAX)


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 goes through tf32 only when torch allows it for matmuls."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def uses_cublas(x: torch.Tensor) -> bool:
    """fp32 without tf32 on a GPU: torch (cuBLAS) does the work, not the Triton kernels.

    Triton has no fp32 tensor-core MMA, so `ieee` tl.dot runs on the FMA units: ptxas spills 27–66 KB
    per thread at the bf16 tile sizes and even good tiles reach a fraction of cuBLAS's SGEMM (which
    is itself FMA-bound, 67 TFLOP/s on an H100). Under the interpreter the kernels still run, so
    their arithmetic stays tested.
    """
    return x.dtype == torch.float32 and precision(x.dtype) == "ieee" and not is_interpreted(x)


def check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32, float16 and bfloat16, got x of dtype {x.dtype}; "
                        f"use backend='reference' (or 'cpu') for {x.dtype}")


def is_interpreted(t: torch.Tensor) -> bool:
    """Triton runs CPU tensors only under TRITON_INTERPRET=1."""
    return t.device.type == "cpu"


def vector_aligned(*tensors: torch.Tensor) -> bool:
    """Whether Triton will know every row of these 2-D operands starts 16-byte aligned: it
    specialises integer arguments on divisibility by 16 (elements), so a stride must be a multiple
    of 16 and the start 16-byte aligned (storage_offset: torch's allocator aligns the storage, and
    data_ptr() is not available on fake tensors under torch.compile)."""
    return all((t.storage_offset() * t.element_size()) % 16 == 0 and all(s % 16 == 0 or s == 1 for s in t.stride())
               for t in tensors)


def config(bm, bn, bk, stages, warps, group_m=8) -> triton.Config:
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m),
                         num_stages=stages, num_warps=warps)


def gemm_smem_bytes(cfg: triton.Config, elem_bytes: int, r_block: int, shrink_pass: bool) -> int:
    """A lower bound on the GEMM's shared memory: the pipelined K-loop buffers (a, w and, in-loop,
    p tiles per stage). Used only to prune configs that cannot fit before the autotuner compiles
    them; the AOT gate measures the real figure."""
    k = cfg.kwargs
    per_stage = k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]
    if not shrink_pass:
        per_stage += k["BLOCK_K"] * r_block
    return cfg.num_stages * per_stage * elem_bytes


# Set by the AOT gate to the architecture it compiles for (meta tensors have no device to ask).
TARGET_SMEM_LIMIT: int | None = None
TARGET_ARCH: int = 90


def target_arch(t: torch.Tensor) -> int:
    """The compute capability the kernels are built for (90 = sm_90): the tensor's GPU, the AOT
    gate's target for meta tensors, 0 under the interpreter."""
    if t.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(t.device)
        return major * 10 + minor
    return TARGET_ARCH if t.device.type == "meta" else 0


def current_smem_limit() -> int:
    """The device's opt-in shared memory per block, or Hopper's when there is no device."""
    if TARGET_SMEM_LIMIT is not None:
        return TARGET_SMEM_LIMIT
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        limit = getattr(props, "shared_memory_per_block_optin", 0)
        if limit:
            return int(limit)
    return SMEM_LIMIT[90]


# ------------------------------------------------------------------------------------------------
# The launch seam
# ------------------------------------------------------------------------------------------------
_recorder: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("cpkernels_triton_recorder",
                                                                             default=None)


@contextlib.contextmanager
def recording(record: Callable):
    """Within this block, `launch` calls record(kernel, grid, args, kwargs) instead of launching."""
    token = _recorder.set(record)
    try:
        yield
    finally:
        _recorder.reset(token)


def launch(kernel, grid, args: tuple, kwargs: dict) -> None:
    """kernel[grid](*args, **kwargs) through torch's wrap_triton (traceable by torch.compile)."""
    record = _recorder.get()
    if record is not None:
        record(kernel, grid, args, kwargs)
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Autotuning that is safe inside CUDA-graph capture
# ------------------------------------------------------------------------------------------------
# The autotuner benchmarks every config on its first call for a key: it synchronises, allocates
# and times kernels, none of which may happen while a CUDA graph is being captured. So a key is
# remembered once it has been tuned outside capture; a capture that meets an untuned key launches
# the fixed config instead (and warns once: warming up outside the capture gives the tuned one).
_tuned_keys: set = set()
_warned_capture = False


def tune_key(kernel, named: dict, keys: list[str]) -> tuple:
    return (id(kernel), *(named[k] for k in keys),
            *(str(v.dtype) for v in named.values() if isinstance(v, torch.Tensor)))


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launch_tuned(tuned, fixed, fixed_cfg: triton.Config, grid_of: Callable, args: tuple, kwargs: dict,
                 key: tuple) -> None:
    """Launch the autotuned kernel, or `fixed` with `fixed_cfg` when the autotuner cannot run
    (a CUDA-graph capture meeting a key that was never tuned)."""
    global _warned_capture
    compiling = torch.compiler.is_compiling()
    if not compiling and key not in _tuned_keys and capturing():
        if not _warned_capture:
            _warned_capture = True
            warnings.warn("cpkernels: a Triton kernel met a new shape inside CUDA-graph capture; it runs a fixed "
                          "tile config instead of autotuning. Run one step outside the capture first (warm-up) "
                          "to get the tuned config.", stacklevel=3)
        launch(fixed, (grid_of(fixed_cfg.kwargs),), args, {**kwargs, **fixed_cfg.all_kwargs()})
        return
    launch(tuned, lambda meta: (grid_of(meta),), args, kwargs)
    if not compiling and _recorder.get() is None:
        _tuned_keys.add(key)
