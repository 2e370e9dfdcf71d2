"""The einsum reference of `cp_linear`: the definition of correct.

    y = x·W0ᵀ + b + s · ((x·B) ⊙ C[t]) · Aᵀ

It is deliberately plain: no fusion, no custom autograd. Autograd differentiates it (to any order,
forward mode and torch.func included), and the tests run it in float64 as the ground truth every
backend is compared against. Task ids follow `cpkernels.task_ids`: a row with id -1 gets no adapter.
"""
from __future__ import annotations

import torch

from .task_ids import broadcast as broadcast_task_ids
from .task_ids import check_dtype as check_task_ids_dtype
from .task_ids import gather_rows

# broadcast_task_ids and check_task_ids_dtype are re-exported for code that imported them from here.
__all__ = ["cp_linear_reference", "broadcast_task_ids", "check_task_ids_dtype"]


def cp_linear_reference(x, weight, bias, A, B, C, task_ids, scale=1.0, *, backend=None):
    """Plain einsum implementation of `cpkernels.cp_linear` (same signature).

    Factors stored in another dtype than x (fp32 master weights with a bf16 x) are used in
    x's dtype, as the op contract says. Rows whose id is -1 (or, unchecked, outside [0, T)) get
    x·W0ᵀ + b only; the values are not checked here (`cp_linear(..., backend="reference")` checks
    them). `backend` is accepted for signature parity and ignored.
    """
    t = broadcast_task_ids(task_ids, x.shape[:-1], x.device)
    A, B, C = (f.to(x.dtype) for f in (A, B, C))
    u = torch.einsum("...k,kr->...r", x, B)
    v = u * gather_rows(C, t)
    delta = torch.einsum("...r,nr->...n", v, A)
    return torch.nn.functional.linear(x, weight, bias) + scale * delta
