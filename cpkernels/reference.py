"""The einsum reference of `cp_linear`: the definition of correct.

    y = x·W0ᵀ + b + s · ((x·B) ⊙ C[t]) · Aᵀ

It is deliberately plain: no fusion, no custom autograd. Autograd differentiates it, and the
tests run it in float64 as the ground truth every backend is compared against.
"""
from __future__ import annotations

import torch

__all__ = ["cp_linear_reference", "broadcast_task_ids", "check_task_ids_dtype"]


def check_task_ids_dtype(task_ids: torch.Tensor) -> None:
    """Task ids index rows of C: floats, complex numbers and booleans are refused, not rounded."""
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise TypeError(f"task_ids must be an integer tensor (int32 or int64), got dtype {task_ids.dtype}")


def broadcast_task_ids(task_ids, lead_shape: torch.Size, device) -> torch.Tensor:
    """Expand `task_ids` to one id per row of x, i.e. to shape `lead_shape` (= x.shape[:-1]).

    Accepted forms (ARCHITECTURE §2):
      * a Python int: one task for the whole call;
      * a tensor of shape `lead_shape`: one task per row (token);
      * a tensor of shape `(lead_shape[0],)`: one task per sample, broadcast over the
        remaining leading dims (e.g. (batch,) ids for a (batch, seq, d_in) input).

    Only the form is resolved here; the values are checked by `ops.cp_linear`.
    """
    lead_shape = torch.Size(lead_shape)
    if isinstance(task_ids, bool) or not isinstance(task_ids, (int, torch.Tensor)):
        raise TypeError(f"task_ids must be an int or an integer tensor, got {type(task_ids).__name__}")
    if isinstance(task_ids, int):
        return torch.full(lead_shape, task_ids, dtype=torch.int64, device=device)
    if task_ids.shape == lead_shape:
        return task_ids
    if len(lead_shape) >= 1 and task_ids.shape == lead_shape[:1]:
        view = task_ids.reshape(task_ids.shape + (1,) * (len(lead_shape) - 1))
        return view.expand(lead_shape)
    if task_ids.dim() == 0:
        return task_ids.expand(lead_shape)
    raise ValueError(
        f"task_ids has shape {tuple(task_ids.shape)}, but x has leading shape {tuple(lead_shape)}: "
        f"expected {tuple(lead_shape)} (one task per row) or {tuple(lead_shape[:1])} (one task per sample)"
    )


def cp_linear_reference(x, weight, bias, A, B, C, task_ids, scale=1.0, *, backend=None):
    """Plain einsum implementation of `cpkernels.cp_linear` (same signature).

    Factors stored in another dtype than x (fp32 master weights with a bf16 x) are used in
    x's dtype, as the op contract says. `backend` is accepted for signature parity and ignored.
    """
    t = broadcast_task_ids(task_ids, x.shape[:-1], x.device).long()
    A, B, C = (f.to(x.dtype) for f in (A, B, C))
    u = torch.einsum("...k,kr->...r", x, B)
    v = u * C[t]
    delta = torch.einsum("...r,nr->...n", v, A)
    return torch.nn.functional.linear(x, weight, bias) + scale * delta
