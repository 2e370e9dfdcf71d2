"""cpkernels: fused kernels for multi-task CP-decomposed low-rank updates.

    y = W0·x + b + s · A·diag(c_t)·Bᵀ·x      (Audibert et al., Findings of ACL 2023)

Public API only; the logic lives in the submodules. `cpkernels.sparsity` and `cpkernels.analysis`
are imported as modules by users who need them.
"""
from .adapters import export_lora, from_lora, from_pretrained, load_adapters, read_adapters, save_adapters
from .config import CPConfig
from .convert import checkpoint_context, convert, cp_layers, export, merge, task_context, unmerge
from .factors import LayerFactors, parameter_report, print_parameter_report
from .modules import FusedCPLinear
from .ops import BACKENDS, available_backends, cp_linear, explain_backend
from .reference import cp_linear_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CPConfig",
    "FusedCPLinear",
    "LayerFactors",
    "available_backends",
    "checkpoint_context",
    "convert",
    "cp_layers",
    "cp_linear",
    "cp_linear_reference",
    "explain_backend",
    "export",
    "export_lora",
    "from_lora",
    "from_pretrained",
    "load_adapters",
    "merge",
    "parameter_report",
    "print_parameter_report",
    "read_adapters",
    "save_adapters",
    "task_context",
    "unmerge",
]
