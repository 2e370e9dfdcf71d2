"""The fused fp32 rank-r kernels of the cpu backend (csrc/cpu/lowrank_cpu.cpp) against the float64 reference.

They replace MKL for u = x·B, g = dY·A (shrink) and for seeding y with b + s·(u ⊙ C[t])·Aᵀ and dX with
gs·Bᵀ (expand). The sizes hit each of their edges: rows not a multiple of the 8-row block, d_out not a
multiple of the 64-column tile, r below, equal to and across the 8-lane vector (1, 3, 8, 9, 17), and
more rows than one parallel task (64) so that the row split between threads is exercised.
"""
import pytest
import torch

import cpkernels
from cpkernels.testing import assert_close_to_reference, make_inputs

pytestmark = pytest.mark.skipif("cpu" not in cpkernels.available_backends("cpu"),
                                reason="the C++ extension is not built")


def cpu_op(**kw):
    return cpkernels.cp_linear(**kw, backend="cpu")


@pytest.mark.parametrize(("M", "d_in", "d_out", "r"), [
    (97, 59, 131, 3), (7, 64, 64, 8), (130, 97, 64, 9), (203, 130, 70, 17), (1, 1, 1, 1), (16, 768, 200, 8),
])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_fp32_matches_reference(M, d_in, d_out, r, bias):
    inp = make_inputs(M, d_in, d_out, r, 5, dtype=torch.float32, bias=bias)
    assert_close_to_reference(cpu_op, inp, 0.7, grad=True)


def test_no_adapter_rows_get_the_plain_linear():
    """Task id -1 means no adapter: those rows are exactly x·W0ᵀ + b and add nothing to the factor grads."""
    inp = make_inputs(70, 33, 65, 9, 4, dtype=torch.float32)
    inp["task_ids"][::3] = -1
    assert_close_to_reference(cpu_op, inp, 0.7, grad=True)
    with torch.no_grad():
        y = cpu_op(**inp, scale=0.7)
        plain = torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])
    rows = inp["task_ids"] == -1
    torch.testing.assert_close(y[rows], plain[rows], rtol=1e-5, atol=1e-5)


def test_row_strided_input_is_read_in_place():
    """x a column slice of a wider tensor (row stride > d_in): the shrink reads it with its stride."""
    inp = make_inputs(75, 40, 33, 5, 3, dtype=torch.float32)
    wide = torch.randn(75, 57)
    wide[:, 3:43] = inp["x"].detach()
    inp["x"] = wide[:, 3:43].requires_grad_(True)
    assert inp["x"].stride() == (57, 1)
    assert_close_to_reference(cpu_op, inp, 1.3, grad=True)


def test_empty_batch():
    inp = make_inputs(0, 24, 16, 4, 2, dtype=torch.float32)
    y = cpu_op(**inp, scale=0.5)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert inp["B"].grad.abs().sum() == 0
