"""The cpu backend (csrc/cpu/cp_linear_cpu.cpp): what the conformance suite does not cover.

A broad grid and a fuzz against the float64 reference (cheap on this backend), the raw op's
bounds-safe masking of bad ids, and bitwise reproducibility across thread counts.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpkernels
from cpkernels import cp_linear
from cpkernels.testing import assert_close_to_reference, make_inputs, run_with_grads

# M ∈ {0, 1, 7, 97}, d ∈ {1, 59, 64, 130}, r ∈ {1, 3, 16, 17}: the full product over (M, d_in,
# d_out, r), 256 cases; T, the bias and the scale cycle along. The default run takes every 8th case
# (30-40 s for all of them on 2 busy cores); `-m slow` runs the rest.
GRID = list(itertools.product([0, 1, 7, 97], [1, 59, 64, 130], [1, 59, 64, 130], [1, 3, 16, 17]))
GRID_PARAMS = [pytest.param(*case, marks=() if i % 8 == 0 else pytest.mark.slow) for i, case in enumerate(GRID)]


def test_cpu_backend_is_built():
    # CI installs with the extension; a missing cpu backend is a broken build, never a skip.
    assert "cpu" in cpkernels.available_backends("cpu"), cpkernels.explain_backend(torch.zeros(1))
    assert cpkernels.explain_backend(torch.zeros(1)).startswith("cpu")


@pytest.mark.parametrize("M,d_in,d_out,r", GRID_PARAMS, ids=lambda v: str(v))
def test_matches_reference_grid(M, d_in, d_out, r):
    i = GRID.index((M, d_in, d_out, r))
    T = (1, 3, 8)[i % 3]
    inp = make_inputs(M, d_in, d_out, r, T, bias=i % 2 == 0)
    if M > 2:
        inp["task_ids"][::3] = -1
    assert_close_to_reference(cp_linear, inp, scale=(1.0, 0.5, -2.0)[i % 3], backend="cpu")


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    d_in=st.integers(0, 40), d_out=st.integers(1, 40), r=st.integers(0, 20), T=st.integers(1, 6),
    bias=st.booleans(), per_sample=st.booleans(), scale=st.floats(-3, 3, allow_nan=False),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fuzz_against_reference(lead, d_in, d_out, r, T, bias, per_sample, scale, dtype):
    inp = make_inputs(0, d_in, d_out, r, T, dtype=dtype, bias=bias, per_sample_shape=lead)
    if not per_sample:
        inp["task_ids"] = torch.randint(-1, T, tuple(lead))
    assert_close_to_reference(cp_linear, inp, scale=scale, backend="cpu")


def test_raw_op_masks_bad_ids_without_reading_out_of_bounds():
    """Called directly (no ops.py check, as inside a compiled graph), any id outside [0, T) acts as -1.

    C sits between two NaN guard rows: a read of row -1 or row T would put NaN into the outputs.
    """
    T, r = 4, 3
    inp = make_inputs(9, 7, 5, r, T, requires_grad=False)
    guarded = torch.full((T + 2, r), float("nan"))
    guarded[1:-1] = inp["C"]
    C = guarded[1:-1]
    bad = torch.tensor([0, -1, T, 10 ** 6, -(10 ** 6), 3, 1, 2, -1])
    as_minus_one = torch.where((bad < 0) | (bad >= T), -1, bad)
    x, w, b, A, B = (inp[k] for k in ("x", "weight", "bias", "A", "B"))
    for ids in (bad, bad.int()):
        y, u = torch.ops.cpkernels.cp_linear_fwd(x, w, b, A, B, C, ids, 0.5)
        grads = torch.ops.cpkernels.cp_linear_bwd(torch.ones_like(y), x, w, A, B, C, ids, u, 0.5, [True] * 5)
        y_ref, u_ref = torch.ops.cpkernels.cp_linear_fwd(x, w, b, A, B, C, as_minus_one, 0.5)
        want = torch.ops.cpkernels.cp_linear_bwd(torch.ones_like(y), x, w, A, B, C, as_minus_one, u_ref, 0.5,
                                                 [True] * 5)
        assert torch.equal(y, y_ref)
        for got, exp in zip(grads, want):
            assert torch.equal(got, exp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_bitwise_independent_of_thread_count_when_deterministic(dtype):
    """Under torch.use_deterministic_algorithms, y and every gradient are bitwise the same with 1 and
    2 threads (M large enough that MKL's reductions over M could split by thread count)."""
    inp = make_inputs(3000, 96, 80, 8, 3, dtype=dtype)
    inp["task_ids"][::7] = -1
    grad_y = torch.randn(3000, 80, dtype=torch.float64)
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(run_with_grads(cp_linear, inp, grad_y, 0.5, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)
    (y0, g0), rest = results[0], results[1:]
    for y, g in rest:
        assert torch.equal(y, y0)
        for name in g0:
            assert torch.equal(g[name], g0[name]), name


def test_deterministic_mode_matches_reference():
    """The fixed-order reductions (deterministic mode) are as accurate as the GEMM path."""
    inp = make_inputs(700, 59, 37, 17, 5)
    inp["task_ids"][::5] = -1
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert_close_to_reference(cp_linear, inp, 0.7, backend="cpu")
    finally:
        torch.use_deterministic_algorithms(was)
