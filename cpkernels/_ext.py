"""Loads the compiled extension `cpkernels._C` and remembers why when it cannot.

Importing `_C` runs its static TORCH_LIBRARY registrations, which define the schemas
`torch.ops.cpkernels.cp_linear_fwd` / `cp_linear_bwd` and their CPU (and CUDA) kernels.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (imported for its registrations)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch (ABI mismatch)
    _C = None
    LOAD_ERROR = (
        f"the C++ extension cpkernels._C could not be loaded ({exc}). Build it against the torch in this "
        f"environment with `pip install --no-build-isolation .` (see README, 'Install')"
    )


def has_kernel(dispatch_key: str) -> bool:
    """True when the extension registered a cp_linear kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("cpkernels::cp_linear_fwd", dispatch_key)
