"""The op contract (ARCHITECTURE §2) and the cpu backend, against the float64 reference."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpkernels
from cpkernels import cp_linear, cp_linear_reference
from cpkernels.testing import assert_close_to_reference, make_inputs, poisoned_memory

# The grid: M ∈ {0, 1, 7, 97}, d ∈ {1, 59, 64, 130}, r ∈ {1, 3, 16, 17}, T ∈ {1, 3, 8}.
# The full product over (M, d_in, d_out, r) runs in a few seconds; T and the bias cycle along.
GRID = list(itertools.product([0, 1, 7, 97], [1, 59, 64, 130], [1, 59, 64, 130], [1, 3, 16, 17]))


def test_cpu_backend_is_built():
    # CI installs with the extension; a missing cpu backend is a broken build, never a skip.
    assert "cpu" in cpkernels.available_backends("cpu"), cpkernels.explain_backend(torch.zeros(1))
    assert cpkernels.explain_backend(torch.zeros(1)).startswith("cpu")


@pytest.mark.parametrize("M,d_in,d_out,r", GRID, ids=lambda v: str(v))
def test_cpu_matches_reference_grid(M, d_in, d_out, r):
    i = GRID.index((M, d_in, d_out, r))
    T = (1, 3, 8)[i % 3]
    inp = make_inputs(M, d_in, d_out, r, T, bias=i % 2 == 0)
    assert_close_to_reference(cp_linear, inp, scale=(1.0, 0.5, -2.0)[i % 3], backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("task_mix", ["mixed", "single"])
def test_cpu_dtypes_poisoned(dtype, task_mix):
    inp = make_inputs(97, 59, 130, 17, 8, dtype=dtype, task_mix=task_mix)
    with poisoned_memory():
        assert_close_to_reference(cp_linear, inp, scale=0.75, backend="cpu")


def test_per_sample_ids_and_3d_input():
    inp = make_inputs(0, 59, 64, 3, 3, per_sample_shape=(4, 7))
    assert inp["task_ids"].shape == (4,)
    assert_close_to_reference(cp_linear, inp, scale=1.5, backend="cpu")


def test_per_token_ids_3d_input():
    inp = make_inputs(0, 59, 64, 3, 3, per_sample_shape=(4, 7))
    inp["task_ids"] = torch.randint(0, 3, (4, 7))
    assert_close_to_reference(cp_linear, inp, scale=1.5, backend="cpu")


def test_int_task_id_and_int32_ids():
    inp = make_inputs(13, 17, 19, 3, 4)
    assert_close_to_reference(cp_linear, {**inp, "task_ids": 3}, backend="cpu")
    assert_close_to_reference(cp_linear, {**inp, "task_ids": inp["task_ids"].int()}, backend="cpu")


def test_non_contiguous_inputs():
    inp = make_inputs(0, 59, 64, 16, 3, per_sample_shape=(7, 9))
    x = inp["x"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (7, 9, 59), strided
    assert not x.is_contiguous()
    A = inp["A"].detach().t().contiguous().t().requires_grad_()
    assert_close_to_reference(cp_linear, {**inp, "x": x, "A": A}, scale=0.3, backend="cpu")


def test_fp32_master_factors_with_bf16_input():
    inp = make_inputs(31, 59, 64, 16, 3, dtype=torch.bfloat16, factor_dtype=torch.float32)
    x, A = inp["x"], inp["A"]
    y = cp_linear(**inp, backend="cpu")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert_close_to_reference(cp_linear, inp, backend="cpu")


def test_autocast_bf16_with_fp32_parameters():
    inp = make_inputs(16, 32, 24, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cp_linear(**inp, backend="cpu")
        y_ref = cp_linear_reference(**{k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point()
                                          else v) for k, v in inp.items()})
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert inp["C"].grad.dtype == torch.float32


def test_rank_zero_is_plain_linear():
    inp = make_inputs(5, 7, 6, 0, 3)
    y = cp_linear(**inp, backend="cpu")
    torch.testing.assert_close(y, torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"]))


def test_gradcheck_float64():
    inp = make_inputs(6, 5, 4, 3, 3, dtype=torch.float64)
    t, w = inp["task_ids"], inp["weight"]

    def fn(x, bias, A, B, C):
        return cp_linear(x, w, bias, A, B, C, t, 0.7, backend="cpu")

    args = tuple(inp[k] for k in ("x", "bias", "A", "B", "C"))
    assert torch.autograd.gradcheck(fn, args)


def test_opcheck():
    inp = make_inputs(11, 9, 7, 3, 3)
    args = tuple(inp[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids")) + (0.5,)
    torch.library.opcheck(torch.ops.cpkernels.cp_linear_fwd.default, args)
    no_bias = args[:2] + (None,) + args[3:]
    torch.library.opcheck(torch.ops.cpkernels.cp_linear_fwd.default, no_bias)
    x, w, _, A, B, C, t, s = (a.detach() if torch.is_tensor(a) else a for a in args)
    u = x @ B
    gy = torch.randn(11, 7)
    for mask in ([True] * 5, [False, True, True, True, False]):
        torch.library.opcheck(torch.ops.cpkernels.cp_linear_bwd.default, (gy, x, w, A, B, C, t, u, s, mask))


def test_torch_compile_fullgraph_cpu():
    inp = make_inputs(0, 24, 20, 4, 3, per_sample_shape=(3, 5))
    x, w, b, A, B, C, t = (inp[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids"))
    compiled = torch.compile(lambda x, t: cp_linear(x, w, b, A, B, C, t, 0.5), fullgraph=True)
    y = compiled(x, t)
    torch.testing.assert_close(y, cp_linear_reference(x, w, b, A, B, C, t, 0.5), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    gA = A.grad.clone()
    A.grad = None
    cp_linear_reference(x, w, b, A, B, C, t, 0.5).square().sum().backward()
    torch.testing.assert_close(gA, A.grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    d_in=st.integers(1, 40), d_out=st.integers(1, 40), r=st.integers(1, 20), T=st.integers(1, 6),
    bias=st.booleans(), per_sample=st.booleans(), scale=st.floats(-3, 3, allow_nan=False),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fuzz_against_reference(lead, d_in, d_out, r, T, bias, per_sample, scale, dtype):
    inp = make_inputs(0, d_in, d_out, r, T, dtype=dtype, bias=bias, per_sample_shape=lead)
    if not per_sample:
        inp["task_ids"] = torch.randint(0, T, tuple(lead))
    assert_close_to_reference(cp_linear, inp, scale=scale, backend="cpu")


def test_dC_is_deterministic_across_thread_counts():
    inp = make_inputs(4096, 32, 32, 8, 3, requires_grad=False)
    C = inp["C"].clone().requires_grad_()
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, 1):
            torch.set_num_threads(n)
            C.grad = None
            cp_linear(**{**inp, "C": C}, backend="cpu").sum().backward()
            grads.append(C.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


# ------------------------------------------------------------------------------------------
# Bad input: the right exception type, the argument named, never an out-of-bounds access
# ------------------------------------------------------------------------------------------
def _args(**over):
    inp = make_inputs(5, 6, 4, 3, 2, requires_grad=False)
    inp.update(over)
    return inp


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [2, -1, 99])
def test_out_of_range_task_id(backend, bad):
    t = torch.tensor([0, 1, bad, 0, 1])
    with pytest.raises(IndexError, match=r"task_ids.*num_tasks=2.*row 2"):
        cp_linear(**_args(task_ids=t), backend=backend)


def test_direct_op_checks_task_range():
    a = _args(task_ids=torch.tensor([0, 1, 5, 0, 1]))
    with pytest.raises(IndexError, match="task_ids"):
        torch.ops.cpkernels.cp_linear_fwd(*(a[k] for k in ("x", "weight", "bias", "A", "B", "C", "task_ids")), 1.0)


@pytest.mark.parametrize("case,exc,pattern", [
    ("float ids", TypeError, "task_ids must be an integer tensor"),
    ("bool ids", TypeError, "task_ids must be an integer tensor"),
    ("ids shape", ValueError, r"task_ids has shape \(4,\)"),
    ("d_in", ValueError, r"weight has shape \(4, 7\).*d_in=6"),
    ("A rows", ValueError, r"A has shape \(5, 3\).*d_out=4"),
    ("B rank", ValueError, r"B has shape \(6, 2\).*r=3"),
    ("C rank", ValueError, r"C has shape \(2, 4\).*r=3"),
    ("weight dtype", TypeError, r"weight has dtype torch.float64 but x has dtype torch.float32"),
    ("bias shape", ValueError, r"bias has shape \(5,\)"),
    ("weight grad", ValueError, "weight.requires_grad is True"),
    ("x int", TypeError, "x must be float"),
    ("factor int", TypeError, "C must be a floating-point tensor"),
    ("backend", ValueError, "'nope' is not a backend"),
])
def test_bad_input_errors(case, exc, pattern):
    a = _args()
    kw = {}
    if case == "float ids":
        a["task_ids"] = a["task_ids"].float()
    elif case == "bool ids":
        a["task_ids"] = a["task_ids"] > 0
    elif case == "ids shape":
        a["task_ids"] = torch.zeros(4, dtype=torch.long)
    elif case == "d_in":
        a["weight"] = torch.randn(4, 7)
    elif case == "A rows":
        a["A"] = torch.randn(5, 3)
    elif case == "B rank":
        a["B"] = torch.randn(6, 2)
    elif case == "C rank":
        a["C"] = torch.randn(2, 4)
    elif case == "weight dtype":
        a["weight"] = a["weight"].double()
    elif case == "bias shape":
        a["bias"] = torch.randn(5)
    elif case == "weight grad":
        a["weight"].requires_grad_(True)
    elif case == "x int":
        a["x"] = torch.ones(5, 6, dtype=torch.int64)
    elif case == "factor int":
        a["C"] = torch.ones(2, 3, dtype=torch.int64)
    elif case == "backend":
        kw["backend"] = "nope"
    with pytest.raises(exc, match=pattern):
        cp_linear(**a, **kw)


def test_device_mismatch_is_named():
    a = _args()
    a["task_ids"] = a["task_ids"].to("meta")
    with pytest.raises(ValueError, match="task_ids is on meta but x is on cpu"):
        cp_linear(**a)
    a = _args()
    a["B"] = a["B"].to("meta")
    with pytest.raises(ValueError, match="B is on meta but x is on cpu"):
        cp_linear(**a)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="cuda.*not available.*CUDA tensors"):
        cp_linear(**_args(), backend="cuda")


def test_env_var_selects_backend():
    code = ("import torch, cpkernels; print(cpkernels.explain_backend(torch.zeros(1)))")
    env = {**os.environ, "CPKERNELS_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("reference (requested by CPKERNELS_BACKEND)")


def test_ids_modified_in_place_after_a_valid_call_are_checked_again():
    a = _args()
    t = a.pop("task_ids")
    cp_linear(**a, task_ids=t)  # valid: remembered
    t[3] = 7
    with pytest.raises(IndexError, match="row 3 has task id 7"):
        cp_linear(**a, task_ids=t)


def test_int_task_id_out_of_range():
    a = _args()
    a.pop("task_ids")
    with pytest.raises(IndexError, match=r"task_ids=2 is outside \[0, num_tasks=2\)"):
        cp_linear(**a, task_ids=2)


@pytest.mark.parametrize("ids", [[0, 1, 0, 1, 0], 1.0, "0"])
def test_task_ids_of_wrong_type_name_the_argument(ids):
    with pytest.raises(TypeError, match="task_ids"):
        cp_linear(**_args(task_ids=ids))


def test_wrong_shape_is_reported_before_bad_values():
    with pytest.raises(ValueError, match=r"task_ids has shape \(3,\)"):
        cp_linear(**_args(task_ids=torch.tensor([9, 9, 9])))


def test_checked_ids_cache_does_not_keep_tensors_alive():
    import gc

    from cpkernels import ops

    for per_sample in (True, False):
        inp = make_inputs(0, 6, 4, 3, 2, per_sample_shape=(5, 7) if per_sample else (5,), requires_grad=False)
        before = len(ops._checked_ids)
        for _ in range(20):
            inp["task_ids"] = torch.randint(0, 2, (5,))
            cp_linear(**inp)
        gc.collect()
        assert len(ops._checked_ids) <= before + 1


def test_cached_flat_ids_follow_in_place_changes():
    inp = make_inputs(0, 6, 4, 3, 3, per_sample_shape=(4, 5), requires_grad=False)
    t = inp["task_ids"]
    cp_linear(**inp)
    t.copy_(torch.tensor([2, 0, 1, 2]))
    torch.testing.assert_close(cp_linear(**inp), cp_linear_reference(**inp), rtol=1e-5, atol=1e-5)


def test_float64_on_cuda_is_not_sent_to_triton():
    from cpkernels import ops

    assert "triton" not in ops._auto_order("cuda", torch.float64)
    assert ops._auto_order("cuda", torch.bfloat16)[0] == "triton"
