"""The benchmark shapes and targets: the one place they live (the project's benchmark plan; the
recorded runs and the targets table are in bench/RESULTS.md).

A shape is (M rows = tokens, d_in, d_out, r, T tasks). A *case* is a shape in one dtype with one
task mix; the pytest suite and `bench/report.py` both iterate over `cases(device_type)`.
Targets are ceilings on the ratio to frozen `F.linear` measured in the same run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: The fixed scalar s of the op; any value != 1 keeps the scale multiply in the measured path.
SCALE = 0.5

TASK_MIXES = ("mixed", "single")

#: A mixed-task batch may cost at most this much more than a single-task batch of the same shape.
MIXED_OVER_SINGLE_MAX = 1.02


@dataclass(frozen=True)
class Shape:
    id: str
    M: int
    d_in: int
    d_out: int
    r: int
    T: int
    #: The plan: "mixed" unless stated; both mixes on at least `llm` and `bert`.
    mixes: tuple[str, ...] = ("mixed",)
    #: provider -> (forward, forward+backward) ceiling on the ratio to F.linear.
    targets: dict = field(default_factory=dict, compare=False, hash=False)
    #: Whether the extra dtypes (fp16, fp32 on the GPU) are measured for this shape too.
    extra_dtypes: bool = False

    def __str__(self) -> str:
        return f"{self.id} (M={self.M}, d_in={self.d_in}, d_out={self.d_out}, r={self.r}, T={self.T})"


_LLM_CUDA = (1.30, 1.50)  # the CUDA C++ fallback's targets on the llm shapes
GPU_SHAPES = (
    Shape("decode", 16, 4096, 4096, 16, 8, targets={"triton": (1.50, 2.0)}),
    Shape("bert", 8192, 768, 768, 8, 8, mixes=TASK_MIXES, extra_dtypes=True, targets={"triton": (1.30, 1.50)}),
    Shape("bert-ffn", 16384, 1024, 4096, 16, 8, targets={"triton": (1.10, 1.25)}),
    Shape("llm", 8192, 4096, 4096, 16, 8, mixes=TASK_MIXES, extra_dtypes=True,
          targets={"triton": (1.05, 1.15), "cuda": _LLM_CUDA}),
    Shape("llm-r64", 8192, 4096, 4096, 64, 8, targets={"triton": (1.05, 1.15), "cuda": _LLM_CUDA}),
    Shape("llm-mlp", 8192, 4096, 11008, 16, 8, targets={"triton": (1.05, 1.15), "cuda": _LLM_CUDA}),
)

_CPU_TARGET = {"cpu": (1.05, 1.10)}  # the CPU C++ path, on every CPU shape (issue 2)
CPU_SHAPES = (
    Shape("cpu-bert", 2048, 768, 768, 8, 8, mixes=TASK_MIXES, targets=_CPU_TARGET),
    Shape("cpu-ffn", 2048, 768, 3072, 16, 8, mixes=TASK_MIXES, targets=_CPU_TARGET),
    # Issue 15: at M = 16 a fixed per-call cost dominates; the decode ceiling is 1.3x.
    Shape("cpu-decode", 16, 768, 768, 8, 8, mixes=TASK_MIXES, targets={"cpu": (1.30, 1.30)}),
)

#: Relative targets: (provider, must be faster than this provider, on which device type).
#: "The fused path beats torch.compile(reference) on every shape"; "the CUDA C++ fallback ...
#: beats the reference on every shape".
FASTER_THAN = (("triton", "compiled-reference", "cuda"), ("cuda", "reference", "cuda"))

#: "Peak memory of forward+backward is no more than the reference's" (for every fused backend).
MEMORY_NOT_ABOVE = "reference"

# The GPU method is bf16 with fp16 and fp32 as extra rows; the CPU set is fp32 only.
PRIMARY_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
EXTRA_DTYPES = {"cuda": (torch.float16, torch.float32), "cpu": ()}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: torch.dtype
    mix: str

    @property
    def id(self) -> str:
        return f"{self.shape.id}-{dtype_name(self.dtype)}-{self.mix}"


def shapes_for(device_type: str) -> tuple[Shape, ...]:
    return GPU_SHAPES if device_type == "cuda" else CPU_SHAPES


def cases(device_type: str, quick: bool = False, shape_ids=None, mixes=None) -> list[Case]:
    """Every (shape, dtype, task mix) to measure on `device_type`; `quick` keeps the primary dtype only,
    `mixes` (a subset of TASK_MIXES) the task mixes named there."""
    out = []
    for shape in shapes_for(device_type):
        if shape_ids and shape.id not in shape_ids:
            continue
        dtypes = (PRIMARY_DTYPE[device_type],)
        if shape.extra_dtypes and not quick:
            dtypes += EXTRA_DTYPES[device_type]
        out += [Case(shape, dt, mix) for dt in dtypes for mix in shape.mixes if not mixes or mix in mixes]
    return out
