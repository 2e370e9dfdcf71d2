"""Helpers to check a `cp_linear` implementation against the float64 reference.

Used by the test suite and the benchmarks; public so that users who write their own backend
can run the same checks. The tolerance follows flash-attention's rule (ARCHITECTURE §5):

    max|fused − ref64| ≤ 2 · max|torch_same_dtype − ref64| + atol

i.e. the kernel may be at most twice as wrong as plain PyTorch in the same dtype.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .reference import cp_linear_reference

__all__ = ["make_inputs", "assert_close_to_reference", "assert_within_rule", "run_with_grads", "poisoned_memory",
           "GRAD_NAMES"]

#: Differentiable arguments, in the order run_with_grads returns their gradients.
GRAD_NAMES = ("x", "bias", "A", "B", "C")


def make_inputs(M, d_in, d_out, r, num_tasks, *, dtype=torch.float32, device="cpu", bias=True, task_mix="mixed",
                per_sample_shape=None, factor_dtype=None, requires_grad=True, generator=None) -> dict:
    """Fresh random inputs for cp_linear (never zeros), as a dict of its keyword arguments.

    Scales keep every term O(1) so the tolerance is meaningful: W0 ~ N(0, 1/d_in), B ~ N(0, 1/d_in),
    A ~ N(0, 1/r), C ~ N(0, 1). `task_mix` is "mixed" (a random task per row) or "single".
    `per_sample_shape=(batch, seq)` makes x (batch, seq, d_in) with one task id per sample.
    `factor_dtype` stores A, B, C in another dtype (fp32 master weights for a bf16 x).
    """
    g = generator
    factor_dtype = factor_dtype or dtype

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype=dt, device=device)

    lead = tuple(per_sample_shape) if per_sample_shape else (M,)
    x = rnd(*lead, d_in)
    n_ids = lead[0]
    if task_mix == "mixed":
        task_ids = torch.randint(0, num_tasks, (n_ids,), generator=g).to(device)
    elif task_mix == "single":
        task_ids = torch.full((n_ids,), num_tasks - 1, dtype=torch.int64, device=device)
    else:
        raise ValueError(f"task_mix must be 'mixed' or 'single', got {task_mix!r}")
    inputs = dict(
        x=x,
        weight=rnd(d_out, d_in, std=max(d_in, 1) ** -0.5),
        bias=rnd(d_out) if bias else None,
        A=rnd(d_out, r, std=max(r, 1) ** -0.5, dt=factor_dtype),
        B=rnd(d_in, r, std=max(d_in, 1) ** -0.5, dt=factor_dtype),
        C=rnd(num_tasks, r, dt=factor_dtype),
        task_ids=task_ids,
    )
    if requires_grad:
        for name in GRAD_NAMES:
            if inputs[name] is not None:
                inputs[name].requires_grad_(True)
    return inputs


def _detached(inputs: dict, dtype=None) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype or v.dtype).requires_grad_(v.requires_grad)
        out[k] = v
    return out


def run_with_grads(fn: Callable, inputs: dict, grad_y: torch.Tensor | None, scale: float = 1.0, **kw):
    """Run fn(**inputs, scale=scale) on detached copies; return (y, {name: grad or None})."""
    inp = _detached(inputs)
    y = fn(**inp, scale=scale, **kw)
    grads = {}
    if grad_y is not None:
        wrt = [n for n in GRAD_NAMES if inp[n] is not None and inp[n].requires_grad]
        gs = torch.autograd.grad(y, [inp[n] for n in wrt], grad_y.to(y.dtype), allow_unused=True)
        grads = dict(zip(wrt, gs))
    return y.detach(), grads


def _atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # A few ulps of the result's magnitude: covers the case where plain torch happens to be exact.
    return 16 * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)


def assert_close_to_reference(fn: Callable, inputs: dict, scale: float = 1.0, *, grad: bool = True,
                              atol: float | None = None, **kw) -> None:
    """Check fn's output and gradients against the float64 reference with the flash-attention rule."""
    dtype = inputs["x"].dtype
    x = inputs["x"]
    out_shape = x.shape[:-1] + inputs["weight"].shape[:1]
    grad_y = torch.randn(out_shape, dtype=torch.float64, device=x.device) if grad else None
    y, g = run_with_grads(fn, inputs, grad_y, scale, **kw)
    y64, g64 = run_with_grads(cp_linear_reference, _detached(inputs, torch.float64), grad_y, scale)
    ys, gs = run_with_grads(cp_linear_reference, inputs, grad_y, scale)
    pairs = [("y", y, y64, ys)] + [(f"grad {n}", g[n], g64[n], gs[n]) for n in g64]
    for name, got, ref, same in pairs:
        # fp32 master factors with a bf16 x are computed in bf16: their gradients get bf16's atol.
        coarser = dtype if torch.finfo(dtype).eps > torch.finfo(got.dtype).eps else got.dtype
        assert_within_rule(name, got, ref, same, atol=atol if atol is not None else _atol(ref, coarser))


def assert_within_rule(name: str, got, ref: torch.Tensor, same: torch.Tensor, *, atol: float | None = None) -> None:
    """The flash-attention rule for one tensor: |got − ref64| ≤ 2·|same − ref64| + atol.

    `ref` is the float64 result, `same` plain torch's result in got's dtype.
    """
    assert got is not None, f"{name}: no gradient came back"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == same.dtype, f"{name}: dtype {got.dtype} != {same.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    base = (same.double() - ref).abs().max().item() if ref.numel() else 0.0
    tol = 2 * base + (atol if atol is not None else _atol(ref, got.dtype))
    assert err <= tol, f"{name}: max error {err:.3e} > allowed {tol:.3e} (plain torch in {got.dtype}: {base:.3e})"


@contextlib.contextmanager
def poisoned_memory():
    """Fill every fresh torch.empty allocation with NaN (and select deterministic kernels).

    PyTorch fills uninitialised memory when deterministic algorithms are on; an output element
    that a kernel forgets to write then shows up as NaN instead of passing by luck.
    """
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
