"""The `cp_linear` op contract: validation, backend dispatch, torch.library registration, autograd.

    y = x·W0ᵀ + b + scale · ((x·B) ⊙ C[t]) · Aᵀ        (ARCHITECTURE §1–2)

Everything user-facing is checked here, once; backends receive clean 2-D inputs:
x (M, d_in), weight (d_out, d_in), bias (d_out) or None, A (d_out, r), B (d_in, r), C (T, r) in
x's dtype, and task_ids (M,) int32/int64. Each backend provides two ops:

    fwd(x, weight, bias, A, B, C, task_ids, scale) -> (y, u)         u = x·B is saved for backward
    bwd(grad_y, x, weight, A, B, C, task_ids, u, scale, output_mask) -> (dx, dA, dB, dC, db)

`output_mask` selects the gradients to compute; the others come back as empty tensors.
The C++ backends (`cpu`, `cuda`) share the schemas `torch.ops.cpkernels.cp_linear_fwd/bwd`
(csrc/ops.cpp) and differ by dispatch key; the Triton backend registers
`torch.ops.cpkernels.triton_cp_linear_fwd/bwd` through `torch.library.triton_op`, lazily, so
that importing cpkernels never imports triton. One autograd formula (`_backward`) serves both.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import weakref

import torch

from . import _ext
from .reference import broadcast_task_ids, check_task_ids_dtype, cp_linear_reference

__all__ = ["cp_linear", "available_backends", "explain_backend", "BACKENDS"]

log = logging.getLogger("cpkernels")

#: Every backend name, in the order the automatic choice prefers them.
BACKENDS = ("triton", "cuda", "cpu", "reference")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --------------------------------------------------------------------------------------------
# Backend availability and choice
# --------------------------------------------------------------------------------------------
def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _why_unavailable(name: str, device_type: str) -> str | None:
    """None when backend `name` can run on `device_type` tensors in this process, else the reason."""
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device_type}"
        if _ext.LOAD_ERROR:
            return _ext.LOAD_ERROR
        return None if _ext.has_kernel("CPU") else "the extension was built without its CPU kernels"
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device_type}"
        if _ext.LOAD_ERROR:
            return _ext.LOAD_ERROR
        if not _ext.has_kernel("CUDA"):
            return ("the extension was built without CUDA (no CUDA toolkit or a CPU build of torch at build "
                    "time); rebuild with FORCE_CUDA=1 pip install --no-build-isolation .")
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton; Linux x86-64 only)"
        if device_type == "cpu" and not _triton_interpret():
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (for testing)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels need CUDA tensors, not {device_type}"
        try:
            _register_triton_ops()
        except Exception as exc:  # a broken triton install must not break the other backends
            return f"the Triton kernels failed to load: {type(exc).__name__}: {exc}"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends(device=None) -> list[str]:
    """The backends that work in this process, best first.

    With `device` (a torch.device or a string such as "cuda"), only those that run tensors on it;
    without, those that run on at least one device this process has.
    """
    if device is not None:
        types = [torch.device(device).type]
    else:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [n for n in BACKENDS if any(_why_unavailable(n, d) is None for d in types)]


def _requested_backend(backend: str | None) -> str | None:
    name = backend if backend is not None else os.environ.get("CPKERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        origin = "backend=" if backend is not None else "CPKERNELS_BACKEND="
        raise ValueError(f"{origin}{name!r} is not a backend; choose one of {BACKENDS}")
    return name


def _auto_order(device_type: str, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    # On CPU tensors the interpreter-driven Triton backend is a test tool, never an automatic pick;
    # Triton's tl.dot has no float64, the cuda backend has.
    if device_type != "cuda":
        return ("cpu", "reference")
    return ("cuda", "reference") if dtype == torch.float64 else ("triton", "cuda", "reference")


def _choose_backend(device_type: str, requested: str | None, dtype: torch.dtype | None = None) -> str:
    """Resolved once per (device type, request) at trace time, so torch.compile sees a constant."""
    if requested is not None:
        reason = _why_unavailable(requested, device_type)
        if reason is not None:
            raise RuntimeError(f"cpkernels backend {requested!r} is not available: {reason}")
        return requested
    for name in _auto_order(device_type, dtype):
        if _why_unavailable(name, device_type) is None:
            return name
    return "reference"


# What torch.compiler.assume_constant_result does, without importing torch._dynamo at import time
# (that costs 1-3 s on every `import cpkernels`). test_torch_compile_fullgraph_cpu fails if a torch
# release stops honouring the marker.
_choose_backend._dynamo_marked_constant = True


def explain_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """Say which backend `cp_linear` picks for tensors like `x`, and why the better ones were passed over."""
    device_type = x.device.type
    requested = _requested_backend(backend)
    if requested is not None:
        reason = _why_unavailable(requested, device_type)
        origin = "backend= argument" if backend is not None else "CPKERNELS_BACKEND"
        if reason is None:
            return f"{requested} (requested by {origin})"
        return f"{requested} was requested by {origin} but is not available: {reason}"
    lines = []
    for name in _auto_order(device_type, x.dtype):
        reason = _why_unavailable(name, device_type)
        if reason is None:
            lines.insert(0, f"{name} (automatic choice for {device_type} tensors)")
            return "\n  skipped ".join(lines)
        lines.append(f"{name}: {reason}")
    raise AssertionError("the reference backend is always available")


# --------------------------------------------------------------------------------------------
# Registration: fake kernels and the one autograd formula
# --------------------------------------------------------------------------------------------
def _fake_fwd(x, weight, bias, A, B, C, task_ids, scale):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[1])


def _fake_bwd(grad_y, x, weight, A, B, C, task_ids, u, scale, output_mask):
    shapes = (x.shape, A.shape, B.shape, C.shape, weight.shape[:1])
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask))


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, C, task_ids, scale = inputs
    ctx.save_for_backward(x, weight, A, B, C, task_ids, output[1])
    ctx.scale = scale


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_u):
        x, weight, A, B, C, task_ids, u = ctx.saved_tensors
        nx, _, nb, nA, nB, nC, _, _ = ctx.needs_input_grad
        dx, dA, dB, dC, db = bwd_op(grad_y, x, weight, A, B, C, task_ids, u, ctx.scale, [nx, nA, nB, nC, nb])
        keep = lambda g, need: g if need else None  # noqa: E731
        return keep(dx, nx), None, keep(db, nb), keep(dA, nA), keep(dB, nB), keep(dC, nC), None, None

    return backward


if _ext._C is not None:
    torch.library.register_fake("cpkernels::cp_linear_fwd")(_fake_fwd)
    torch.library.register_fake("cpkernels::cp_linear_bwd")(_fake_bwd)
    torch.library.register_autograd(
        "cpkernels::cp_linear_fwd", _make_backward(torch.ops.cpkernels.cp_linear_bwd), setup_context=_setup_context
    )


@functools.lru_cache(maxsize=None)
def _register_triton_ops() -> None:
    """Define torch.ops.cpkernels.triton_cp_linear_fwd/bwd on first use (imports triton)."""
    from torch.library import triton_op

    from ._triton import backward, forward

    @triton_op("cpkernels::triton_cp_linear_fwd", mutates_args=())
    def triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                   B: torch.Tensor, C: torch.Tensor, task_ids: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return forward.cp_linear_fwd(x, weight, bias, A, B, C, task_ids, scale)

    @triton_op("cpkernels::triton_cp_linear_bwd", mutates_args=())
    def triton_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                   B: torch.Tensor, C: torch.Tensor, task_ids: torch.Tensor, u: torch.Tensor, scale: float,
                   output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
        return backward.cp_linear_bwd(grad_y, x, weight, A, B, C, task_ids, u, scale, output_mask)

    torch.library.register_autograd(
        "cpkernels::triton_cp_linear_fwd", _make_backward(torch.ops.cpkernels.triton_cp_linear_bwd),
        setup_context=_setup_context,
    )


def _forward_op(name: str):
    return torch.ops.cpkernels.triton_cp_linear_fwd if name == "triton" else torch.ops.cpkernels.cp_linear_fwd


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _shape(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check_tensor(name: str, t, x: torch.Tensor, *, same_dtype: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if same_dtype and t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
    if not same_dtype and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(x, weight, bias, A, B, C, task_ids) -> torch.Tensor:
    """Validate every argument; return the task ids as a contiguous (M,) integer tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 (float64 for testing), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (*, d_in), got a 0-d tensor")
    _check_tensor("weight", weight, x, same_dtype=True)
    d_in = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"weight has shape {_shape(weight)}, expected (d_out, d_in={d_in}) for x of shape {_shape(x)}")
    if weight.requires_grad:
        raise ValueError("weight.requires_grad is True, but W0 is frozen by design in cp_linear; call "
                         "weight.requires_grad_(False) (only A, B, C and optionally bias are trained)")
    d_out = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, x, same_dtype=True)
        if bias.shape != (d_out,):
            raise ValueError(f"bias has shape {_shape(bias)}, expected (d_out={d_out},)")
    for name, f in (("A", A), ("B", B), ("C", C)):
        _check_tensor(name, f, x, same_dtype=False)
        if f.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {_shape(f)}")
    r = A.shape[1]
    if A.shape[0] != d_out:
        raise ValueError(f"A has shape {_shape(A)}, expected (d_out={d_out}, r) to match weight {_shape(weight)}")
    if B.shape != (d_in, r):
        raise ValueError(f"B has shape {_shape(B)}, expected (d_in={d_in}, r={r}); A is {_shape(A)}")
    if C.shape[1] != r:
        raise ValueError(f"C has shape {_shape(C)}, expected (num_tasks, r={r}); A is {_shape(A)}, B is {_shape(B)}")

    if isinstance(task_ids, torch.Tensor):
        check_task_ids_dtype(task_ids)
        if task_ids.device != x.device:
            raise ValueError(f"task_ids is on {task_ids.device} but x is on {x.device}")
        if task_ids.dtype not in (torch.int32, torch.int64):
            task_ids = task_ids.long()
    return _flat_task_ids(task_ids, x.shape[:-1], x.device, C.shape[0])


# Task-id tensors already checked, keyed by identity: every layer of a model usually receives the
# same ids tensor (task_context), so the value check (and the host sync it costs on CUDA) and the
# flattening copy of per-sample ids happen once per batch, not once per layer. An entry holds a weak
# reference to the tensor, the in-place version it was checked at, the number of tasks it needs, and
# the flat (M,) ids for one leading shape. (A WeakKeyDictionary would compare tensors with ==, so the
# map is keyed by id() and the weak reference removes the entry when the tensor dies.)
_checked_ids: dict[int, tuple] = {}


def _flat_task_ids(task_ids, lead_shape: torch.Size, device, num_tasks: int) -> torch.Tensor:
    """Check task_ids' form and values; return them as a contiguous (M,) tensor, one id per row.

    Out-of-range ids raise IndexError. Under torch.compile the value check becomes an async device
    assertion, and during CUDA-graph capture no check is possible (nothing is cached either, so a
    replay reads the ids tensor itself). The Triton and CUDA kernels never read out of bounds even
    unchecked (a row with a bad id gets no low-rank update); the CPU kernel checks again and raises.
    CPKERNELS_CHECK_TASK_IDS=off skips the check here.
    """
    flat = broadcast_task_ids(task_ids, lead_shape, device).reshape(-1)  # checks type and shape
    if isinstance(task_ids, int):
        if not 0 <= task_ids < num_tasks:
            raise IndexError(f"task_ids={task_ids} is outside [0, num_tasks={num_tasks}) (num_tasks = C.shape[0])")
        return flat
    if torch.compiler.is_compiling() or (task_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        if torch.compiler.is_compiling() and flat.numel() and os.environ.get("CPKERNELS_CHECK_TASK_IDS") != "off":
            ok = (flat.min() >= 0) & (flat.max() < num_tasks)
            torch._assert_async(ok, f"cp_linear: a task id is outside [0, num_tasks={num_tasks})")
        return flat.contiguous()
    key = id(task_ids)
    seen = _checked_ids.get(key)
    if (seen is not None and seen[0]() is task_ids and seen[1] == task_ids._version and seen[2] <= num_tasks
            and seen[3] == lead_shape):
        return seen[4] if seen[4] is not None else flat
    flat = flat.contiguous()
    needed = 0
    if flat.numel() and os.environ.get("CPKERNELS_CHECK_TASK_IDS") != "off":
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < 0 or hi >= num_tasks:
            i = int(((flat < 0) | (flat >= num_tasks)).nonzero()[0, 0])
            raise IndexError(f"task_ids must lie in [0, num_tasks={num_tasks}) (num_tasks = C.shape[0]); "
                             f"row {i} has task id {int(flat[i])}")
        needed = hi + 1
    elif flat.numel():
        needed = num_tasks  # unchecked: valid for this num_tasks only
    # Keep only a copy: a view would keep task_ids itself alive (views pin their base), and the entry
    # would never be dropped. A view costs nothing to rebuild anyway.
    copied = flat.untyped_storage().data_ptr() != task_ids.untyped_storage().data_ptr()
    _checked_ids[key] = (weakref.ref(task_ids, lambda _, k=key: _checked_ids.pop(k, None)), task_ids._version,
                         needed, lead_shape, flat if copied else None)
    return flat


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------
def _autocast_inputs(x, weight, bias):
    """Mirror F.linear under torch.autocast: compute in the autocast dtype."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return x, weight, bias


def cp_linear(x, weight, bias, A, B, C, task_ids, scale=1.0, *, backend=None):
    """Compute ``x·weightᵀ + bias + scale · ((x·B) ⊙ C[task_ids]) · Aᵀ`` with a fused backend.

    Args:
        x: (*, d_in) float32 / float16 / bfloat16 input.
        weight: (d_out, d_in) frozen base weight W0 (``requires_grad`` must be False).
        bias: (d_out,) or None; trained when it requires grad.
        A, B, C: the CP factors, (d_out, r), (d_in, r), (num_tasks, r). May be float32 master
            weights for a half-precision x; they are used in x's dtype and get gradients in their own.
        task_ids: an int, or an integer tensor of shape x.shape[:-1] (per row) or (x.shape[0],)
            (per sample).
        scale: the fixed scalar s.
        backend: "triton", "cuda", "cpu" or "reference"; default from CPKERNELS_BACKEND, else automatic.

    Returns:
        A (*, d_out) tensor in x's dtype.
    """
    x, weight, bias = _autocast_inputs(x, weight, bias)
    t = _check_inputs(x, weight, bias, A, B, C, task_ids)
    if A.shape[1] == 0:  # rank 0 (every component pruned): no update; backends only see r >= 1
        return torch.nn.functional.linear(x, weight, bias)
    name = _choose_backend(x.device.type, _requested_backend(backend), x.dtype)
    A, B, C = A.to(x.dtype), B.to(x.dtype), C.to(x.dtype)
    if name == "reference":
        return cp_linear_reference(x, weight, bias, A, B, C, t.reshape(x.shape[:-1]), scale)
    y, _ = _forward_op(name)(x.reshape(-1, x.shape[-1]), weight, bias, A, B, C, t, float(scale))
    return y.reshape(*x.shape[:-1], weight.shape[0])
