"""The `cp_linear` op contract: validation, backend dispatch, torch.library registration, autograd.

    y = x·W0ᵀ + b + scale · ((x·B) ⊙ C[t]) · Aᵀ        (ARCHITECTURE §1–2)

Everything user-facing is checked here, once; backends receive clean 2-D inputs:
x (M, d_in), weight (d_out, d_in), a contiguous bias (d_out) or None, A (d_out, r) with r >= 1,
B (d_in, r), C (T, r) in x's dtype, and contiguous task_ids (M,) int32/int64. A kernel must treat
any id outside [0, T) as -1, "no adapter" (cpkernels/task_ids.py): ids reach it unchecked inside
compiled graphs and CUDA-graph replays. Each backend provides two ops:

    fwd(x, weight, bias, A, B, C, task_ids, scale) -> (y, u)         u = x·B is saved for backward
    bwd(grad_y, x, weight, A, B, C, task_ids, u, scale, output_mask) -> (dx, dA, dB, dC, db)

`output_mask` selects the gradients to compute; the others come back as empty tensors.
The C++ backends (`cpu`, `cuda`) share the schemas `torch.ops.cpkernels.cp_linear_fwd/bwd`
(csrc/ops.cpp) and differ by dispatch key; the Triton backend registers
`torch.ops.cpkernels.triton_cp_linear_fwd/bwd` through `torch.library.triton_op`, lazily, so
that importing cpkernels never imports triton. The autograd formula is `_make_backward` for the
Triton op and its C++ twin in csrc/host.cpp for the C++ ops (a Python autograd kernel costs ~4 µs per
call even under no_grad); when the backward is itself recorded (create_graph=True) both use
differentiable torch ops instead.

Eager calls first try the C++ host path (`_fast`, csrc/host.cpp): it checks the arguments and task
ids in C++ and calls the kernel, or returns None whenever the Python path below must look, which then
raises the error that names the argument. Compiled code, forward AD and torch.func always take the
Python path.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import numbers
import os
import warnings

import torch
import torch.autograd.forward_ad as forward_ad

from . import _ext
from . import task_ids as task_ids_mod
from .reference import cp_linear_reference

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


_warned_no_extension = False


def _warn_no_extension_once(x: torch.Tensor) -> None:
    """Say once per process that the automatic choice fell back to the einsum reference because the
    compiled extension is missing (typically: the source tree imported instead of the installed copy)."""
    global _warned_no_extension
    if _warned_no_extension:
        return
    _warned_no_extension = True
    warnings.warn(f"cpkernels: cp_linear runs the slow einsum reference, not the compiled kernels: "
                  f"{explain_backend(x)}", RuntimeWarning, stacklevel=3)


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
def _same_device(**tensors) -> None:
    """The raw ops' fake kernels run when any argument is on meta; mixed devices must not pass as shapes."""
    x = tensors["x"]
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"cp_linear: {name} is on {t.device} but x is on {x.device}; move them to one device")


def _fake_fwd(x, weight, bias, A, B, C, task_ids, scale):
    _same_device(x=x, weight=weight, bias=bias, A=A, B=B, C=C, task_ids=task_ids)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[1])


def _fake_bwd(grad_y, x, weight, A, B, C, task_ids, u, scale, output_mask):
    _same_device(x=x, grad_y=grad_y, weight=weight, A=A, B=B, C=C, task_ids=task_ids, u=u)
    shapes = (x.shape, A.shape, B.shape, C.shape, weight.shape[:1])
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask))


def _setup_context(ctx, inputs, output):
    x, weight, bias, A, B, C, task_ids, scale = inputs
    ctx.save_for_backward(x, weight, A, B, C, task_ids, output[1])
    ctx.scale = scale


def _differentiable_backward(grad_y, x, weight, A, B, C, task_ids, scale):
    """The backward formulas of ARCHITECTURE §1 in plain differentiable torch ops (for create_graph=True).

    Used when the backward itself is recorded (double backward, gradient penalties): the fused
    kernels are not differentiable, these are, to any order. Rows with id -1 select a zero row of C.
    """
    c = task_ids_mod.gather_rows(C, task_ids)  # (M, r)
    u, g = x @ B, grad_y @ A
    gc = g * c
    dx = grad_y @ weight + scale * (gc @ B.t())
    dA = scale * (grad_y.t() @ (u * c))
    dB = scale * (x.t() @ gc)
    # Segment sum as a one-hot product: a row with id -1 matches no task. (M × T: only this path.)
    one_hot = (task_ids.unsqueeze(1) == torch.arange(C.shape[0], device=C.device)).to(u.dtype)
    dC = scale * (one_hot.t() @ (u * g))
    return dx, dA, dB, dC, grad_y.sum(0)


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_u):
        x, weight, A, B, C, task_ids, u = ctx.saved_tensors
        nx, _, nb, nA, nB, nC, _, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # backward(create_graph=True): the gradients must carry a graph
            dx, dA, dB, dC, db = _differentiable_backward(grad_y, x, weight, A, B, C, task_ids, ctx.scale)
        else:
            dx, dA, dB, dC, db = bwd_op(grad_y, x, weight, A, B, C, task_ids, u, ctx.scale, [nx, nA, nB, nC, nb])
        keep = lambda g, need: g if need else None  # noqa: E731
        return keep(dx, nx), None, keep(db, nb), keep(dA, nA), keep(dB, nB), keep(dC, nC), None, None

    return backward


# The autograd of cp_linear_fwd is C++ (csrc/host.cpp, the same formulas as _make_backward): a Python
# autograd kernel would cost ~4 µs per call even under no_grad, and ~25 µs with grad (issue 19).
if _ext._C is not None:
    torch.library.register_fake("cpkernels::cp_linear_fwd")(_fake_fwd)
    torch.library.register_fake("cpkernels::cp_linear_bwd")(_fake_bwd)


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


def _check_is_tensor(name: str, t) -> None:
    """A tensor, and a dense one: lists, numpy arrays, None and sparse tensors are refused by name."""
    if not isinstance(t, torch.Tensor):
        hint = " (convert it with torch.as_tensor)" if hasattr(t, "__array__") or isinstance(t, (list, tuple)) else ""
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}; call .to_dense() first")


def _check_tensor(name: str, t, x: torch.Tensor, *, same_dtype: bool) -> None:
    _check_is_tensor(name, t)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if same_dtype and t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
    if not same_dtype and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(x, weight, bias, A, B, C, task_ids) -> torch.Tensor:
    """Validate every argument; return the task ids as a contiguous (M,) integer tensor (cpkernels.task_ids)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16 (float64 for testing), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (*, d_in), got a 0-d tensor")
    _check_tensor("weight", weight, x, same_dtype=True)
    d_in = x.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got shape {_shape(weight)}")
    if weight.shape[1] != d_in:  # name x first: the weight is usually right and the input the wrong width
        raise ValueError(f"x has shape {_shape(x)}, so d_in={d_in}, but weight has shape {_shape(weight)}, which "
                         f"takes inputs of width {weight.shape[1]}: x's last dimension must equal weight.shape[1]")
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
        task_ids_mod.check_dtype(task_ids)
        if task_ids.device != x.device:
            raise ValueError(f"task_ids is on {task_ids.device} but x is on {x.device}")
    return task_ids_mod.resolve(task_ids, x.shape[:-1], x.device, C.shape[0])


def _check_scale(scale) -> float:
    """scale is a fixed constant (like LoRA's alpha / r): a real number, or a tensor that needs no grad."""
    if isinstance(scale, torch.Tensor):
        if scale.requires_grad:
            raise TypeError("scale is a tensor that requires grad, but cp_linear treats scale as a constant and "
                            "would drop its gradient; pass a float (or scale.detach()), or train a factor instead")
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single number, got a tensor of shape {tuple(scale.shape)}")
        return float(scale)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number (int or float), got {type(scale).__name__} {scale!r}")
    return float(scale)


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


def _needs_reference(A: torch.Tensor) -> str | None:
    """Why the fused kernels cannot serve this call (the reference then does, exactly), or None.

    Forward-mode AD and torch.func transforms (jvp, grad, vmap, jacrev) would reach the custom ops,
    which have no forward derivative or batching rule: the tangent would be dropped or the call fail.
    """
    if A.shape[1] == 0:  # rank 0 (every component pruned): empty factor gradients, no kernel work
        return "rank 0"
    if torch.compiler.is_compiling():
        return None
    if forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): inputs may carry tangents
        return "forward-mode AD is active"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform is active"
    return None


#: The eager backend choice per (x on CUDA, requested backend, x's dtype): _choose_backend's answer,
#: remembered so that a call pays one dict lookup for it.
_EAGER_CHOICE: dict = {}
# os.environ.get("CPKERNELS_BACKEND") costs ~0.4 µs (a key encode and two Mapping calls), a tenth of
# F.linear at a tiny shape; the dict behind os.environ answers the same in ~0.05 µs and os.environ
# keeps it current. (A CPython detail: where it is missing, os.environ.get is used.)
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("CPKERNELS_BACKEND") if _ENVIRON is not None else None


def _env_backend() -> str | None:
    if _ENVIRON is None:
        return os.environ.get("CPKERNELS_BACKEND") or None
    value = _ENVIRON.get(_ENV_KEY)
    return os.environ.decodevalue(value) or None if value is not None else None


def _eager_backend(x: torch.Tensor, backend):
    """The backend an eager call on plain CPU/CUDA tensors goes to, or None to let the full path decide.

    Reads CPKERNELS_BACKEND on every call (setting it later still counts)."""
    requested = backend if backend is not None else _env_backend()
    key = (x.is_cuda, requested, x.dtype)
    name = _EAGER_CHOICE.get(key)
    if name is None and (x.is_cuda or x.is_cpu) and (requested is None or requested in BACKENDS):
        try:
            name = _EAGER_CHOICE[key] = _choose_backend("cuda" if x.is_cuda else "cpu", requested, x.dtype)
        except RuntimeError:  # an unavailable backend: the full path raises the error that says why
            return None
    return name


def _fast(x, weight, bias, A, B, C, task_ids, scale, backend):
    """The eager host path (issue 19): checks, task ids and dispatch in C++ (csrc/host.cpp).

    Returns y, or None whenever anything needs a closer look: the C++ side only decides that every
    argument is valid and never explains; the full Python path below then raises the error that names
    the argument (or serves the call: lists of ids, autocast, rank 0, tensor subclasses ...).
    """
    if (torch.compiler.is_compiling() or forward_ad._current_level >= 0
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return None  # dynamo traces the Python path; forward AD and torch.func need the reference
    name = _eager_backend(x, backend)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # no id check may sync during CUDA-graph capture
    hi = task_ids_mod.owned_max(task_ids)
    try:
        if name == "cpu" or name == "cuda":
            return _ext._C.forward(x, weight, bias, A, B, C, task_ids, scale, hi)
        inputs = _ext._C.prepare(x, weight, bias, A, B, C, task_ids, hi) if name == "triton" else None
    except TypeError:  # an argument that is not a tensor (pybind's message names none): the full path says
        return None
    if inputs is not None:
        x2, b2, A2, B2, C2, t2 = inputs
        if torch.is_grad_enabled() and (x2.requires_grad or A2.requires_grad or B2.requires_grad or C2.requires_grad
                                        or (b2 is not None and b2.requires_grad)):
            y, _ = torch.ops.cpkernels.triton_cp_linear_fwd(x2, weight, b2, A2, B2, C2, t2, scale)
        else:  # nothing to record: the launcher itself, without the custom op's ~8 µs of Python around it
            y, _ = _triton_launcher()(x2, weight, b2, A2, B2, C2, t2, scale)
        return y.view(*x.shape[:-1], weight.shape[0])
    return None


@functools.lru_cache(maxsize=None)
def _triton_launcher():
    from ._triton import forward

    return forward.cp_linear_fwd


def cp_linear(x, weight, bias, A, B, C, task_ids, scale=1.0, *, backend=None):
    """Compute ``x·weightᵀ + bias + scale · ((x·B) ⊙ C[task_ids]) · Aᵀ`` with a fused backend.

    Args:
        x: (*, d_in) float32 / float16 / bfloat16 input.
        weight: (d_out, d_in) frozen base weight W0 (``requires_grad`` must be False).
        bias: (d_out,) or None; trained when it requires grad.
        A, B, C: the CP factors, (d_out, r), (d_in, r), (num_tasks, r). May be float32 master
            weights for a half-precision x; they are used in x's dtype and get gradients in their own.
        task_ids: an int, or an integer tensor of shape x.shape[:-1] (per row) or (x.shape[0],)
            (per sample). An id in [0, num_tasks) selects C[id]; -1 means no adapter (the row gets
            x·weightᵀ + bias only). See `cpkernels.task_ids` for the full contract.
        scale: the fixed scalar s (a number; a tensor that requires grad is refused).
        backend: "triton", "cuda", "cpu" or "reference"; default from CPKERNELS_BACKEND, else automatic.

    Returns:
        A (*, d_out) tensor in x's dtype.
    """
    # Plain tensors only: a subclass of x may override __torch_function__, which the C++ path would skip.
    if (_ext._C is not None and type(task_ids) is torch.Tensor and type(x) is torch.Tensor
            and (type(scale) is float or type(scale) is int)):
        y = _fast(x, weight, bias, A, B, C, task_ids, scale, backend)
        if y is not None:
            return y
    _check_is_tensor("x", x)
    _check_is_tensor("weight", weight)
    if bias is not None:
        _check_is_tensor("bias", bias)
    scale = _check_scale(scale)
    x, weight, bias = _autocast_inputs(x, weight, bias)
    t = _check_inputs(x, weight, bias, A, B, C, task_ids)
    requested = _requested_backend(backend)
    name = _choose_backend(x.device.type, requested, x.dtype)
    if name == "reference" and requested is None and _ext._C is None and not torch.compiler.is_compiling():
        _warn_no_extension_once(x)
    why = _needs_reference(A)
    if why is not None:
        if not torch.compiler.is_compiling():  # (dynamo cannot trace a logging call)
            log.debug("cp_linear: %s, so the reference computes this call instead of %s", why, name)
        name = "reference"
    A, B, C = A.to(x.dtype), B.to(x.dtype), C.to(x.dtype)
    if name == "reference":
        return cp_linear_reference(x, weight, bias, A, B, C, t.reshape(x.shape[:-1]), scale)
    # Backends get clean inputs: 2-D x (reshape by the row count, which d_in = 0 cannot infer) and a
    # contiguous bias (a strided or expanded bias, e.g. torch.randn(1).expand(n), has stride != 1).
    y, _ = _forward_op(name)(x.reshape(t.shape[0], x.shape[-1]), weight,
                             bias.contiguous() if bias is not None else None, A, B, C, t, scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])
