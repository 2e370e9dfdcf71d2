"""Triton-specific tests of cpkernels/_triton: forced kernel paths, the raw op's masking, GPU shapes.

The op contract itself runs on this backend in test_conformance.py (interpreter and GPU). On a
machine without CUDA the kernels run on CPU tensors through TRITON_INTERPRET=1, which conftest.py
sets before triton is first imported. Tests marked `gpu` run on the device (bench/device_check.sh).
"""
import pytest
import torch

import cpkernels
from cpkernels import ops
from cpkernels.reference import cp_linear_reference
from cpkernels.testing import _detached, assert_close_to_reference, make_inputs, poisoned_memory, run_with_grads

pytest.importorskip("triton")
# Backend availability is cached per process; drop an answer cached before the variable was set.
ops._why_unavailable.cache_clear()

from cpkernels._triton import backward, forward  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 0.7  # not 1, so that a missing or doubled scale shows
NUM_TASKS = 5


def triton_cp_linear(**kw):
    return cpkernels.cp_linear(**kw, backend="triton")


@pytest.fixture(scope="module", autouse=True)
def _triton_available():
    assert "triton" in cpkernels.available_backends(DEVICE), cpkernels.explain_backend(torch.empty(0, device=DEVICE),
                                                                                       "triton")


@pytest.fixture
def paths(monkeypatch):
    """Force the rarer code paths at test sizes: the shrink pass and several M splits."""
    def force(shrink: bool, split_rows: int | None = None):
        monkeypatch.setattr(forward, "_prefers_shrink_pass", lambda M, N, R: shrink)
        if split_rows is not None:
            monkeypatch.setattr(backward, "_rows_per_split", lambda M, r, block_m: split_rows)
    return force


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: correctness against the float64 reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shrink,split_rows", [(True, None), (True, 32), (False, 32)])
def test_matches_reference_on_every_path(paths, shrink, split_rows):
    """The shrink pass (any r, chunked when r > 64) and multi-range reductions, at test sizes."""
    paths(shrink, split_rows)
    for M, d_in, d_out, r in ((97, 130, 59, 3), (97, 59, 64, 70)):
        inputs = make_inputs(M, d_in, d_out, r, NUM_TASKS, device=DEVICE)
        assert_close_to_reference(triton_cp_linear, inputs, SCALE)


def test_strided_inputs_and_expanded_grad(paths):
    paths(False, 32)
    inputs = make_inputs(97, 59, 64, 3, NUM_TASKS, device=DEVICE)
    x = inputs["x"].detach()
    inputs["x"] = x.t().contiguous().t().requires_grad_()  # same values, column-major strides
    assert not inputs["x"].is_contiguous()
    assert_close_to_reference(triton_cp_linear, inputs, SCALE)
    # y.sum() hands backward a stride-0 grad_y: it must give what the materialised ones give.
    ones = torch.ones(1, 1, device=DEVICE).expand(97, 64)
    _, g_expanded = run_with_grads(triton_cp_linear, inputs, ones, SCALE)
    _, g_dense = run_with_grads(triton_cp_linear, inputs, ones.contiguous(), SCALE)
    for name in g_dense:
        assert torch.equal(g_expanded[name], g_dense[name]), name


@pytest.mark.parametrize("shrink", [True, False])
def test_poisoned_memory(paths, shrink):
    """Every output element and partial sum is written: NaN-filled allocations never leak through."""
    paths(shrink, 32)
    with poisoned_memory():
        for M, d_in, d_out, r in ((97, 130, 59, 17), (7, 64, 130, 1)):
            inputs = make_inputs(M, d_in, d_out, r, NUM_TASKS, device=DEVICE)
            assert_close_to_reference(triton_cp_linear, inputs, SCALE)


def test_deterministic_bitwise(paths):
    paths(False, 32)
    inputs = make_inputs(97, 130, 64, 17, NUM_TASKS, device=DEVICE)
    grad_y = torch.randn(97, 64, device=DEVICE)
    with poisoned_memory():  # also turns deterministic algorithms on
        y1, g1 = run_with_grads(triton_cp_linear, inputs, grad_y, SCALE)
        y2, g2 = run_with_grads(triton_cp_linear, inputs, grad_y, SCALE)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_out_of_range_task_ids_are_masked():
    """Called directly (no ops.py check), a bad id reads nothing: its row gets no low-rank update,
    no dX update, and adds nothing to dA, dB or dC, exactly as if its C row were zero."""
    M, r = 97, 3
    inputs = make_inputs(M, 59, 64, r, NUM_TASKS, device=DEVICE)
    bad_rows = torch.tensor([0, 5, 50, 96])
    t = inputs["task_ids"].clone()
    t[bad_rows] = torch.tensor([-1, NUM_TASKS, 10**6, -(10**6)], device=DEVICE)

    def direct_op(x, weight, bias, A, B, C, task_ids, scale):
        return torch.ops.cpkernels.triton_cp_linear_fwd(x, weight, bias, A, B, C, task_ids, scale)[0]

    grad_y = torch.randn(M, 64, device=DEVICE)
    y, g = run_with_grads(direct_op, dict(inputs, task_ids=t), grad_y, SCALE)
    # The float64 reference with an extra zero row of C that every bad id points to.
    C_ext = torch.cat([inputs["C"].detach(), inputs["C"].new_zeros(1, r)]).requires_grad_()
    ref = dict(inputs, C=C_ext, task_ids=torch.where((t < 0) | (t >= NUM_TASKS), NUM_TASKS, t))
    y64, g64 = run_with_grads(cp_linear_reference, _detached(ref, torch.float64), grad_y.double(), SCALE)
    g64["C"] = g64["C"][:NUM_TASKS]
    # fp32 against fp64 with K ≤ 97 terms of O(1): errors are ~1e-6; 1e-4 still catches any
    # missing or extra row (each contributes O(0.1)).
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    for name in g64:
        torch.testing.assert_close(g[name].double(), g64[name], rtol=1e-4, atol=1e-4, msg=name)


def test_float64_is_refused():
    inputs = make_inputs(7, 59, 64, 3, NUM_TASKS, dtype=torch.float64, device=DEVICE, requires_grad=False)
    with pytest.raises(TypeError, match="float64"):
        triton_cp_linear(**inputs)


# ------------------------------------------------------------------------------------------------
# GPU only (device machine)
# ------------------------------------------------------------------------------------------------
# (M, d_in, d_out, r, dtype, task mix): odd sizes in every dtype, then the BENCHMARKS.md shapes in
# bf16, which take every kernel path (decode: the small-M configs; bert: mid-size tiles; llm: the
# in-loop fusion; llm-r64 and llm-mlp: the shrink pass). fp16/fp32 stay small to bound autotuning.
GPU_CASES = [
    *[(97, 130, 59, 3, dt, "mixed") for dt in (torch.bfloat16, torch.float16, torch.float32)],
    *[(8192, 768, 768, 8, dt, mix) for dt in (torch.bfloat16, torch.float16, torch.float32)
      for mix in ("mixed", "single")],
    (16, 4096, 4096, 16, torch.bfloat16, "mixed"),
    (16, 4096, 4096, 16, torch.float32, "mixed"),
    (8192, 4096, 4096, 16, torch.bfloat16, "mixed"),
    (8192, 4096, 4096, 16, torch.bfloat16, "single"),
    (8192, 4096, 4096, 64, torch.bfloat16, "mixed"),
    (8192, 4096, 11008, 16, torch.bfloat16, "mixed"),
    (2048, 1024, 1024, 16, torch.float16, "mixed"),
]


@pytest.mark.parametrize("M,d_in,d_out,r,dtype,mix", GPU_CASES)
@pytest.mark.gpu
@requires_cuda
def test_gpu_matches_reference(M, d_in, d_out, r, dtype, mix):
    inputs = make_inputs(M, d_in, d_out, r, 8, dtype=dtype, task_mix=mix, device="cuda")
    assert_close_to_reference(triton_cp_linear, inputs, SCALE)


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32_master_factors():
    inputs = make_inputs(2048, 1024, 1024, 16, 8, dtype=torch.bfloat16, factor_dtype=torch.float32, device="cuda")
    assert_close_to_reference(triton_cp_linear, inputs, SCALE)


@pytest.mark.gpu
@requires_cuda
def test_gpu_poisoned_and_deterministic():
    inputs = make_inputs(4096, 1024, 1536, 16, 8, dtype=torch.bfloat16, device="cuda")
    grad_y = torch.randn(4096, 1536, device="cuda")
    with poisoned_memory():
        assert_close_to_reference(triton_cp_linear, inputs, SCALE)
        y1, g1 = run_with_grads(triton_cp_linear, inputs, grad_y, SCALE)
        y2, g2 = run_with_grads(triton_cp_linear, inputs, grad_y, SCALE)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_replay_with_new_task_ids():
    M, d_in, d_out, r, T = 512, 1024, 768, 16, 8
    inputs = make_inputs(M, d_in, d_out, r, T, dtype=torch.bfloat16, device="cuda")
    x, weight, bias, A, B, C = (inputs[k] for k in ("x", "weight", "bias", "A", "B", "C"))
    t = inputs["task_ids"].clone()
    grad_y = torch.randn(M, d_out, device="cuda", dtype=torch.bfloat16)

    def step():
        y = triton_cp_linear(x=x, weight=weight, bias=bias, A=A, B=B, C=C, task_ids=t, scale=SCALE)
        return (y, *torch.autograd.grad(y, [x, bias, A, B, C], grad_y))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (autotuning) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        t.copy_(torch.randint(0, T, (M,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for got, want in zip(captured, eager):
            assert torch.equal(got, want)


@pytest.mark.gpu
@requires_cuda
def test_gpu_torch_compile_fullgraph():
    inputs = make_inputs(1024, 512, 768, 16, 8, dtype=torch.bfloat16, device="cuda")
    # Inductor may autotune to another tile than eager did, so compare both to the reference.
    assert_close_to_reference(torch.compile(triton_cp_linear, fullgraph=True), inputs, SCALE)


@pytest.mark.gpu
@requires_cuda
def test_gpu_agrees_with_cuda_backend():
    if "cuda" not in cpkernels.available_backends("cuda"):
        pytest.skip(f"cuda backend unavailable: {cpkernels.explain_backend(torch.empty(0, device='cuda'), 'cuda')}")
    inputs = make_inputs(1000, 1024, 768, 16, 8, dtype=torch.float32, device="cuda")
    grad_y = torch.randn(1000, 768, device="cuda")
    y_t, g_t = run_with_grads(triton_cp_linear, inputs, grad_y, SCALE)
    y_c, g_c = run_with_grads(cpkernels.cp_linear, inputs, grad_y, SCALE, backend="cuda")
    # Two fp32 kernels (tf32 is off by default) summing ≤ 1024 terms of O(1): ~1e-5 apart.
    torch.testing.assert_close(y_t, y_c, rtol=1e-3, atol=1e-3)
    for name in g_t:
        torch.testing.assert_close(g_t[name], g_c[name], rtol=1e-3, atol=1e-3, msg=name)
