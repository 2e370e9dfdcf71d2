"""Loads the compiled extension `cpkernels._C` and remembers why when it cannot.

Importing `_C` runs its static TORCH_LIBRARY registrations, which define the schemas
`torch.ops.cpkernels.cp_linear_fwd` / `cp_linear_bwd` and their CPU (and CUDA) kernels.
"""
from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

try:
    from . import _C  # noqa: F401  (imported for its registrations)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch (ABI mismatch)
    _C = None
    _HERE = Path(__file__).resolve().parent
    if not [f for suffix in EXTENSION_SUFFIXES for f in _HERE.glob(f"_C*{suffix}")]:
        # Python's own message here ("partially initialized module ... circular import") misleads:
        # the usual cause is a source checkout found before the installed package on sys.path.
        LOAD_ERROR = (
            f"cpkernels was imported from {_HERE}, which holds no compiled extension (_C*.so). If that is a "
            f"source checkout, it shadows the installed package because the current directory or PYTHONPATH "
            f"is on sys.path: run from another directory (or `python -P`), or build in place with "
            f"`python setup.py build_ext --inplace`. Otherwise install with `pip install --no-build-isolation .` "
            f"(README, 'Install')"
        )
    else:
        LOAD_ERROR = (
            f"the C++ extension in {_HERE} could not be loaded ({exc}); it was probably built against another "
            f"torch. Rebuild it against this one with `pip install --no-build-isolation .` (README, 'Install')"
        )


def has_kernel(dispatch_key: str) -> bool:
    """True when the extension registered a cp_linear kernel for `dispatch_key` ("CPU" or "CUDA")."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("cpkernels::cp_linear_fwd", dispatch_key)
