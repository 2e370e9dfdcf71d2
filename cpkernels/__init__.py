"""cpkernels: fused kernels for multi-task CP-decomposed low-rank updates.

    y = W0·x + b + s · A·diag(c_t)·Bᵀ·x      (Audibert et al., Findings of ACL 2023)
"""
from .ops import BACKENDS, available_backends, cp_linear, explain_backend
from .reference import cp_linear_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "cp_linear",
    "cp_linear_reference",
    "explain_backend",
]
