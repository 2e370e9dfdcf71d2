"""Every task-id rule of `cp_linear`, in one place (ARCHITECTURE §2).

The contract:
  * dtype: an int, a list or tuple of ints (taken as torch.as_tensor would), or an integer tensor of
    any width, signed or unsigned (int32/int64 are used as they are, the others widened to int64;
    uint64 values of 2**63 and above are refused by value, never wrapped to -1). Floats, booleans,
    complex numbers and sparse tensors are refused, never rounded.
  * form: a Python int (one task for the whole call), a tensor of shape x.shape[:-1] (one task per
    row), of shape (x.shape[0],) (one task per sample, broadcast over the other leading dims), or 0-d.
  * values: an id in [0, num_tasks) selects C[id]; NO_ADAPTER (-1) means "no adapter": the row gets
    exactly x·W0ᵀ + b and contributes nothing to dA, dB or dC. Any other id raises TaskIdError (an
    IndexError, and a ValueError) naming task_ids, the row and num_tasks.
  * Where no check can run (inside torch.compile graphs, during CUDA-graph capture, on meta tensors,
    or with CPKERNELS_CHECK_TASK_IDS=off), every backend treats an out-of-range row as -1: it never
    reads out of bounds, and the row gets the base layer only.

The check cache is safe by construction: it never trusts a tensor that someone else can modify.
`own()` copies ids into a fresh tensor the library owns, checks its values once (one aminmax, so one
host sync per batch on CUDA) and records (min, max) in a map keyed by identity, whose entries die with
their tensors (a weak reference confirms the identity). `resolve()` recognises an
owned tensor and only compares that range with each layer's num_tasks, on the host: no device sync
and no re-check per layer. Any other tensor is checked on every call: its memory may change behind
our back (numpy views, `.data` writes, inference-mode tensors with no version counter).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["NO_ADAPTER", "TaskIdError", "check_dtype", "broadcast", "own", "is_owned", "owned_max", "resolve",
           "gather_rows"]

#: The id of a row that gets no adapter (the LoRA serving convention).
NO_ADAPTER = -1


class TaskIdError(IndexError, ValueError):
    """A task id outside [0, num_tasks) other than -1. An IndexError (an index into C) that is also a
    ValueError (a bad argument value), so either `except` clause catches it."""


def check_dtype(task_ids: torch.Tensor) -> None:
    """Task ids index rows of C: floats, complex numbers, booleans and sparse tensors are refused."""
    if task_ids.layout != torch.strided:
        raise TypeError(f"task_ids must be a dense tensor, got layout {task_ids.layout}")
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor (int32 or int64), got dtype {task_ids.dtype}")


def _check_type(task_ids) -> None:
    if isinstance(task_ids, bool) or not isinstance(task_ids, (int, torch.Tensor)):
        raise TypeError(f"task_ids must be an int, a list of ints or an integer tensor, got "
                        f"{type(task_ids).__name__}")
    if isinstance(task_ids, torch.Tensor):
        check_dtype(task_ids)


def _from_sequence(task_ids, device=None) -> torch.Tensor:
    """A list or tuple of ints (nested for per-row ids) as an int64 tensor, as torch.as_tensor makes it.

    The values are range-checked first (by position, as for a tensor), so an int beyond int64 is a
    TaskIdError, not an overflow."""
    def walk(item, index):
        if isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                yield from walk(sub, index + (i,))
        elif isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"task_ids given as a {type(task_ids).__name__} must hold ints only, got "
                            f"{type(item).__name__} {item!r}")
        else:
            yield index, item

    for index, t in walk(task_ids, ()):
        if not NO_ADAPTER <= t < 2 ** 63:
            where = f"row {index[0]}" if len(index) == 1 else f"task_ids{list(index)}"
            raise _range_error(f"{where} has task id {t}", None)
    return torch.as_tensor(task_ids, dtype=torch.int64, device=device)


def _signed(ids: torch.Tensor) -> torch.Tensor:
    """int32/int64 ids as they are; other integer dtypes as int64. uint64 is reinterpreted, not converted
    (the conversion is not implemented everywhere): its values of 2**63 and above then read as negative,
    which the value check refuses, or which the kernels treat as out of range where no check runs."""
    if ids.dtype in (torch.int32, torch.int64):
        return ids
    if ids.dtype == torch.uint64:
        return ids.view(torch.int64)
    return ids.to(torch.int64)


def broadcast(task_ids, lead_shape, device) -> torch.Tensor:
    """Expand `task_ids` to one id per row of x, i.e. to shape `lead_shape` (= x.shape[:-1]).

    Checks the type and the form, not the values. The result may be a broadcast view.
    """
    lead_shape = torch.Size(lead_shape)
    if isinstance(task_ids, (list, tuple)):
        task_ids = _from_sequence(task_ids, device)
    _check_type(task_ids)
    if isinstance(task_ids, int):
        _check_int(task_ids)
        return torch.full(lead_shape, task_ids, dtype=torch.int64, device=device)
    if task_ids.shape == lead_shape:
        return task_ids
    if len(lead_shape) >= 1 and task_ids.shape == lead_shape[:1]:
        return task_ids.reshape(task_ids.shape + (1,) * (len(lead_shape) - 1)).expand(lead_shape)
    if task_ids.dim() == 0:
        return task_ids.expand(lead_shape)
    forms = f"{tuple(lead_shape)} (one task per row)"
    if len(lead_shape) > 1:  # with one leading dim, per row and per sample are the same shape
        forms += f" or {tuple(lead_shape[:1])} (one task per sample)"
    raise ValueError(f"task_ids has shape {tuple(task_ids.shape)}, but x has leading shape {tuple(lead_shape)}: "
                     f"expected {forms}, or a single id")


def _range_error(what: str, num_tasks: int | None) -> TaskIdError:
    allowed = f"[0, num_tasks={num_tasks}) (num_tasks = C.shape[0])" if num_tasks is not None else "[0, num_tasks)"
    return TaskIdError(f"task_ids must lie in {allowed} or be -1 (no adapter); {what}")


def _check_int(task_id: int, num_tasks: int | None = None) -> None:
    # Checked before any tensor is made: an int beyond int64 must not surface as an overflow error.
    if task_id < NO_ADAPTER or (num_tasks is not None and task_id >= num_tasks) or task_id >= 2 ** 63:
        raise _range_error(f"got task_ids={task_id}", num_tasks)


def _first_bad(ids: torch.Tensor, num_tasks: int | None, original: torch.Tensor | None = None) -> TaskIdError:
    """The error for the first out-of-range entry of `ids` (there is one); names its index in `ids`.

    `ids` are signed (`_signed`); `original` is what the caller passed, whose value the message shows
    (a uint64 id of 2**64 - 1 is named as such, not as the -1 it reads as)."""
    bad = ids < NO_ADAPTER
    if num_tasks is not None:
        bad |= ids >= num_tasks
    if original is not None and original.dtype == torch.uint64:
        bad |= ids < 0  # 2**63 and above: never "no adapter"
    index = tuple(int(i) for i in bad.nonzero()[0]) if ids.dim() else ()
    where = {0: "task_ids", 1: f"row {index[0]}" if index else ""}.get(len(index), f"task_ids{list(index)}")
    value = int(ids[index])
    if original is not None and original.dtype == torch.uint64 and value < 0:
        value += 2 ** 64
    return _range_error(f"{where} has task id {value}", num_tasks)


def _checks_enabled() -> bool:
    return os.environ.get("CPKERNELS_CHECK_TASK_IDS", "on").lower() not in ("off", "0", "false", "no")


def _cannot_check(ids: torch.Tensor) -> bool:
    """No values can be read: compiled graphs, CUDA-graph capture, meta tensors, torch.func (vmap) wrappers."""
    return (torch.compiler.is_compiling() or ids.device.type == "meta"
            or (ids.is_cuda and torch.cuda.is_current_stream_capturing())
            or torch._C._functorch.is_functorch_wrapped_tensor(ids))


# ------------------------------------------------------------------------------------------------
# Owned ids: checked once per batch
# ------------------------------------------------------------------------------------------------
@dataclass
class _Owned:
    lo: int  # min and max of the values; (0, -1) for an empty tensor
    hi: int
    flat: dict = field(default_factory=dict)  # lead shape -> contiguous (M,) copy (per-sample form only)


# Keyed by id(tensor), with a weak reference that confirms the identity (an id can be reused once its
# tensor is gone) and whose callback removes the entry when the tensor dies. A lookup is one dict get and
# one weakref call, ~0.1 µs: it sits on every layer call (issue 19; a WeakIdKeyDictionary cost ~2 µs).
# A value never references its key (the flat copies are copies, not views), so nothing is kept alive.
_owned: dict[int, tuple[weakref.ref, _Owned]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _owned.get(key)
    if entry is not None and entry[0] is ref:
        del _owned[key]


def _owned_entry(task_ids) -> _Owned | None:
    entry = _owned.get(id(task_ids))
    return entry[1] if entry is not None and entry[0]() is task_ids else None


def own(task_ids, device=None) -> torch.Tensor:
    """Copy `task_ids` (an int, a list of ints or an integer tensor) into a fresh tensor the library owns.

    The values are checked once here (ids below -1 raise now; the upper bound is compared with each
    layer's num_tasks without touching the device) and `cp_linear` then skips the per-call check for
    this tensor. Give it to cp_linear / the layers and do not modify it in place: the library relies on
    nobody else writing to it (that is what makes the cache safe). Works under torch.inference_mode.
    """
    if torch.compiler.is_compiling():
        # Raised, not traced: dynamo cannot read the values (a data-dependent guard) nor set the ContextVar
        # that routes them. Without fullgraph, dynamo runs this frame eagerly instead and all is well; with
        # fullgraph=True, this message is what the user reads (issue 21).
        raise RuntimeError(
            "cpkernels: task ids cannot be routed inside a torch.compile(fullgraph=True) region (task_ids= on "
            "a converted model, or task_context/own inside the compiled code): their values are checked once "
            "per batch and routed through a ContextVar, which dynamo cannot trace. Enter `with "
            "cpkernels.task_context(model, task_ids):` outside the compiled call and call the compiled model "
            "inside it without task_ids=, or pass task_ids= to the FusedCPLinear layers themselves")
    if isinstance(task_ids, (list, tuple)):
        task_ids = _from_sequence(task_ids)
    elif isinstance(task_ids, int) and not isinstance(task_ids, bool):
        _check_int(task_ids)
        task_ids = torch.tensor(task_ids, dtype=torch.int64)
    else:
        _check_type(task_ids)
    target = torch.device(device) if device is not None else task_ids.device
    if task_ids.device.type == "meta" or target.type == "meta":
        raise ValueError("task_ids on the meta device have no values to own; pass them to cp_linear directly")
    signed = _signed(task_ids)
    dtype = signed.dtype if signed.dtype == torch.int32 else torch.int64
    owned = signed.to(device=target, dtype=dtype, copy=True)
    if owned.numel() == 0:
        lo, hi = 0, -1
    else:
        lo, hi = (int(v) for v in torch.aminmax(owned))  # the one host sync per batch
        if lo < NO_ADAPTER or (lo < 0 and task_ids.dtype == torch.uint64):
            raise _first_bad(owned, None, task_ids)
    key = id(owned)
    _owned[key] = (weakref.ref(owned, lambda ref, key=key: _forget(key, ref)), _Owned(lo, hi))
    return owned


def is_owned(task_ids) -> bool:
    """True for a tensor made by `own()`."""
    return isinstance(task_ids, torch.Tensor) and _owned_entry(task_ids) is not None


def owned_max(task_ids) -> int | None:
    """The largest id of a tensor made by `own()` (checked when it was made), else None."""
    entry = _owned_entry(task_ids)
    return entry.hi if entry is not None else None


# ------------------------------------------------------------------------------------------------
# What cp_linear calls
# ------------------------------------------------------------------------------------------------
def resolve(task_ids, lead_shape, device, num_tasks: int) -> torch.Tensor:
    """Check `task_ids` against x's leading shape and num_tasks; return a contiguous (M,) int tensor.

    The tensor's device must already be x's (ops.py checks it, naming both).
    """
    lead_shape = torch.Size(lead_shape)
    if isinstance(task_ids, int) and not isinstance(task_ids, bool):
        if _checks_enabled():
            _check_int(task_ids, num_tasks)
        return broadcast(task_ids, lead_shape, device).reshape(-1)
    if isinstance(task_ids, (list, tuple)):
        task_ids = _from_sequence(task_ids, device)
    original = task_ids
    rows, ids = _signed(broadcast(task_ids, lead_shape, device)), _signed(task_ids)
    if _cannot_check(original):
        return rows.reshape(-1).contiguous()  # the kernels mask out-of-range rows (they act as -1)
    entry = _owned_entry(original)
    if entry is not None:
        if entry.hi >= num_tasks and _checks_enabled():
            raise _first_bad(original, num_tasks)
        if rows is original:  # per-row form: an owned tensor is contiguous, so this is a free view
            return rows.reshape(-1)
        flat = entry.flat.get(lead_shape)
        if flat is None:
            flat = entry.flat[lead_shape] = rows.reshape(-1).contiguous()
        return flat
    flat = rows.reshape(-1).contiguous()
    if flat.numel() and _checks_enabled():
        lo, hi = (int(v) for v in torch.aminmax(ids))  # the ids themselves: no bigger than flat
        if lo < NO_ADAPTER or hi >= num_tasks or (lo < 0 and original.dtype == torch.uint64):
            raise _first_bad(ids, num_tasks, original)  # indexed as the caller passed them (per row or sample)
    return flat


def gather_rows(C: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """C[task_ids] with a zero row wherever the id is outside [0, T) (-1, or an unchecked bad id).

    The reference's way to follow the -1 semantics without ever indexing out of bounds.
    """
    valid = ((task_ids >= 0) & (task_ids < C.shape[0])).unsqueeze(-1)
    if C.shape[0] == 0:  # no task at all: every row is a base-layer row
        return C.new_zeros(task_ids.shape + C.shape[1:])
    rows = C[torch.where(valid.squeeze(-1), task_ids, 0).long()]
    return torch.where(valid, rows, rows.new_zeros(()))  # where, not a product: a NaN in C[0] stays out
